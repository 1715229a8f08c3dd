"""Paged attention equals dense reference attention, whatever the block size, layout, batch mix or window.

Every check runs on each implementation: the C++ kernel (turbofan::paged_attention_varlen) on its AVX-512, AVX2
and scalar paths, and the PyTorch fallback (padded gather + masked SDPA), and on both KV-cache dtypes: float32
and float16 (k/v rounded to float16 when written, widened back to float32 when read).

Tolerance: ATOL = 1e-5 absolute, for both cache dtypes. Everything is computed in float32; the kernel differs
from the reference only in summation order (online softmax over chunks of keys, dot products in vector lanes)
and in its exp (a polynomial within ~1 ulp). Outputs are convex combinations of N(0, 1) values, so with up to
~1,500 keys the rounding stays near 1e-6; a wrong mask, block or head shows up as an error of order 1. A float16
cache is compared with the reference computed on the same float16-rounded K/V (q stays float32), so once the
rounding is the same only summation order differs and the same 1e-5 holds; the rounding itself (~1e-3
relative) is what the quality benchmark measures on real models.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from turbofan import kernels
from turbofan.model.attention import (
    AttentionMetadata,
    dense_reference_attention,
    paged_attention,
    sdpa_paged_attention,
)
from turbofan.model.batch import ForwardBatch

ATOL = 1e-5
ISA_PATHS = ("avx512", "avx2", "scalar")
PATHS = (*ISA_PATHS, "sdpa")
KV_DTYPES = {"f32": torch.float32, "f16": torch.float16}


def _skip_unless(path: str) -> None:
    if path == "sdpa":
        return
    if not kernels.available():
        pytest.skip(f"turbofan kernels unavailable: {kernels.unavailable_reason()}")
    if kernels.ISA_LEVELS[path] > kernels.ISA_LEVELS[kernels.detected_isa()]:
        pytest.skip(f"this CPU has no {path}")


@pytest.fixture(params=PATHS)
def path(request) -> str:
    _skip_unless(request.param)
    return request.param


@pytest.fixture(params=ISA_PATHS)
def isa_path(request) -> str:
    _skip_unless(request.param)
    return request.param


@pytest.fixture(params=list(KV_DTYPES))
def kv_dtype(request) -> torch.dtype:
    """The KV cache's dtype (q/k/v stay float32)."""
    return KV_DTYPES[request.param]


def attend(path: str, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, window=None):
    """paged_attention on one implementation."""
    if path == "sdpa":
        return sdpa_paged_attention(q, k, v, k_cache, v_cache, meta, scale, window)
    assert meta.use_kernel
    with kernels.forced_isa(path):
        return paged_attention(q, k, v, k_cache, v_cache, meta, scale, window)


@pytest.fixture
def two_threads():
    """Kernel work is split across threads (and long contexts into key slices) only with more than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_dense_reference_is_causal_sdpa():
    """The yardstick itself: without a window it is PyTorch's causal SDPA (with K/V heads repeated for GQA)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(9, 4, 8, generator=g)
    k = torch.randn(9, 2, 8, generator=g)
    v = torch.randn(9, 2, 8, generator=g)
    ours = dense_reference_attention(q, k, v, scale=0.3)
    ref = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.repeat_interleave(2, 1).transpose(0, 1),
        v.repeat_interleave(2, 1).transpose(0, 1),
        is_causal=True,
        scale=0.3,
    ).transpose(0, 1)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    # with a window of w, row i sees exactly keys max(0, i-w+1)..i
    w = 3
    windowed = dense_reference_attention(q, k, v, scale=0.3, window=w)
    for i in range(9):
        lo = max(0, i - w + 1)
        row = dense_reference_attention(q[lo : i + 1], k[lo : i + 1], v[lo : i + 1], scale=0.3)[-1]
        torch.testing.assert_close(windowed[i], row, atol=ATOL, rtol=0)


def build_case(
    specs: list[tuple[int, int]],  # (tokens already in the cache, new tokens this step) per sequence
    block_size: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    seed: int,
    num_blocks: int | None = None,
    kv_dtype: torch.dtype = torch.float32,
):
    """A batch whose contexts live in shuffled blocks of a cache full of garbage, and each sequence's full q/k/v.

    The cache is in `kv_dtype`; the full k/v returned are float32 (round them as the cache does for a reference).
    """
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    need = [-(-(c + n) // block_size) for c, n in specs]
    num_blocks = num_blocks or sum(need) + 5
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    tables, at = [], 0
    for k in need:
        tables.append(pool[at : at + k])
        at += k
    slots = num_blocks * block_size
    # garbage everywhere, so a wrong gather (or a missed mask) changes the result
    k_cache = torch.randn(slots, kv_heads, head_dim, generator=g) * 10
    v_cache = torch.randn(slots, kv_heads, head_dim, generator=g) * 10
    full = []  # per sequence: the whole q/k/v of its (context + new) tokens
    for (ctx, new), table in zip(specs, tables):
        total = ctx + new
        q = torch.randn(total, heads, head_dim, generator=g)
        k = torch.randn(total, kv_heads, head_dim, generator=g)
        v = torch.randn(total, kv_heads, head_dim, generator=g)
        for pos in range(ctx):  # what earlier steps wrote
            slot = table[pos // block_size] * block_size + pos % block_size
            k_cache[slot], v_cache[slot] = k[pos], v[pos]
        full.append((q, k, v))
    k_cache, v_cache = k_cache.to(kv_dtype), v_cache.to(kv_dtype)
    batch = ForwardBatch.build(
        [[0] * new for _, new in specs],
        [ctx for ctx, _ in specs],
        tables,
        [list(range(new)) for _, new in specs],
        block_size,
    )
    new_qkv = [torch.cat([x[ctx:] for (ctx, _), x in zip(specs, [f[i] for f in full])]) for i in range(3)]
    return batch, tables, k_cache, v_cache, full, new_qkv


def run_paged(
    specs: list[tuple[int, int]],
    block_size: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    window: int | None,
    seed: int,
    num_blocks: int | None = None,
    path: str = "avx512",
    kv_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Runs one implementation of paged attention on a shuffled-block batch and compares every query row with the
    dense reference on K/V rounded to the cache's dtype."""
    batch, tables, k_cache, v_cache, full, (q_new, k_new, v_new) = build_case(
        specs, block_size, heads, kv_heads, head_dim, seed, num_blocks, kv_dtype
    )
    meta = AttentionMetadata.from_batch(batch, (window,) if window else ())
    scale = head_dim**-0.5
    out = attend(path, q_new, k_new, v_new, k_cache, v_cache, meta, scale, window)
    assert out.shape == q_new.shape
    row = 0
    for i, ((ctx, new), (q, k, v)) in enumerate(zip(specs, full)):
        ref = dense_reference_attention(q, rounded(k, kv_dtype), rounded(v, kv_dtype), scale, window)[ctx:]
        got = out[row : row + new]
        diff = (got - ref).abs().max().item()
        assert diff <= ATOL, f"{path} {kv_dtype}: sequence {i} (context {ctx}, new {new}): max diff {diff:.3g}"
        row += new
    # the new keys and values landed in their slots (rounded to the cache's dtype as torch rounds)
    for (ctx, new), table, (_, k, v) in zip(specs, tables, full):
        for pos in range(ctx, ctx + new):
            slot = table[pos // block_size] * block_size + pos % block_size
            assert torch.equal(k_cache[slot], k[pos].to(kv_dtype)) and torch.equal(v_cache[slot], v[pos].to(kv_dtype))
    return out


def rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as a cache of `dtype` holds it, back in float32."""
    return x.to(dtype).float()


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("window", [None, 1, 5])
def test_mixed_batch_decode_and_chunked_prefill(block_size, window, path, kv_dtype):
    """Decodes, a fresh prefill, and a chunked prefill that continues after a cached context, in one batch."""
    specs = [(23, 1), (0, 17), (9, 6), (1, 1), (40, 1)]
    run_paged(specs, block_size, 4, 2, 16, window, seed=block_size, path=path, kv_dtype=kv_dtype)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_pure_decode_batch(block_size, path, kv_dtype):
    """The hot shape: every sequence adds one token."""
    specs = [(0, 1), (5, 1), (16, 1), (31, 1), (64, 1)]
    run_paged(specs, block_size, 8, 8, 8, window=None, seed=1, path=path, kv_dtype=kv_dtype)
    run_paged(specs, block_size, 8, 1, 8, window=7, seed=2, path=path, kv_dtype=kv_dtype)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_gqa_single_prefill(heads, kv_heads, path, kv_dtype):
    seed = heads * 10 + kv_heads
    run_paged([(0, 37)], 4, heads, kv_heads, 32, window=None, seed=seed, path=path, kv_dtype=kv_dtype)


@pytest.mark.parametrize("seed", range(12))
def test_random_shapes(seed, path, kv_dtype):
    rng = random.Random(1000 + seed)
    block_size = rng.choice([1, 2, 3, 4, 5, 8, 16, 32])
    kv_heads = rng.choice([1, 2, 4])
    heads = kv_heads * rng.choice([1, 2, 3])
    head_dim = rng.choice([4, 8, 24, 32, 64])
    window = rng.choice([None, None, 1, 2, 7, 30])
    specs = []
    for _ in range(rng.randint(1, 6)):
        ctx = rng.choice([0, 0, rng.randint(1, 90)])
        new = rng.choice([1, rng.randint(1, 40)])
        specs.append((ctx, new))
    run_paged(specs, block_size, heads, kv_heads, head_dim, window, seed=seed, path=path, kv_dtype=kv_dtype)


# The real models' shapes: SmolLM2 (9 heads over 3 kv heads, head_dim 64) and Gemma 3 (4 over 1, head_dim 256).
MODEL_SHAPES = {"smollm2": (9, 3, 64), "gemma3": (4, 1, 256)}


@pytest.mark.parametrize("shape", MODEL_SHAPES)
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("window", [None, 20])
def test_model_head_dims(shape, block_size, window, path, kv_dtype):
    """head_dim 64 and 256 (the vector paths), several block sizes, prefill longer than one query tile, decodes."""
    heads, kv_heads, head_dim = MODEL_SHAPES[shape]
    specs = [(0, 45), (70, 1), (33, 9), (130, 1), (5, 1), (3, 70)]
    run_paged(specs, block_size, heads, kv_heads, head_dim, window, seed=block_size, path=path, kv_dtype=kv_dtype)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (9, 3), (12, 1), (14, 2), (40, 1)])
def test_gqa_ratios_multi_tile_prefill(heads, kv_heads, path, kv_dtype):
    """Prefill chunks spanning several query tiles after a cached context, for several query/kv head ratios
    (40 query heads per kv head are more than a vector tile holds: the kernel takes its row form for them)."""
    specs = [(50, 80), (0, 1), (17, 33)]
    run_paged(specs, 16, heads, kv_heads, 64, window=33, seed=heads + kv_heads, path=path, kv_dtype=kv_dtype)


@pytest.mark.parametrize("shape", MODEL_SHAPES)
@pytest.mark.parametrize("window", [None, 700])
def test_long_contexts_split_across_threads(shape, window, isa_path, kv_dtype, two_threads):
    """Few long sequences: the kernel slices the keys of a tile across threads and merges the slices."""
    heads, kv_heads, head_dim = MODEL_SHAPES[shape]
    args = (16, heads, kv_heads, head_dim, window)
    run_paged([(1500, 1)], *args, seed=3, path=isa_path, kv_dtype=kv_dtype)  # one long decode
    run_paged([(1200, 3), (900, 1)], *args, seed=4, path=isa_path, kv_dtype=kv_dtype)  # a short chunk


def test_padded_decode_batch(isa_path, kv_dtype):
    """The compiled tier's shape: real decodes plus dummies that all write one trash slot and read the trash block."""
    specs = [(30, 1), (70, 1), (5, 1)]
    batch, tables, k_cache, v_cache, full, (q, k, v) = build_case(specs, 16, 9, 3, 64, seed=13, kv_dtype=kv_dtype)
    trash = min(set(range(k_cache.shape[0] // 16)) - {b for t in tables for b in t})  # a block no sequence owns
    padded = batch.padded_decode(8, trash)
    extra = padded.num_tokens - batch.num_tokens
    g = torch.Generator().manual_seed(14)
    pad = [torch.randn(extra, *x.shape[1:], generator=g) for x in (q, k, v)]
    meta = AttentionMetadata.from_batch(padded)
    out = attend(isa_path, *(torch.cat([x, p]) for x, p in zip((q, k, v), pad)), k_cache, v_cache, meta, 0.125)
    for i, ((ctx, _), (fq, fk, fv)) in enumerate(zip(specs, full)):
        ref = dense_reference_attention(fq, rounded(fk, kv_dtype), rounded(fv, kv_dtype), 0.125)[ctx:]
        torch.testing.assert_close(out[i : i + 1], ref, atol=ATOL, rtol=0)
    assert torch.isfinite(out).all()


def test_kernel_equals_fallback(isa_path, kv_dtype):
    """The kernel and the SDPA fallback agree on one mixed batch (both also match the reference above)."""
    specs = [(0, 60), (100, 1), (31, 7), (200, 1), (64, 1)]
    batch, _, k_cache, v_cache, _, (q, k, v) = build_case(specs, 16, 9, 3, 64, seed=7, kv_dtype=kv_dtype)
    meta = AttentionMetadata.from_batch(batch, (30,))
    for window in (None, 30):
        ours = attend(isa_path, q, k, v, k_cache, v_cache, meta, 0.125, window)
        fallback = attend("sdpa", q, k, v, k_cache, v_cache, meta, 0.125, window)
        torch.testing.assert_close(ours, fallback, atol=ATOL, rtol=0)


def test_strided_qkv_from_fused_projection(isa_path, kv_dtype):
    """q/k/v as layers.py makes them: reshaped column slices of one fused [T, (H + 2 KVH) D] projection."""
    specs = [(10, 5), (40, 1)]
    heads, kv_heads, head_dim = 9, 3, 64
    batch, _, k_cache, v_cache, _, (q, k, v) = build_case(specs, 16, heads, kv_heads, head_dim, 9, kv_dtype=kv_dtype)
    t = q.shape[0]
    fused = torch.cat([q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)], dim=1)
    qs, ks, vs = fused.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    qs, ks, vs = (x.reshape(t, -1, head_dim) for x in (qs, ks, vs))
    assert not ks.is_contiguous()
    meta = AttentionMetadata.from_batch(batch)
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    expect = attend(isa_path, q, k, v, expect_k, expect_v, meta, 0.125)
    got = attend(isa_path, qs, ks, vs, k_cache, v_cache, meta, 0.125)
    assert torch.equal(got, expect)
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)  # the same (rounded) writes


@pytest.mark.parametrize("shape", [*MODEL_SHAPES, "odd"])
def test_float16_cache_is_the_float32_kernel_on_rounded_kv(shape, isa_path, two_threads):
    """Bit for bit: a float16 cache gives what a float32 cache holding the float16-rounded values gives (widening
    is exact and the arithmetic is the same float32 code in the same order), decode, prefill and split alike."""
    heads, kv_heads, head_dim = MODEL_SHAPES.get(shape, (6, 2, 24))
    specs = [(0, 70), (300, 1), (41, 9), (900, 1), (5, 1), (1, 1)]
    batch, _, k16, v16, _, (q, k, v) = build_case(specs, 16, heads, kv_heads, head_dim, seed=21, kv_dtype=torch.float16)
    k32, v32 = k16.float(), v16.float()
    meta = AttentionMetadata.from_batch(batch, (50,))
    for window in (None, 50):
        got = attend(isa_path, q, k, v, k16, v16, meta, 0.1, window)
        expect = attend(isa_path, q, rounded(k, torch.float16), rounded(v, torch.float16), k32, v32, meta, 0.1, window)
        assert torch.equal(got, expect)
    assert torch.equal(k16.float(), k32) and torch.equal(v16.float(), v32)


def test_float16_cache_write_rounds_as_torch_does(isa_path):
    """This step's k/v are rounded to nearest even like Tensor.half(): ties, subnormals, overflow to inf, and a
    head_dim with a scalar tail (D = 20)."""
    g = torch.Generator().manual_seed(5)
    t, kv_heads, d = 40, 2, 20
    k = torch.randn(t, kv_heads, d, generator=g) * torch.logspace(-9, 5, t)[:, None, None]  # down to subnormals
    k[0, 0, :4] = torch.tensor([70000.0, -1e6, 2049.0, 1 + 2**-11])  # overflow, overflow, a tie, a tie
    v = torch.randn(t, kv_heads, d, generator=g)
    k_cache = torch.zeros(64, kv_heads, d, dtype=torch.float16)
    v_cache = torch.zeros_like(k_cache)
    batch = ForwardBatch.build([[0] * t], [0], [[3, 0, 2]], [[t - 1]], 16)
    meta = AttentionMetadata.from_batch(batch)
    q = torch.randn(t, 2 * kv_heads, d, generator=g)
    attend(isa_path, q, k, v, k_cache, v_cache, meta, 0.2)
    assert torch.equal(k_cache[batch.slot_mapping], k.half()) and torch.equal(v_cache[batch.slot_mapping], v.half())
    assert torch.isinf(k_cache[batch.slot_mapping][0, 0, :2]).all()


def test_kernel_rejects_other_dtypes_and_bf16_takes_the_fallback():
    if not kernels.available():
        pytest.skip(f"turbofan kernels unavailable: {kernels.unavailable_reason()}")
    batch, _, k_cache, v_cache, full, (q, k, v) = build_case([(20, 3), (7, 1)], 4, 4, 2, 32, seed=11)
    meta = AttentionMetadata.from_batch(batch)
    bf = [x.bfloat16() for x in (q, k, v, k_cache, v_cache)]
    index = (meta.slot_mapping, meta.block_tables, meta.query_start_loc, meta.context_lens, 4, 0.2, 0)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.turbofan.paged_attention_varlen(*bf, *index)
    with pytest.raises(RuntimeError, match="float32 or float16 KV cache"):  # float32 q/k/v, a bf16 cache
        torch.ops.turbofan.paged_attention_varlen(q, k, v, *bf[3:], *index)
    with pytest.raises(RuntimeError, match="v_cache is Half"):  # the two caches in different dtypes
        torch.ops.turbofan.paged_attention_varlen(q, k, v, k_cache, v_cache.half(), *index)
    out = paged_attention(*bf, meta, 0.2)  # a bf16 cache is served by the PyTorch path
    ref = torch.cat([dense_reference_attention(*(x.bfloat16().float() for x in f), 0.2)[-n:] for f, n in zip(full, (3, 1))])
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=0)


def test_kernel_checks_its_block_tables():
    """A context longer than its block table, or a block outside the cache, is an error, not a wild read."""
    if not kernels.available():
        pytest.skip(f"turbofan kernels unavailable: {kernels.unavailable_reason()}")
    batch, _, k_cache, v_cache, _, (q, k, v) = build_case([(20, 3)], 4, 4, 2, 32, seed=12)
    meta = AttentionMetadata.from_batch(batch)
    op = torch.ops.turbofan.paged_attention_varlen
    common = (q, k, v, k_cache, v_cache, meta.slot_mapping)
    with pytest.raises(RuntimeError, match="blocks"):
        op(*common, meta.block_tables[:, :2], meta.query_start_loc, meta.context_lens, 4, 0.2, 0)
    bad = meta.block_tables.clone()
    bad[0, 0] = k_cache.shape[0]
    with pytest.raises(RuntimeError, match="outside the cache"):
        op(*common, bad, meta.query_start_loc, meta.context_lens, 4, 0.2, 0)


def test_kernel_in_compiled_graph_keeps_context_length_symbolic(kv_dtype):
    """One fullgraph compile serves every context length: the op is opaque and the block-table width dynamic.

    aot_eager traces what Inductor sees (fake shapes, functionalised cache writes, symbolic sizes) without its
    code generation; test_tiering.py runs the real Inductor compile of the whole model.
    """
    if not kernels.available():
        pytest.skip(f"turbofan kernels unavailable: {kernels.unavailable_reason()}")
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")

    def step(q, k, v, k_cache, v_cache, meta):
        return paged_attention(q * 1.0, k, v, k_cache, v_cache, meta, 0.25, 7) + 1.0

    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=False)
    bs, b, heads, kv_heads, head_dim = 4, 3, 4, 2, 16
    k_cache = torch.zeros(400, kv_heads, head_dim, dtype=kv_dtype)
    v_cache = torch.zeros(400, kv_heads, head_dim, dtype=kv_dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for ctx in (2, 3, 5, 9, 17, 30, 41):  # block tables from 1 to 11 blocks wide
            tables = [[seq * 30 + j for j in range(-(-ctx // bs))] for seq in range(b)]
            batch = ForwardBatch.build([[0]] * b, [ctx - 1] * b, tables, [[0]] * b, bs)
            meta = AttentionMetadata.from_batch(batch)
            q = torch.randn(b, heads, head_dim, generator=g)
            k = torch.randn(b, kv_heads, head_dim, generator=g)
            v = torch.randn(b, kv_heads, head_dim, generator=g)
            expect = step(q, k, v, k_cache.clone(), v_cache.clone(), meta)
            got = compiled(q, k, v, k_cache, v_cache, meta)
            torch.testing.assert_close(got, expect, atol=0, rtol=0)
            assert torch.equal(k_cache[batch.slot_mapping], k.to(kv_dtype))  # the compiled call wrote the cache
            assert torch.equal(v_cache[batch.slot_mapping], v.to(kv_dtype))
    assert counter.frame_count == 1


def test_window_mask_is_cached_per_window():
    batch = ForwardBatch.build([[1, 2, 3]], [2], [[0, 1]], [[2]], 4)
    meta = AttentionMetadata.from_batch(batch)
    assert meta.mask(None) is meta.base_mask
    assert meta.mask(2) is meta.mask(2)
    assert not torch.equal(meta.mask(2), meta.mask(None))


def test_metadata_is_per_step_not_per_context():
    """What the kernel gets per step is O(batch + blocks); the fallback's [B, C] tensors are only built on use."""
    if not kernels.available():
        pytest.skip(f"turbofan kernels unavailable: {kernels.unavailable_reason()}")
    batch = ForwardBatch.build([[1] * 5, [2]], [0, 700], [[0, 1], list(range(2, 47))], [[4], [0]], 16)
    meta = AttentionMetadata.from_batch(batch)
    assert meta.use_kernel and meta._dense is None
    meta.mark_dynamic()  # what the compiled tier calls: marks the block-table width, builds nothing
    assert meta._dense is None
    assert meta.query_start_loc.tolist() == [0, 5, 6]
    assert meta.gather_slots.shape == (2, 701)  # the fallback's view still works when asked for
    assert meta._dense is not None


@pytest.mark.parametrize("window", [0, 100])
def test_a_rows_bits_do_not_depend_on_chunking_batch_mates_or_speculation(isa_path, kv_dtype, window):
    """Batch invariance of the kernel, bit for bit: one sequence (a 640-token prompt, then 6 generated tokens) is
    computed (a) in one call, (b) with its prompt cut into uneven chunks, each in a call with another sequence, and
    its generated tokens as decode rows, one per call, beside a long decode of another sequence, (c) with a 3-row
    last prompt chunk and its generated tokens as one verify call (a decode row plus 5 drafts). Every row must
    be the same bytes in all three: no reduction order may depend on the tile a row lands in, on what else is in
    the call, or on whether a generated row was decoded or verified. Two threads, so long decode rows are split
    across cores (by their own key count, never by the call's size)."""
    bs, heads, kv_heads, head_dim, prompt, total = 16, 6, 2, 64, 640, 646
    g = torch.Generator().manual_seed(3)
    q = torch.randn(total, heads, head_dim, generator=g)
    k = torch.randn(total, kv_heads, head_dim, generator=g)
    v = torch.randn(total, kv_heads, head_dim, generator=g)
    other = 700  # the batch mate: a sequence with this many tokens in the cache
    oq = torch.randn(other, heads, head_dim, generator=g)
    ok = torch.randn(other, kv_heads, head_dim, generator=g)
    ov = torch.randn(other, kv_heads, head_dim, generator=g)
    table = list(range(1, -(-total // bs) + 1))
    other_table = list(range(100, 100 + -(-other // bs)))

    def run(calls: list[list[tuple[str, int, int]]]) -> torch.Tensor:
        """Each call: (sequence, first row, end row) pieces; returns the main sequence's output rows."""
        k_cache = torch.zeros(200 * bs, kv_heads, head_dim, dtype=kv_dtype)
        v_cache = torch.zeros_like(k_cache)
        out = torch.empty(total, heads, head_dim)
        for pieces in calls:
            src = {"main": (q, k, v, table, prompt), "other": (oq, ok, ov, other_table, other - 1)}
            rows = [src[name] for name, _, _ in pieces]
            batch = ForwardBatch.build(
                [[0] * (b - a) for _, a, b in pieces], [a for _, a, _ in pieces], [r[3] for r in rows],
                [[] for _ in pieces], bs,
            )  # fmt: skip
            batch.prompt_lens = torch.tensor([r[4] for r in rows])
            meta = AttentionMetadata.from_batch(batch)
            qs, ks, vs = (torch.cat([r[i][a:b] for r, (_, a, b) in zip(rows, pieces)]) for i in range(3))
            got = paged_attention(qs, ks, vs, k_cache, v_cache, meta, 0.125, window or None)
            offset = 0
            for name, a, b in pieces:
                if name == "main":
                    out[a:b] = got[offset : offset + b - a]
                offset += b - a
        return out

    prefill_other = [("other", 0, other - 1)]
    with kernels.forced_isa(isa_path):
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            whole = run([prefill_other, [("main", 0, total)]])
            decoded = run(
                [prefill_other, [("main", 0, 250), ("other", other - 1, other)], [("main", 250, 601)],
                 [("main", 601, prompt)]]
                + [[("other", other - 1, other), ("main", prompt + i, prompt + i + 1)] for i in range(6)]
            )  # fmt: skip
            verified = run([prefill_other, [("main", 0, prompt - 3)], [("main", prompt - 3, prompt)],
                            [("main", prompt, total), ("other", other - 1, other)]])  # fmt: skip
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(decoded, whole)
    assert torch.equal(verified, whole)
