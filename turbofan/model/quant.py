"""Low-bit weights: which linear layers are served in 4 or 8 bits, and the object that runs them.

`--quantization` (EngineConfig.quantization):
- `auto` (default): a GGUF model keeps each matrix at the file's own precision — Q4_K and Q6_K tensors in
  turbofan's K formats (the file's blocks, exactly), other 4-bit types (Q4_0, Q4_1, ...) in its 4-bit blocks,
  a matrix fused from Q4_K and Q6_K parts (q/k/v of a Q4_K_M file's "more bits" layers) in q6k (the Q4_K parts
  re-quantized to its grid), other 5- to 8-bit types (Q5_x, Q8_0) and other mixtures in its 8-bit blocks, float
  matrices float32; the token embedding and the LM head too (the embedding lookup dequantizes
  only the rows it needs).
  A safetensors model stays float32 (the exact path).
- `int8` / `int4`: every layer matrix in 8 / 4 bits (the embedding and LM head in 8 bits), whatever the source.
- `int4_all`: every matrix in 4 bits, the LM head too: the fewest bytes a step reads, for a speculative draft model
  (its guesses are verified by the target, so its rounding costs acceptance, never correctness).
- `none`: float32 everywhere, bit-comparable with transformers (the parity tests use it): the only mode that holds
  a float32 copy of a quantized file.
The kernel quantizes activations per row (turbofan/kernels), so outputs stay batch-invariant.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from turbofan import kernels
from turbofan.kernels.quant import (
    BITS,
    BLOCK,
    QuantizedWeight,
    dequantize,
    dequantize_rows,
    quantizable,
    quantize,
)
from turbofan.model.layers import CausalLM

if TYPE_CHECKING:
    from turbofan.model.checkpoint import Checkpoint

log = logging.getLogger("turbofan.model")

MODES = ("auto", "none", "int8", "int4", "int4_all")
LAYER_MATRICES = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")
# GGUF tensor types by the turbofan block format that holds them without (much) loss.
GGUF_4BIT = {"Q4_0", "Q4_1", "Q4_K", "IQ4_NL", "IQ4_XS", "Q3_K", "Q2_K", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS",
             "IQ2_S", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0"}
GGUF_8BIT = {"Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "Q8_1", "Q8_K"}


class QuantLinear:
    """A block-quantized weight (and bias) called like F.linear; `rows(ids)` is the embedding lookup of the same
    matrix (a tied embedding and LM head are one object). Without the kernels (no compiler) it runs the
    dequantized weight in float32: slower and not the same numbers, but it serves."""

    def __init__(self, q: QuantizedWeight, bias: torch.Tensor | None = None):
        self.q = q
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.bits = q.bits
        self.out_features = q.shape[0]
        self._fallback: torch.Tensor | None = None
        # Bound once: at batch 1 a decode step makes ~120 of these calls, so each Python-level step counts.
        self._op = torch.ops.turbofan.qlinear.default if kernels.available() else None

    @classmethod
    def of(cls, weight: torch.Tensor, bits: int, bias: torch.Tensor | None = None) -> QuantLinear:
        """Quantize a float weight."""
        return cls(quantize(weight, bits), bias)

    @property
    def fmt(self) -> str:
        return self.q.fmt

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + (0 if self.bias is None else self.bias.numel() * 4)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight in float32: a quantized embedding table's lookup."""
        return dequantize_rows(self.q, ids).reshape(*ids.shape, -1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q
        if self._op is not None and x.dim() == 2:
            return self._op(x, q.qweight, q.scales, q.mins, q.wsum, self.bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self._op is not None:
            out = self._op(x2, q.qweight, q.scales, q.mins, q.wsum, self.bias)
        else:
            if self._fallback is None:
                self._fallback = dequantize(q)
            out = F.linear(x2.float(), self._fallback, self.bias)
        return out.reshape(*shape[:-1], self.out_features)


def _format_of(types: set[str]) -> str | None:
    """The block format for a matrix fused from GGUF tensors of these types: a lone Q4_K or Q6_K keeps its own
    blocks (q4k, q6k); otherwise the most precise part decides between q4 and q8."""
    if not types or types - GGUF_4BIT - GGUF_8BIT:
        return None  # a float part (or a type we do not know): keep float32
    if types == {"Q4_K"}:
        return "q4k"
    if types in ({"Q6_K"}, {"Q4_K", "Q6_K"}):  # the Q4_K parts of a mixed fusion take Q6_K's grid
        return "q6k"
    return "q8" if types & GGUF_8BIT else "q4"


def is_matrix(target: str) -> bool:
    """A parameter the plan may quantize: a layer's linear weights, the LM head, the token embedding."""
    return target in ("lm_head", "embed") or target.rsplit(".", 1)[-1] in LAYER_MATRICES


def plan_for(mode: str, checkpoint: Checkpoint) -> dict[str, str]:
    """{parameter name: format (q4, q8, q4k, q6k)} for `--quantization mode`. A tied LM head is the embedding:
    `embed`'s entry is its format."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; turbofan supports: {', '.join(MODES)}")
    if mode == "none":
        return {}
    types: dict[str, set[str]] = {}
    for ref in checkpoint.refs:
        if is_matrix(ref.target):
            types.setdefault(ref.target, set()).add(ref.type_name)
    tied = "lm_head" not in types
    if mode == "auto":
        if checkpoint.format != "gguf":
            return {}
        plan = {name: fmt for name, parts in types.items() if (fmt := _format_of(parts))}
        if tied and "embed" in plan:
            plan["lm_head"] = plan["embed"]
        return plan
    bits = "q8" if mode == "int8" else "q4"
    head = "q4" if mode == "int4_all" else "q8"
    plan = {name: bits for name in types if name not in ("lm_head", "embed")}
    plan["lm_head"] = plan["embed"] = head
    return plan


# bytes of one block of 32 weights in each format (codes and scales; q8 with its int32 code sum)
BLOCK_BYTES = {"q4": 20.0, "q8": 38.0, "q4k": 18.5, "q6k": 26.25}


def planned_bytes(checkpoint: Checkpoint, plan: dict[str, str], float_bytes: int = 4) -> int:
    """What the weights will take once loaded under `plan` (the preflight's number): a block of 32 weights costs
    BLOCK_BYTES of its format, a float weight `float_bytes` a value. A tied head is free."""
    total = 0
    for ref in checkpoint.refs:
        n = 1
        for d in ref.shape:
            n *= d
        fmt = plan.get(ref.target)
        if fmt and len(ref.shape) == 2 and ref.shape[-1] % BLOCK == 0:
            total += int(n // BLOCK * BLOCK_BYTES[fmt])
        else:
            total += n * float_bytes
    return total


def quantize_model(model: CausalLM, plan: dict[str, str]) -> str:
    """Swap the planned float matrices of a loaded model for QuantLinear objects (the tensor-parallel path, which
    shards float weights first); returns a label of what is served ("q4: 120, q8: 31")."""
    if plan and next(iter(model.parameters())).device.type != "cpu":
        raise ValueError("turbofan's low-bit kernels are for the CPU; on a GPU pass --quantization none")
    counts: Counter[str] = Counter()
    for name, fmt in plan.items():
        bits = 4 if BITS[fmt] == 4 else 8  # from float weights: q4 or q8 (the K formats are a GGUF file's own)
        if name == "embed":
            continue  # the sharded embedding stays a tensor: the vocabulary-parallel lookup indexes it
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        weight = getattr(owner, attr)
        if not isinstance(weight, torch.Tensor) or not quantizable(weight):
            counts["float"] += 1
            continue
        bias = owner.qkv_bias if attr == "qkv_weight" else None
        delattr(owner, attr)  # a Parameter: drop it before setting a plain attribute of the same name
        setattr(owner, attr, QuantLinear.of(weight, bits, bias))
        if bias is not None:
            del owner.qkv_bias
            owner.qkv_bias = None
        counts[f"q{bits}"] += 1
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "float32"
