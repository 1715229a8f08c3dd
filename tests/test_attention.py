"""Paged attention equals dense reference attention, whatever the block size, layout, batch mix or window."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from turbofan.model.attention import AttentionMetadata, dense_reference_attention, paged_attention
from turbofan.model.batch import ForwardBatch

ATOL = 1e-5


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


def run_paged(
    specs: list[tuple[int, int]],  # (tokens already in the cache, new tokens this step) per sequence
    block_size: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    window: int | None,
    seed: int,
    num_blocks: int | None = None,
) -> None:
    """Builds a batch whose contexts live in shuffled blocks, runs paged attention, compares every query row."""
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
    batch = ForwardBatch.build(
        [[0] * new for _, new in specs],
        [ctx for ctx, _ in specs],
        tables,
        [list(range(new)) for _, new in specs],
        block_size,
    )
    meta = AttentionMetadata.from_batch(batch)
    q_new = torch.cat([q[ctx:] for (ctx, _), (q, _, _) in zip(specs, full)])
    k_new = torch.cat([k[ctx:] for (ctx, _), (_, k, _) in zip(specs, full)])
    v_new = torch.cat([v[ctx:] for (ctx, _), (_, _, v) in zip(specs, full)])
    scale = head_dim**-0.5
    out = paged_attention(q_new, k_new, v_new, k_cache, v_cache, meta, scale, window)
    assert out.shape == q_new.shape
    row = 0
    for i, ((ctx, new), (q, k, v)) in enumerate(zip(specs, full)):
        ref = dense_reference_attention(q, k, v, scale, window)[ctx:]
        got = out[row : row + new]
        diff = (got - ref).abs().max().item()
        assert diff <= ATOL, f"sequence {i} (context {ctx}, new {new}): max diff {diff:.3g}"
        row += new
    # the new keys and values landed in their slots
    for (ctx, new), table, (_, k, v) in zip(specs, tables, full):
        for pos in range(ctx, ctx + new):
            slot = table[pos // block_size] * block_size + pos % block_size
            assert torch.equal(k_cache[slot], k[pos]) and torch.equal(v_cache[slot], v[pos])


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("window", [None, 1, 5])
def test_mixed_batch_decode_and_chunked_prefill(block_size, window):
    """Decodes, a fresh prefill, and a chunked prefill that continues after a cached context, in one batch."""
    specs = [(23, 1), (0, 17), (9, 6), (1, 1), (40, 1)]
    run_paged(specs, block_size, heads=4, kv_heads=2, head_dim=16, window=window, seed=block_size)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_pure_decode_batch(block_size):
    """The hot shape: every sequence adds one token (AttentionMetadata takes its no-scatter path)."""
    specs = [(0, 1), (5, 1), (16, 1), (31, 1), (64, 1)]
    run_paged(specs, block_size, heads=8, kv_heads=8, head_dim=8, window=None, seed=1)
    run_paged(specs, block_size, heads=8, kv_heads=1, head_dim=8, window=7, seed=2)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_gqa_single_prefill(heads, kv_heads):
    run_paged(
        [(0, 37)], 4, heads=heads, kv_heads=kv_heads, head_dim=32, window=None, seed=heads * 10 + kv_heads
    )


@pytest.mark.parametrize("seed", range(12))
def test_random_shapes(seed):
    rng = random.Random(1000 + seed)
    block_size = rng.choice([1, 2, 4, 8, 16])
    kv_heads = rng.choice([1, 2, 4])
    heads = kv_heads * rng.choice([1, 2, 3])
    head_dim = rng.choice([4, 8, 32])
    window = rng.choice([None, None, 1, 2, 7, 30])
    specs = []
    for _ in range(rng.randint(1, 6)):
        ctx = rng.choice([0, 0, rng.randint(1, 50)])
        new = rng.choice([1, rng.randint(1, 20)])
        specs.append((ctx, new))
    run_paged(specs, block_size, heads, kv_heads, head_dim, window, seed=seed, num_blocks=None)


def test_window_mask_is_cached_per_window():
    batch = ForwardBatch.build([[1, 2, 3]], [2], [[0, 1]], [[2]], 4)
    meta = AttentionMetadata.from_batch(batch)
    assert meta.mask(None) is meta.base_mask
    assert meta.mask(2) is meta.mask(2)
    assert not torch.equal(meta.mask(2), meta.mask(None))
