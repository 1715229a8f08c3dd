"""The decoder-only transformer shared by every supported architecture, written for a flat token batch.

Weights are plain tensors with q/k/v and gate/up fused at load time (one matmul each instead of three and two).
Architectures differ only through ModelArgs: biases, q/k norms, Gemma's scaled embeddings and sandwich norms,
per-layer rope and sliding windows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from turbofan import kernels
from turbofan.model.args import ModelArgs
from turbofan.model.attention import AttentionMetadata, paged_attention


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for float weights; a quantized weight object (model/quant.py) is called instead."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    return weight(x)


def use_fused_ops() -> bool:
    """The own fused ops (turbofan/kernels/fused_ops.cpp) when they compiled and the weights are float32 on CPU;
    decided once per model, so the hot path does not ask again."""
    return kernels.available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fused: bool = False) -> torch.Tensor:
    if fused:
        return torch.ops.turbofan.rms_norm(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, fused: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta)): the residual stream and the next sub-layer's input."""
    if fused:
        return torch.ops.turbofan.add_rms_norm(x, delta, weight, eps)
    x = x + delta
    return x, rms_norm(x, weight, eps)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """HF-convention rotary embedding (halves, not interleaved pairs)."""
    if fused:
        return torch.ops.turbofan.rope(x, cos, sin)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def gated_act(gate_up: torch.Tensor, gelu: bool, fused: bool = False) -> torch.Tensor:
    """act(gate) * up for a fused [T, 2I] gate/up projection (SiLU, or GELU with the tanh approximation)."""
    if fused:
        return torch.ops.turbofan.gated_act(gate_up, gelu)
    gate, up = gate_up.chunk(2, dim=-1)
    return (F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)) * up


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
        self.fused = False  # set by CausalLM.use_fused_ops once the weights are in place
        # Tensor parallelism (turbofan/distributed): sums the row-parallel o/down partial outputs over the ranks.
        self.all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        a, fused, eps = self.args, self.fused, self.args.rms_norm_eps
        t = x.shape[0]
        h = rms_norm(x, self.input_norm, eps, fused)
        qkv = linear(h, self.qkv_weight, self.qkv_bias)
        if fused:  # split, per-head q/k norms and rotary in one op
            q, k, v = torch.ops.turbofan.qkv_rope(
                qkv, cos, sin, a.num_heads, a.num_kv_heads, self.q_norm, self.k_norm, eps
            )
        else:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.reshape(t, a.num_heads, a.head_dim)
            k = k.reshape(t, a.num_kv_heads, a.head_dim)
            v = v.reshape(t, a.num_kv_heads, a.head_dim)
            if self.q_norm is not None:
                q = rms_norm(q, self.q_norm, eps)
                k = rms_norm(k, self.k_norm, eps)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        o = paged_attention(q, k, v, k_cache, v_cache, meta, a.scale, self.window)
        o = linear(o.reshape(t, self.q_size), self.o_weight)
        if self.all_reduce is not None:
            o = self.all_reduce(o)
        if self.post_attn_norm is not None:
            o = rms_norm(o, self.post_attn_norm, eps, fused)
        x, h = add_rms_norm(x, o, self.pre_mlp_norm, eps, fused)
        m = linear(gated_act(linear(h, self.gate_up_weight), a.hidden_act != "silu", fused), self.down_weight)
        if self.all_reduce is not None:
            m = self.all_reduce(m)
        if self.post_mlp_norm is not None:
            m = rms_norm(m, self.post_mlp_norm, eps, fused)
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
        self.fused = False
        # Every layer as one C++ call (turbofan/kernels/decoder_stack.cpp), built by use_fused_ops; None = per layer.
        self.stack = None
        # Tensor parallelism: an object with embed(ids, weight) and gather(logits) over the ranks' vocabulary rows.
        self.vocab_parallel = None
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

    @property
    def cache_kv_heads(self) -> int:
        """KV heads this process keeps in its cache: all of them, or its shard under tensor parallelism."""
        return self.layers[0].args.num_kv_heads if len(self.layers) else self.args.num_kv_heads

    def use_fused_ops(self, on: bool) -> None:
        """Run norms, rotary embedding and gating as the own fused ops (float32 on CPU only)."""
        on = on and self.final_norm.dtype == torch.float32 and self.final_norm.device.type == "cpu"
        self.fused = on
        for layer in self.layers:
            layer.fused = on
        # Tensor parallel layers all-reduce between their matmuls: they stay per layer.
        self.stack = build_stack(self) if on and not any(la.all_reduce for la in self.layers) else None

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Runs the flat batch through every layer and returns the final hidden states [T, hidden]."""
        vp = self.vocab_parallel
        if vp is not None:
            x = vp.embed(input_ids, self.embed)
        elif isinstance(self.embed, torch.Tensor):
            x = F.embedding(input_ids, self.embed)
        else:  # a quantized table (model/quant.py QuantLinear): dequantize only the rows looked up
            x = self.embed.rows(input_ids)
        if self.args.embed_scale != 1.0:
            x = x * torch.tensor(self.args.embed_scale, dtype=x.dtype)
        rope_of_layer: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for inv, members in self.rope_groups:
            freqs = positions.to(torch.float32)[:, None] * inv.to(positions.device)[None, :]
            emb = freqs.cos().to(x.dtype)[:, None, :], freqs.sin().to(x.dtype)[:, None, :]
            rope_of_layer.update(dict.fromkeys(members, emb))
        if self.stack is not None and meta.use_kernel and not torch.compiler.is_compiling():
            x = self.stack.forward(
                x,
                [rope_of_layer[members[0]][0] for _inv, members in self.rope_groups],
                [rope_of_layer[members[0]][1] for _inv, members in self.rope_groups],
                kv_cache,
                meta.slot_mapping,
                meta.block_tables,
                meta.query_start_loc,
                meta.context_lens,
                meta.block_size,
                meta.prompt_lens,
            )
            return rms_norm(x, self.final_norm, self.args.rms_norm_eps, self.fused)
        for i, layer in enumerate(self.layers):
            cos, sin = rope_of_layer[i]
            x = layer(x, cos, sin, kv_cache[i, 0], kv_cache[i, 1], meta)
        return rms_norm(x, self.final_norm, self.args.rms_norm_eps, self.fused)

    def weight_bytes(self) -> dict[str, int]:
        """Resident weight bytes by format ({"q4": ..., "q8": ..., "float32": ...}), a tied matrix counted once:
        what /api/ps, /api/show and the dashboard report."""
        seen: set[int] = set()
        out: dict[str, int] = {}

        def add(value) -> None:
            key = value.data_ptr() if isinstance(value, torch.Tensor) else id(value)
            if value is None or key in seen or (isinstance(value, torch.Tensor) and value.numel() == 0):
                return
            seen.add(key)
            if isinstance(value, torch.Tensor):
                key = str(value.dtype).removeprefix("torch.")
                out[key] = out.get(key, 0) + value.numel() * value.element_size()
            elif hasattr(value, "q"):
                out[value.q.fmt] = out.get(value.q.fmt, 0) + value.nbytes

        for module in self.modules():
            for value in vars(module).values():
                if hasattr(value, "q") and hasattr(value, "bits"):
                    add(value)
            for p in module.parameters(recurse=False):
                add(p)
        return out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.lm_head)
        if self.vocab_parallel is not None:
            logits = self.vocab_parallel.gather(logits)
        logits = logits.float()
        cap = self.args.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def _linear_slots(weight, bias: torch.Tensor | None) -> list[torch.Tensor]:
    """A linear's four DecoderStack slots and its bias: a float weight, or a QuantLinear's codes, scales, mins,
    wsum (its bias lives in the QuantLinear)."""
    none = torch.empty(0)
    if isinstance(weight, torch.Tensor):
        return [weight, none, none, none, none if bias is None else bias]
    q = weight.q
    opt = [none if t is None else t for t in (q.mins, q.wsum, weight.bias)]
    return [q.qweight, q.scales, *opt]


def build_stack(model: CausalLM):
    """The model's layers as one `turbofan::DecoderStack` (the slot order of turbofan/kernels/decoder_stack.cpp),
    or None where the attention kernel would not serve the layers (a KV cache dtype it does not read is checked
    per step through meta.use_kernel; here the head layout)."""
    none = torch.empty(0)
    rope_index = {i: g for g, (_inv, members) in enumerate(model.rope_groups) for i in members}
    weights: list[torch.Tensor] = []
    for la in model.layers:
        qkv = _linear_slots(la.qkv_weight, la.qkv_bias)
        o, gate_up, down = (_linear_slots(w, None)[:4] for w in (la.o_weight, la.gate_up_weight, la.down_weight))
        norms = [none if t is None else t for t in (la.q_norm, la.k_norm)]
        post_attn, post_mlp = (none if t is None else t for t in (la.post_attn_norm, la.post_mlp_norm))
        weights += [la.input_norm, *qkv, *norms, *o, post_attn, la.pre_mlp_norm, *gate_up, *down, post_mlp]
    a = model.layers[0].args if len(model.layers) else model.args
    return torch.classes.turbofan.DecoderStack(
        [w.detach() for w in weights],
        [la.window or 0 for la in model.layers],
        [rope_index[i] for i in range(len(model.layers))],
        a.num_heads,
        a.num_kv_heads,
        float(a.rms_norm_eps),
        float(a.scale),
        a.hidden_act != "silu",
    )
