"""Low-bit weights: which linear layers are served in 4 or 8 bits, and the object that runs them.

`--quantization` (EngineConfig.quantization):
- `auto` (default): a GGUF model keeps each matrix close to the file's own precision — 4-bit types (Q4_0, Q4_1,
  Q4_K, ...) become turbofan's 4-bit blocks, 5- to 8-bit types (Q5_x, Q6_K, Q8_0) its 8-bit blocks, float matrices
  stay float32; the token embedding and the LM head too (the embedding lookup dequantizes only the rows it needs).
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
from turbofan.kernels.quant import BLOCK, QuantizedWeight, dequantize, dequantize_rows, quantizable, quantize
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


def _bits_of(types: set[str]) -> int | None:
    """The block format for a matrix fused from GGUF tensors of these types: the most precise part decides."""
    if not types or types - GGUF_4BIT - GGUF_8BIT:
        return None  # a float part (or a type we do not know): keep float32
    return 8 if types & GGUF_8BIT else 4


def is_matrix(target: str) -> bool:
    """A parameter the plan may quantize: a layer's linear weights, the LM head, the token embedding."""
    return target in ("lm_head", "embed") or target.rsplit(".", 1)[-1] in LAYER_MATRICES


def plan_for(mode: str, checkpoint: Checkpoint) -> dict[str, int]:
    """{parameter name: bits} for `--quantization mode`. A tied LM head is the embedding: `embed`'s entry is
    its format."""
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
        plan = {name: bits for name, parts in types.items() if (bits := _bits_of(parts))}
        if tied and "embed" in plan:
            plan["lm_head"] = plan["embed"]
        return plan
    bits = 8 if mode == "int8" else 4
    head = 4 if mode == "int4_all" else 8
    plan = {name: bits for name in types if name not in ("lm_head", "embed")}
    plan["lm_head"] = plan["embed"] = head
    return plan


def planned_bytes(checkpoint: Checkpoint, plan: dict[str, int], float_bytes: int = 4) -> int:
    """What the weights will take once loaded under `plan` (the preflight's number): q4 blocks of 32 cost 20 bytes,
    q8 blocks 38 (codes, float16 scale, int32 code sum), float weights `float_bytes` a value. A tied head is free."""
    total = 0
    for ref in checkpoint.refs:
        n = 1
        for d in ref.shape:
            n *= d
        bits = plan.get(ref.target)
        if bits and len(ref.shape) == 2 and ref.shape[-1] % BLOCK == 0:
            total += n // BLOCK * (20 if bits == 4 else 38)
        else:
            total += n * float_bytes
    return total


def quantize_model(model: CausalLM, plan: dict[str, int]) -> str:
    """Swap the planned float matrices of a loaded model for QuantLinear objects (the tensor-parallel path, which
    shards float weights first); returns a label of what is served ("q4: 120, q8: 31")."""
    if plan and next(iter(model.parameters())).device.type != "cpu":
        raise ValueError("turbofan's low-bit kernels are for the CPU; on a GPU pass --quantization none")
    counts: Counter[str] = Counter()
    for name, bits in plan.items():
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
