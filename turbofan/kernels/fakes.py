"""Shape-only versions of the kernel ops, so torch.compile can trace through them (imported after loading)."""

from __future__ import annotations

import torch


@torch.library.register_fake("turbofan::qlinear")
def _qlinear_fake(x, qweight, scales, mins, wsum, bias):
    return x.new_empty((x.shape[0], qweight.shape[0] * 16), dtype=torch.float32)


@torch.library.register_fake("turbofan::paged_attention_varlen")
def _paged_attention_varlen(
    q, k, v, k_cache, v_cache, slot_mapping, block_tables, query_start_loc, context_lens, block_size, scale, window,
    prompt_lens=None,
):
    return q.new_empty(q.shape)


@torch.library.register_fake("turbofan::rms_norm")
def _rms_norm_fake(x, weight, eps):
    return torch.empty_like(x)


@torch.library.register_fake("turbofan::add_rms_norm")
def _add_rms_norm_fake(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.register_fake("turbofan::rope")
def _rope_fake(x, cos, sin):
    return x.new_empty(x.shape)


@torch.library.register_fake("turbofan::gated_act")
def _gated_act_fake(gate_up, gelu):
    return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))


@torch.library.register_fake("turbofan::qkv_rope")
def _qkv_rope_fake(qkv, cos, sin, heads, kv_heads, q_norm, k_norm, eps):
    t = qkv.shape[0]
    d = qkv.shape[1] // (heads + 2 * kv_heads)
    return qkv.new_empty((t, heads, d)), qkv.new_empty((t, kv_heads, d)), qkv.new_empty((t, kv_heads, d))


@torch.library.register_fake("turbofan::argmax_rows")
def _argmax_rows_fake(x):
    return x.new_empty((x.shape[0],), dtype=torch.long)
