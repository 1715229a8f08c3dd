"""Micro-benchmark: one layer's paged attention, the PyTorch fallback (padded gather + masked SDPA) against the
C++ kernel that reads the cache in place (turbofan::paged_attention_varlen).

    python -m turbofan.bench.attention [--threads 2[,1]] [--repeats 5] [--quick] [--shapes smollm2,gemma3]

Per case: median microseconds of one call (the step's k/v write included, as in a layer), and of building the
per-step metadata (shared by all layers). Shapes: SmolLM2-135M (9 heads, 3 kv heads, head_dim 64) and Gemma 3
270M (4 heads, 1 kv head, head_dim 256); decode batches 1/16/64 at context 128 and 1024, and a mixed step (one
2,000-token prefill chunk + 32 decodes at context 1024). Each number is the median of `--repeats` rounds, each
round the median of a burst of calls. One layer's cache, called again and again, so it is warm in the CPU
caches as far as it fits; in a real step each layer's cache is cold, which favours neither side.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from turbofan import kernels
from turbofan.model.attention import AttentionMetadata, paged_attention, sdpa_paged_attention
from turbofan.model.batch import ForwardBatch

SHAPES = {"smollm2": (9, 3, 64), "gemma3": (4, 1, 256)}
BLOCK = 16


def make_case(specs: list[tuple[int, int]], heads: int, kv_heads: int, head_dim: int, seed: int = 0):
    """A step over sequences (cached tokens, new tokens) whose blocks are scattered over a shared cache."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    need = [-(-(c + n) // BLOCK) for c, n in specs]
    num_blocks = sum(need) + 8
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    tables, at = [], 0
    for n in need:
        tables.append(pool[at : at + n])
        at += n
    batch = ForwardBatch.build(
        [[0] * n for _, n in specs], [c for c, _ in specs], tables, [[n - 1] for _, n in specs], BLOCK
    )
    t = batch.num_tokens
    k_cache = torch.randn(num_blocks * BLOCK, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks * BLOCK, kv_heads, head_dim, generator=g)
    q = torch.randn(t, heads, head_dim, generator=g)
    k = torch.randn(t, kv_heads, head_dim, generator=g)
    v = torch.randn(t, kv_heads, head_dim, generator=g)
    return batch, (q, k, v, k_cache, v_cache)


def timed(fn, repeats: int, burst: int) -> float:
    """Median over rounds of the median call in a burst, in microseconds (3 rounds at most for calls over 1 s)."""
    t0 = time.perf_counter()
    fn()  # warm-up
    if time.perf_counter() - t0 > 1.0:
        repeats = min(repeats, 3)
    rounds = []
    for _ in range(repeats):
        calls = []
        for _ in range(burst):
            t0 = time.perf_counter()
            fn()
            calls.append(time.perf_counter() - t0)
        rounds.append(statistics.median(calls))
    return statistics.median(rounds) * 1e6


@torch.inference_mode()
def run_case(name: str, specs, shape: str, repeats: int, window: int | None = None) -> dict:
    heads, kv_heads, head_dim = SHAPES[shape]
    batch, (q, k, v, kc, vc) = make_case(specs, heads, kv_heads, head_dim)
    scale = head_dim**-0.5
    work = sum((c + n) * n for c, n in specs) * heads * head_dim
    burst = max(1, min(50, int(2e7 // max(work, 1))))
    windows = (window,) if window else ()

    def meta_new():
        return AttentionMetadata.from_batch(batch, windows)

    def meta_old():
        meta = AttentionMetadata.from_batch(batch, windows)
        return meta.dense  # what the fallback builds per step

    meta = meta_new()
    meta.dense  # noqa: B018
    old = timed(lambda: sdpa_paged_attention(q, k, v, kc, vc, meta, scale, window), repeats, burst)
    new = timed(lambda: paged_attention(q, k, v, kc, vc, meta, scale, window), repeats, max(burst, 5))
    out_old = sdpa_paged_attention(q, k, v, kc, vc, meta, scale, window)
    out_new = paged_attention(q, k, v, kc, vc, meta, scale, window)
    return {
        "case": name,
        "shape": shape,
        "old_us": old,
        "new_us": new,
        "meta_old_us": timed(meta_old, repeats, 20),
        "meta_new_us": timed(meta_new, repeats, 20),
        "max_diff": (out_old - out_new).abs().max().item(),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="2", help="comma-separated thread counts, e.g. 2,1")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="decode cases only")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args(argv)
    if not kernels.available():
        raise SystemExit(f"turbofan kernels unavailable: {kernels.unavailable_reason()}")
    print(kernels.cpu_summary())
    print(f"repeats={args.repeats} block_size={BLOCK}; microseconds per call (median), metadata per step")
    cases = []
    for shape in args.shapes.split(","):
        for ctx in (128, 1024):
            for b in (1, 16, 64):
                cases.append((f"decode b={b} ctx={ctx}", [(ctx - 1, 1)] * b, shape, None))
        if shape == "gemma3":
            cases.append(("decode b=16 ctx=1024 window=512", [(1023, 1)] * 16, shape, 512))
        if not args.quick:
            cases.append(("mixed prefill 2000 + 32 decodes", [(0, 2000)] + [(1023, 1)] * 32, shape, None))
            cases.append(("prefill 2000", [(0, 2000)], shape, None))
    header = (
        f"{'thr':>3} {'shape':8} {'case':34} {'old us':>10} {'new us':>10} {'speedup':>8} {'meta old':>9} {'meta new':>9}"
    )
    print(header)
    print("-" * len(header))
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for name, specs, shape, window in cases:
            r = run_case(name, specs, shape, args.repeats, window)
            assert r["max_diff"] < 1e-4, r
            print(
                f"{threads:3d} {r['shape']:8} {r['case']:34} {r['old_us']:10.1f} {r['new_us']:10.1f} "
                f"{r['old_us'] / r['new_us']:7.1f}x {r['meta_old_us']:9.1f} {r['meta_new_us']:9.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
