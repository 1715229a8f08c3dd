"""Micro-benchmark: one layer's paged attention, the PyTorch fallback (padded gather + masked SDPA) against the
C++ kernel that reads the cache in place (turbofan::paged_attention_varlen).

    python -m turbofan.bench.attention [--threads 2[,1]] [--repeats 5] [--quick] [--shapes smollm2,gemma3]
                                       [--kv-cache-dtype float32,float16] [--no-fallback] [--cold]

Per case: median microseconds of one call (the step's k/v write included, as in a layer) of the fallback on a
float32 cache ("sdpa f32", skipped with --no-fallback) and of the kernel on each KV-cache dtype asked for
("kernel f32", "kernel f16"; the last column is float32 time over float16 time), and of building the per-step
metadata (shared by all layers). The kernel's dtypes are timed in interleaved rounds, so a burst of load from
elsewhere hits both alike. Shapes: SmolLM2-135M (9 heads, 3 kv heads, head_dim 64) and Gemma 3
270M (4 heads, 1 kv head, head_dim 256); decode batches 1/16/64 at context 128 and 1024, and a mixed step (one
2,000-token prefill chunk + 32 decodes at context 1024). Each number is the median of `--repeats` rounds, each
round the median of a burst of calls. One layer's cache, called again and again, so it is warm in the CPU
caches as far as it fits; in a real step each layer's cache is cold, which favours neither side. With --cold the
kernel's calls go round the caches of as many layers as the model has (SmolLM2 30, Gemma 3 18; fewer where
that would pass 512 MiB, enough to be cold anyway), as in a real step: a layer's K/V come from wherever the
whole step's KV cache fits (the memory-bound case a float16 cache is for).
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import time

import torch

from turbofan import kernels
from turbofan.model.attention import AttentionMetadata, paged_attention, sdpa_paged_attention
from turbofan.model.batch import ForwardBatch

SHAPES = {"smollm2": (9, 3, 64), "gemma3": (4, 1, 256)}
LAYERS = {"smollm2": 30, "gemma3": 18}
COLD_BYTES = 512 << 20  # most memory --cold spends on layer copies per dtype
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


def timed_many(fns, repeats: int, burst: int) -> list[float]:
    """Per function: median over rounds of the median call in a burst, in microseconds. The functions take turns
    round by round (3 rounds at most when a call takes over 1 s)."""
    t0 = time.perf_counter()
    for fn in fns:
        fn()  # warm-up
    if time.perf_counter() - t0 > len(fns):
        repeats = min(repeats, 3)
    rounds: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            calls = []
            for _ in range(burst):
                t0 = time.perf_counter()
                fn()
                calls.append(time.perf_counter() - t0)
            rounds[i].append(statistics.median(calls))
    return [statistics.median(r) * 1e6 for r in rounds]


def timed(fn, repeats: int, burst: int) -> float:
    return timed_many([fn], repeats, burst)[0]


KV_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@torch.inference_mode()
def run_case(
    name: str,
    specs,
    shape: str,
    repeats: int,
    window: int | None = None,
    kv_dtypes: tuple[str, ...] = ("float32",),
    fallback: bool = True,
    cold: bool = False,
) -> dict:
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
    caches = {name: (kc.to(KV_DTYPES[name]), vc.to(KV_DTYPES[name])) for name in kv_dtypes}

    def layer_calls(name: str):
        """One call per layer in turn: the layers' caches (copies of this one) on --cold, else this one only."""
        kc_n, vc_n = caches[name]
        layers = [(kc_n, vc_n)]
        if cold:
            per_layer = 2 * kc_n.numel() * kc_n.element_size()
            layers += [(kc_n.clone(), vc_n.clone()) for _ in range(min(LAYERS[shape], COLD_BYTES // per_layer) - 1)]
        turn = itertools.cycle(layers)
        return lambda: paged_attention(q, k, v, *next(turn), meta, scale, window)

    kernel_us = timed_many([layer_calls(n) for n in kv_dtypes], repeats, max(burst, 5))
    # Each dtype's output against the fallback on the same cache contents (a float16 cache: the rounded values).
    max_diff = 0.0
    for n in kv_dtypes:
        out = paged_attention(q, k, v, *caches[n], meta, scale, window)
        kr, vr = (x.to(KV_DTYPES[n]).float() for x in (k, v))
        ref = sdpa_paged_attention(q, kr, vr, caches[n][0].float(), caches[n][1].float(), meta, scale, window)
        max_diff = max(max_diff, (out - ref).abs().max().item())
    row = {
        "case": name,
        "shape": shape,
        "old_us": float("nan"),
        "kernel_us": dict(zip(kv_dtypes, kernel_us)),
        "meta_old_us": timed(meta_old, repeats, 20),
        "meta_new_us": timed(meta_new, repeats, 20),
        "max_diff": max_diff,
    }
    if fallback:
        row["old_us"] = timed(lambda: sdpa_paged_attention(q, k, v, kc, vc, meta, scale, window), repeats, burst)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="2", help="comma-separated thread counts, e.g. 2,1")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="decode cases only")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument(
        "--kv-cache-dtype", default="float32,float16", help="comma-separated KV-cache dtypes to time the kernel on"
    )
    ap.add_argument("--no-fallback", action="store_true", help="skip the (slow) SDPA fallback")
    ap.add_argument("--cold", action="store_true", help="the kernel goes round a model's worth of layer caches")
    args = ap.parse_args(argv)
    kv_dtypes = tuple(args.kv_cache_dtype.split(","))
    for name in kv_dtypes:
        if name not in KV_DTYPES:
            raise SystemExit(f"--kv-cache-dtype: {name!r} is not one of {', '.join(KV_DTYPES)}")
    if not kernels.available():
        raise SystemExit(f"turbofan kernels unavailable: {kernels.unavailable_reason()}")
    print(kernels.cpu_summary())
    print(
        f"repeats={args.repeats} block_size={BLOCK} kernel caches="
        f"{'cold (a model of layers)' if args.cold else 'warm'}; microseconds per call (median), metadata per step"
    )
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
    short = {"float32": "f32", "float16": "f16"}
    kernel_cols = "".join(f" {'kernel ' + short[n] + ' us':>14}" for n in kv_dtypes)
    ratio_col = f" {'f32/f16':>8}" if {"float32", "float16"} <= set(kv_dtypes) else ""
    header = (
        f"{'thr':>3} {'shape':8} {'case':34} {'sdpa f32 us':>12}{kernel_cols} {'speedup':>8}{ratio_col} "
        f"{'meta old':>9} {'meta new':>9}"
    )
    print(header)
    print("-" * len(header))
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for name, specs, shape, window in cases:
            r = run_case(name, specs, shape, args.repeats, window, kv_dtypes, not args.no_fallback, args.cold)
            assert r["max_diff"] < 1e-4, r
            us = r["kernel_us"]
            ratio = f" {us['float32'] / us['float16']:7.2f}x" if ratio_col else ""
            old, speedup = f"{'-':>12}", f"{'-':>8}"
            if not args.no_fallback:
                old, speedup = f"{r['old_us']:12.1f}", f"{r['old_us'] / us[kv_dtypes[0]]:7.1f}x"
            print(
                f"{threads:3d} {r['shape']:8} {r['case']:34} {old}"
                + "".join(f" {us[n]:14.1f}" for n in kv_dtypes)
                + f" {speedup}{ratio} {r['meta_old_us']:9.1f} {r['meta_new_us']:9.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
