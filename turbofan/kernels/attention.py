"""Python face of the varlen paged-attention kernel (turbofan/kernels/paged_attention.cpp).

`paged_attention_varlen` is a thin call of `torch.ops.turbofan.paged_attention_varlen`: eager code pays only the
dispatcher, and a compiled graph keeps it as one opaque op (its shape function is in fakes.py), whatever the
context length.

Batch invariance: a row's numbers depend only on its own sequence, never on the other sequences of the call or on
how its prompt was cut into chunks. A prompt row is computed in tiles of many positions whose per-row arithmetic
does not depend on the tile (lanes form, chunks at absolute key positions); a generated token's row (`prompt_lens`
says where those begin) gets a tile of its own, split across threads by its own key count only, so a verify step's
rows are the bits the decode steps would give them (speculation changes no greedy token). Without `prompt_lens`, a
sequence of at most 33 rows in the call is taken as generated rows.
"""

from __future__ import annotations

import torch

from turbofan import kernels

# KV-cache dtypes the kernel reads: float32, and float16 (rounded on write, widened to float32 on read; q/k/v
# and all arithmetic stay float32).
SUPPORTED_DTYPES = (torch.float32, torch.float16)


def supports(dtype: torch.dtype) -> bool:
    """Whether the kernel can serve a KV cache of this dtype (the kernels must also be `available()`)."""
    return dtype in SUPPORTED_DTYPES


def paged_attention_varlen(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KVH, D]: this step's keys, written to k_cache[slot_mapping] first
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [slots, KVH, D], contiguous, float32 or float16, written in place
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64
    block_tables: torch.Tensor,  # [B, W] int64: cache block of each sequence's logical block
    query_start_loc: torch.Tensor,  # [B + 1] int64: sequence b owns rows query_start_loc[b]:query_start_loc[b+1]
    context_lens: torch.Tensor,  # [B] int64: tokens in the cache per sequence after this step's write
    block_size: int,
    scale: float,
    window: int | None = None,  # a query at position p sees keys at positions > p - window
    prompt_lens: torch.Tensor | None = None,  # [B] int64: rows at positions >= prompt_lens[b] are generated tokens
) -> torch.Tensor:
    """Causal (optionally sliding-window) attention of every query row over its own sequence's paged context."""
    return torch.ops.turbofan.paged_attention_varlen(
        q,
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        block_tables,
        query_start_loc,
        context_lens,
        block_size,
        scale,
        window or 0,
        prompt_lens,
    )


def available() -> bool:
    return kernels.available()
