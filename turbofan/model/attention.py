"""Paged attention in plain PyTorch.

The KV cache of a layer is a flat array of slots ([num_blocks * block_size, kv_heads, head_dim]); a sequence's
context is wherever its block table points. Each step we gather every sequence's context into a padded
[batch, context, ...] view once per layer and run one SDPA call with a mask that encodes causality, padding and
the sliding window. The index tensors and masks are built once per step (AttentionMetadata) and shared by all
layers, so the per-layer work is two scatters, one gather and one fused attention kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from turbofan.model.batch import ForwardBatch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T]
    gather_slots: torch.Tensor  # [B, C]: cache slot of each context position (0 where padded)
    query_scatter: torch.Tensor | None  # [T]: row of each flat query in the padded [B * Q] layout; None if identity
    batch: int
    max_query: int
    query_positions: torch.Tensor  # [B, Q]: absolute position of each padded query row (-1 = padding)
    context_positions: torch.Tensor  # [C]
    base_mask: torch.Tensor  # [B, 1, Q, C] causal + padding
    _window_masks: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_batch(cls, fb: ForwardBatch, windows: tuple[int, ...] = ()) -> AttentionMetadata:
        b = fb.query_lens.shape[0]
        q = int(fb.query_lens.max())
        c = int(fb.context_lens.max())
        ctx = torch.arange(c)
        blocks = fb.block_tables.gather(1, (ctx // fb.block_size).expand(b, c).clamp(max=fb.block_tables.shape[1] - 1))
        gather_slots = blocks * fb.block_size + ctx % fb.block_size
        gather_slots = torch.where(ctx[None, :] < fb.context_lens[:, None], gather_slots, 0)
        rows = torch.arange(q)
        valid_q = rows[None, :] < fb.query_lens[:, None]  # [B, Q]
        qpos = (fb.context_lens - fb.query_lens)[:, None] + rows[None, :]
        qpos = torch.where(valid_q, qpos, -1)
        mask = ctx[None, None, :] <= qpos[:, :, None]  # causal; padding rows (qpos = -1) see nothing
        mask[:, :, 0] |= ~valid_q  # padding rows attend to slot 0 so SDPA never returns NaN for them
        if q == 1 and fb.num_tokens == b:
            scatter = None
        else:
            offsets = torch.cumsum(fb.query_lens, 0) - fb.query_lens
            seq = torch.repeat_interleave(torch.arange(b), fb.query_lens)
            scatter = seq * q + (torch.arange(fb.num_tokens) - offsets[seq])
        meta = cls(fb.slot_mapping, gather_slots, scatter, b, q, qpos, ctx, mask[:, None])
        for window in windows:  # built up front: a compiled forward must find them ready
            meta.mask(window)
        return meta

    def mask(self, window: int | None) -> torch.Tensor:
        if window is None:
            return self.base_mask
        if window not in self._window_masks:
            near = (self.query_positions[:, :, None] - self.context_positions[None, None, :]) < window
            self._window_masks[window] = self.base_mask & near[:, None]
        return self._window_masks[window]


@torch.library.custom_op("turbofan::paged_attention", mutates_args=("k_cache", "v_cache"))
def _paged_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    gather_slots: torch.Tensor,
    mask: torch.Tensor,
    query_scatter: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    k_cache.index_copy_(0, slot_mapping, k)
    v_cache.index_copy_(0, slot_mapping, v)
    b, qlen = mask.shape[0], mask.shape[2]
    t, h, d = q.shape
    if query_scatter is None:
        qp = q.view(b, 1, h, d)
    else:
        qp = q.new_zeros(b * qlen, h, d).index_copy_(0, query_scatter, q).view(b, qlen, h, d)
    keys = k_cache[gather_slots].transpose(1, 2)  # [B, KVH, C, D]
    values = v_cache[gather_slots].transpose(1, 2)
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), keys, values, attn_mask=mask, scale=scale, enable_gqa=h != keys.shape[1]
    )
    out = out.transpose(1, 2).reshape(b * qlen, h, d)
    return out if query_scatter is None else out.index_select(0, query_scatter)


@_paged_attention_op.register_fake
def _(q, k, v, k_cache, v_cache, slot_mapping, gather_slots, mask, query_scatter, scale):
    return torch.empty_like(q)


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KVH, D]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [S, KVH, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Write this step's keys/values into their slots, then attend over each sequence's paged context.

    A custom op, so that a compiled forward (the optimising tier) keeps it as one opaque call whose context
    length may vary without recompiling.
    """
    return _paged_attention_op(
        q, k, v, k_cache, v_cache, meta.slot_mapping, meta.gather_slots, meta.mask(window), meta.query_scatter, scale
    )


def dense_reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None = None
) -> torch.Tensor:
    """Textbook causal attention over one contiguous sequence ([L, H, D]); the yardstick for the paged kernel."""
    length, h, _ = q.shape
    groups = h // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    pos = torch.arange(length)
    allowed = pos[None, :] <= pos[:, None]
    if window is not None:
        allowed &= (pos[:, None] - pos[None, :]) < window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
