"""The decoder-only transformer shared by every supported architecture, written for a flat token batch.

Weights are plain tensors with q/k/v and gate/up fused at load time (one matmul each instead of three and two).
Architectures differ only through ModelArgs: biases, q/k norms, Gemma's scaled embeddings and sandwich norms,
per-layer rope and sliding windows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from turbofan.model.args import ModelArgs
from turbofan.model.attention import AttentionMetadata, paged_attention


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for float weights; a quantized weight object (model/quant.py) is called instead."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    return weight(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF-convention rotary embedding (halves, not interleaved pairs)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, index: int):
        super().__init__()
        self.args = args
        self.window = args.sliding_window[index] if args.sliding_window else None
        self.rope_key = index
        h, d, kv = args.num_heads, args.head_dim, args.num_kv_heads
        self.q_size, self.kv_size = h * d, kv * d
        empty = torch.empty(0)
        self.qkv_weight = nn.Parameter(empty, requires_grad=False)
        self.qkv_bias: nn.Parameter | None = nn.Parameter(empty, requires_grad=False) if args.attention_bias else None
        self.o_weight = nn.Parameter(empty, requires_grad=False)
        self.gate_up_weight = nn.Parameter(empty, requires_grad=False)
        self.down_weight = nn.Parameter(empty, requires_grad=False)
        self.input_norm = nn.Parameter(empty, requires_grad=False)
        self.pre_mlp_norm = nn.Parameter(empty, requires_grad=False)
        self.post_attn_norm = nn.Parameter(empty, requires_grad=False) if args.sandwich_norms else None
        self.post_mlp_norm = nn.Parameter(empty, requires_grad=False) if args.sandwich_norms else None
        self.q_norm = nn.Parameter(empty, requires_grad=False) if args.qk_norm else None
        self.k_norm = nn.Parameter(empty, requires_grad=False) if args.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        a = self.args
        t = x.shape[0]
        h = rms_norm(x, self.input_norm, a.rms_norm_eps)
        qkv = linear(h, self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, a.num_heads, a.head_dim)
        k = k.reshape(t, a.num_kv_heads, a.head_dim)
        v = v.reshape(t, a.num_kv_heads, a.head_dim)
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm, a.rms_norm_eps)
            k = rms_norm(k, self.k_norm, a.rms_norm_eps)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        o = paged_attention(q, k, v, k_cache, v_cache, meta, a.scale, self.window)
        o = linear(o.reshape(t, self.q_size), self.o_weight)
        if self.post_attn_norm is not None:
            o = rms_norm(o, self.post_attn_norm, a.rms_norm_eps)
        x = x + o
        h = rms_norm(x, self.pre_mlp_norm, a.rms_norm_eps)
        gate, up = linear(h, self.gate_up_weight).chunk(2, dim=-1)
        act = F.silu(gate) if a.hidden_act == "silu" else F.gelu(gate, approximate="tanh")
        m = linear(act * up, self.down_weight)
        if self.post_mlp_norm is not None:
            m = rms_norm(m, self.post_mlp_norm, a.rms_norm_eps)
        return x + m


class CausalLM(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        empty = torch.empty(0)
        self.embed = nn.Parameter(empty, requires_grad=False)
        self.final_norm = nn.Parameter(empty, requires_grad=False)
        self.lm_head = nn.Parameter(empty, requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        # Layers that share rope parameters share one cos/sin computation per step.
        self.rope_groups: list[tuple[torch.Tensor, list[int]]] = []
        for i, rope in enumerate(args.rope):
            for _inv, members in self.rope_groups:
                if args.rope[members[0]] == rope:
                    members.append(i)
                    break
            else:
                inv = torch.tensor(rope.inv_freq(args.head_dim), dtype=torch.float32)
                self.rope_groups.append((inv, [i]))

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Runs the flat batch through every layer and returns the final hidden states [T, hidden]."""
        x = F.embedding(input_ids, self.embed)
        if self.args.embed_scale != 1.0:
            x = x * torch.tensor(self.args.embed_scale, dtype=x.dtype)
        rope_of_layer: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for inv, members in self.rope_groups:
            freqs = positions.to(torch.float32)[:, None] * inv[None, :]
            emb = freqs.cos().to(x.dtype)[:, None, :], freqs.sin().to(x.dtype)[:, None, :]
            rope_of_layer.update(dict.fromkeys(members, emb))
        for i, layer in enumerate(self.layers):
            cos, sin = rope_of_layer[i]
            x = layer(x, cos, sin, kv_cache[i, 0], kv_cache[i, 1], meta)
        return rms_norm(x, self.final_norm, self.args.rms_norm_eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.lm_head).float()
        cap = self.args.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
