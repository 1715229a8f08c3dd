"""Paged attention: a C++ kernel that reads the paged KV cache in place, and a plain-PyTorch fallback.

The KV cache of a layer is a flat array of slots ([num_blocks * block_size, kv_heads, head_dim]); a sequence's
context is wherever its block table points. Each step writes its new keys/values into their slots, then every
query row attends over its own sequence's context (causal, optionally within a sliding window).

- The kernel (turbofan::paged_attention_varlen, turbofan/kernels/paged_attention.cpp) walks each sequence's
  block table itself: no padded copy, online softmax in float32, GQA without repeating K/V, one op for any mix
  of decode rows and prefill chunks. Used whenever the kernels are available, q is float32 and the cache is
  float32 or float16 (a float16 cache: k/v rounded on write, rows widened to float32 on read, math in float32).
- The fallback gathers every sequence's context into a padded [batch, context, ...] copy once per layer and runs
  one SDPA call with a mask that encodes causality, padding and the sliding window (kept for machines without a
  compiler and for other dtypes). It serves a cache of any dtype: k/v are converted to the cache's dtype on
  write and the gathered context back to q's dtype, so a float16 cache asked for explicitly (--kv-cache-dtype
  float16) still works without a compiler, with the same rounding as the kernel, only slower.

Everything per step (the query offsets for the kernel; the gather indices and masks for the fallback) is built
once in AttentionMetadata and shared by all layers. Both paths are one opaque op, so a compiled forward (the
optimising tier) keeps the context length symbolic.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from turbofan import kernels
from turbofan.kernels import attention as attention_kernel
from turbofan.model.batch import ForwardBatch


@dataclass
class DenseMetadata:
    """The fallback's per-step tensors: the padded [B, C] gather and its masks."""

    gather_slots: torch.Tensor  # [B, C]: cache slot of each context position (0 where padded)
    query_scatter: torch.Tensor | None  # [T]: row of each flat query in the padded [B * Q] layout; None if identity
    batch: int
    max_query: int
    query_positions: torch.Tensor  # [B, Q]: absolute position of each padded query row (-1 = padding)
    context_positions: torch.Tensor  # [C]
    base_mask: torch.Tensor  # [B, 1, Q, C] causal + padding
    window_masks: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        query_lens: torch.Tensor,
        context_lens: torch.Tensor,
        block_tables: torch.Tensor,
        block_size: int,
        num_tokens: int,
        windows: tuple[int, ...] = (),
    ) -> DenseMetadata:
        b = query_lens.shape[0]
        q = int(query_lens.max())
        c = int(context_lens.max())
        dev = query_lens.device  # the runner's device: every tensor built here follows it
        ctx = torch.arange(c, device=dev)
        blocks = block_tables.gather(1, (ctx // block_size).expand(b, c).clamp(max=block_tables.shape[1] - 1))
        gather_slots = blocks * block_size + ctx % block_size
        gather_slots = torch.where(ctx[None, :] < context_lens[:, None], gather_slots, 0)
        rows = torch.arange(q, device=dev)
        valid_q = rows[None, :] < query_lens[:, None]  # [B, Q]
        qpos = (context_lens - query_lens)[:, None] + rows[None, :]
        qpos = torch.where(valid_q, qpos, -1)
        mask = ctx[None, None, :] <= qpos[:, :, None]  # causal; padding rows (qpos = -1) see nothing
        mask[:, :, 0] |= ~valid_q  # padding rows attend to slot 0 so SDPA never returns NaN for them
        if q == 1 and num_tokens == b:
            scatter = None
        else:
            offsets = torch.cumsum(query_lens, 0) - query_lens
            seq = torch.repeat_interleave(torch.arange(b, device=dev), query_lens)
            scatter = seq * q + (torch.arange(num_tokens, device=dev) - offsets[seq])
        dense = cls(gather_slots, scatter, b, q, qpos, ctx, mask[:, None])
        for window in windows:  # built up front: a compiled forward must find them ready
            dense.mask(window)
        return dense

    def mask(self, window: int | None) -> torch.Tensor:
        if window is None:
            return self.base_mask
        if window not in self.window_masks:
            near = (self.query_positions[:, :, None] - self.context_positions[None, None, :]) < window
            self.window_masks[window] = self.base_mask & near[:, None]
        return self.window_masks[window]


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T]
    block_tables: torch.Tensor  # [B, W >= 2]; W follows the longest context (dynamic in compiled graphs)
    query_start_loc: torch.Tensor  # [B + 1]: sequence b owns flat rows query_start_loc[b]:query_start_loc[b+1]
    context_lens: torch.Tensor  # [B]: tokens in the cache per sequence after this step
    query_lens: torch.Tensor  # [B]
    block_size: int
    num_tokens: int
    use_kernel: bool  # the C++ kernel serves float32 / float16 caches; other dtypes take the fallback
    windows: tuple[int, ...] = ()
    prompt_lens: torch.Tensor | None = None  # [B]: rows from these positions on are generated tokens (the kernel's)
    _dense: DenseMetadata | None = None

    @classmethod
    def from_batch(cls, fb: ForwardBatch, windows: tuple[int, ...] = ()) -> AttentionMetadata:
        use_kernel = kernels.available()
        tables = fb.block_tables
        if tables.shape[1] < 2:  # a width of 1 would be specialised by torch.compile instead of kept symbolic
            tables = F.pad(tables, (0, 2 - tables.shape[1]))
        meta = cls(
            slot_mapping=fb.slot_mapping,
            block_tables=tables,
            query_start_loc=F.pad(torch.cumsum(fb.query_lens, 0), (1, 0)),
            context_lens=fb.context_lens,
            query_lens=fb.query_lens,
            block_size=fb.block_size,
            num_tokens=fb.num_tokens,
            use_kernel=use_kernel,
            windows=tuple(windows),
            prompt_lens=fb.prompt_lens,
        )
        if use_kernel and "torch._dynamo" in sys.modules:
            # The only context-length-dependent shape the kernel sees; one compiled entry serves every length.
            # Only once the compiled tier has loaded Dynamo: importing it here cost the first request 2 s.
            torch._dynamo.maybe_mark_dynamic(tables, 1)
        else:
            meta.dense  # noqa: B018  (built now: a compiled forward must find it ready)
        return meta

    def mark_dynamic(self) -> None:
        """Keep every context-length-dependent size symbolic for torch.compile (one compile for all lengths).

        The kernel sees only the block-table width (from_batch marks it already); the fallback's [B, C] gather
        and masks are marked only if this step built them, so calling this never builds them.
        """
        torch._dynamo.maybe_mark_dynamic(self.block_tables, 1)
        if self._dense is not None:
            torch._dynamo.mark_dynamic(self._dense.gather_slots, 1)
            torch._dynamo.mark_dynamic(self._dense.context_positions, 0)
            for mask in (self._dense.base_mask, *self._dense.window_masks.values()):
                torch._dynamo.mark_dynamic(mask, 3)

    @property
    def dense(self) -> DenseMetadata:
        """The fallback's tensors, built on first use (once per step, shared by all layers)."""
        if self._dense is None:
            self._dense = DenseMetadata.build(
                self.query_lens, self.context_lens, self.block_tables, self.block_size, self.num_tokens, self.windows
            )
        return self._dense

    # The fallback's fields under their old names (the compiled tier marks some of them dynamic).
    @property
    def gather_slots(self) -> torch.Tensor:
        return self.dense.gather_slots

    @property
    def query_scatter(self) -> torch.Tensor | None:
        return self.dense.query_scatter

    @property
    def batch(self) -> int:
        return self.query_lens.shape[0]

    @property
    def max_query(self) -> int:
        return self.dense.max_query

    @property
    def query_positions(self) -> torch.Tensor:
        return self.dense.query_positions

    @property
    def context_positions(self) -> torch.Tensor:
        return self.dense.context_positions

    @property
    def base_mask(self) -> torch.Tensor:
        return self.dense.base_mask

    @property
    def _window_masks(self) -> dict[int, torch.Tensor]:
        return self.dense.window_masks

    def mask(self, window: int | None) -> torch.Tensor:
        return self.dense.mask(window)


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
    k_cache.index_copy_(0, slot_mapping, k.to(k_cache.dtype))  # (no-ops when the dtypes agree)
    v_cache.index_copy_(0, slot_mapping, v.to(v_cache.dtype))
    b, qlen = mask.shape[0], mask.shape[2]
    t, h, d = q.shape
    if query_scatter is None:
        qp = q.view(b, 1, h, d)
    else:
        qp = q.new_zeros(b * qlen, h, d).index_copy_(0, query_scatter, q).view(b, qlen, h, d)
    keys = k_cache[gather_slots].to(q.dtype).transpose(1, 2)  # [B, KVH, C, D], widened from the cache's dtype
    values = v_cache[gather_slots].to(q.dtype).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), keys, values, attn_mask=mask, scale=scale, enable_gqa=h != keys.shape[1]
    )
    out = out.transpose(1, 2).reshape(b * qlen, h, d)
    return out if query_scatter is None else out.index_select(0, query_scatter)


@_paged_attention_op.register_fake
def _(q, k, v, k_cache, v_cache, slot_mapping, gather_slots, mask, query_scatter, scale):
    return torch.empty_like(q)


def sdpa_paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """The fallback: padded gather + one masked SDPA (a custom op, opaque to torch.compile)."""
    dense = meta.dense
    return _paged_attention_op(
        q, k, v, k_cache, v_cache, meta.slot_mapping, dense.gather_slots, dense.mask(window), dense.query_scatter, scale
    )


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
    """Write this step's keys/values into their slots, then attend over each sequence's paged context."""
    if meta.use_kernel and q.dtype == torch.float32 and attention_kernel.supports(k_cache.dtype):
        return attention_kernel.paged_attention_varlen(
            q,
            k,
            v,
            k_cache,
            v_cache,
            meta.slot_mapping,
            meta.block_tables,
            meta.query_start_loc,
            meta.context_lens,
            meta.block_size,
            scale,
            window,
            meta.prompt_lens,
        )
    return sdpa_paged_attention(q, k, v, k_cache, v_cache, meta, scale, window)


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
