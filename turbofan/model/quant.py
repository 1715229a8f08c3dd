"""Low-bit weights: which linear layers are served in 4 or 8 bits, and the object that runs them.

`--quantization` (EngineConfig.quantization):
- `auto` (default): a model converted from GGUF keeps each matrix close to the file's own precision — 4-bit
  types (Q4_0, Q4_1, Q4_K, ...) become turbofan's 4-bit blocks, 5- to 8-bit types (Q5_x, Q6_K, Q8_0) its 8-bit
  blocks, float matrices stay float32. A safetensors model stays float32 (the exact path).
- `int8` / `int4`: every layer matrix in 8 / 4 bits (the LM head in 8 bits), whatever the source.
- `int4_all`: every matrix in 4 bits, the LM head too: the fewest bytes a step reads, for a speculative draft model
  (its guesses are verified by the target, so its rounding costs acceptance, never correctness).
- `none`: float32 everywhere, bit-comparable with transformers (the parity tests use it).
The kernel quantizes activations per row (turbofan/kernels), so outputs stay batch-invariant.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from turbofan import kernels
from turbofan.kernels.quant import QuantizedWeight, dequantize, quantizable, quantize
from turbofan.model.layers import CausalLM

log = logging.getLogger("turbofan.model")

MODES = ("auto", "none", "int8", "int4", "int4_all")
LAYER_MATRICES = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")
# GGUF tensor types by the turbofan block format that holds them without (much) loss.
GGUF_4BIT = {"Q4_0", "Q4_1", "Q4_K", "IQ4_NL", "IQ4_XS", "Q3_K", "Q2_K", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS",
             "IQ2_S", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0"}
GGUF_8BIT = {"Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "Q8_1", "Q8_K"}


class QuantLinear:
    """A block-quantized weight (and bias) called like F.linear. Without the kernels (no compiler) it runs the
    dequantized weight in float32: slower and not the same numbers, but it serves."""

    def __init__(self, weight: torch.Tensor, bits: int, bias: torch.Tensor | None = None):
        self.q: QuantizedWeight = quantize(weight, bits)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.bits = bits
        self.out_features = weight.shape[0]
        self._fallback: torch.Tensor | None = None
        # Bound once: at batch 1 a decode step makes ~120 of these calls, so each Python-level step counts.
        self._op = torch.ops.turbofan.qlinear.default if kernels.available() else None

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


def gguf_plan(model_dir: Path, model: CausalLM) -> dict[str, int]:
    """{parameter name: bits} from the GGUF file a store entry was converted from (empty if there is none)."""
    from turbofan.model.loader import hf_to_ours
    from turbofan.store.gguf_reader import GGUFFile
    from turbofan.store.gguf_tensors import hf_tensor_name

    try:
        meta = json.loads((model_dir / "turbofan.json").read_text())
    except (OSError, ValueError):
        return {}
    original = meta.get("original_file") if meta.get("format") == "gguf" else None
    if not original or not (model_dir / original).is_file():
        return {}
    import gguf

    gf = GGUFFile(model_dir / original)
    types: dict[str, set[str]] = {}
    for info in gf.tensors:
        hf = hf_tensor_name(info.name, gf.architecture)
        target = hf_to_ours(hf, model.args)[0] if hf else ""
        if target:
            types.setdefault(target, set()).add(gguf.GGMLQuantizationType(info.ggml_type).name)
    if "lm_head" not in types and "embed" in types:  # tied: the head is the embedding matrix
        types["lm_head"] = types["embed"]
    plan = {}
    for name, parts in types.items():
        if name == "lm_head" or name.rsplit(".", 1)[-1] in LAYER_MATRICES:
            bits = _bits_of(parts)
            if bits:
                plan[name] = bits
    return plan


def plan_for(mode: str, model_dir: Path, model: CausalLM) -> dict[str, int]:
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; turbofan supports: {', '.join(MODES)}")
    if mode == "none":
        return {}
    if mode == "auto":
        return gguf_plan(model_dir, model)
    bits = 8 if mode == "int8" else 4
    plan = {f"layers.{i}.{m}": bits for i in range(len(model.layers)) for m in LAYER_MATRICES}
    plan["lm_head"] = 4 if mode == "int4_all" else 8
    return plan


def quantize_model(model: CausalLM, plan: dict[str, int]) -> str:
    """Swap the planned matrices for QuantLinear objects; returns a label of what is served ("q4: 120, q8: 31")."""
    if plan and next(iter(model.parameters())).device.type != "cpu":
        raise ValueError("turbofan's low-bit kernels are for the CPU; on a GPU pass --quantization none")
    counts: Counter[str] = Counter()
    for name, bits in plan.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        weight = getattr(owner, attr)
        if not isinstance(weight, torch.Tensor) or not quantizable(weight):
            counts["float"] += 1
            continue
        bias = owner.qkv_bias if attr == "qkv_weight" else None
        delattr(owner, attr)  # a Parameter: drop it before setting a plain attribute of the same name
        setattr(owner, attr, QuantLinear(weight, bits, bias))
        if bias is not None:
            del owner.qkv_bias
            owner.qkv_bias = None
        counts[f"q{bits}"] += 1
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "float32"
