"""Builds a CausalLM from a model directory: a store entry's GGUF or an HF safetensors directory. Never loads
pickles.

Tensors are read one at a time, each straight into the form the quantization plan serves it in (model/quant.py):
a planned matrix becomes a QuantLinear repacked from the file's blocks (model/gguf_repack.py) or quantized from its
float values, everything else a float tensor in the model's dtype. Peak memory is the served model plus one tensor.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from turbofan.kernels.quant import PANEL, QuantizedWeight, allocate, quantizable
from turbofan.model.checkpoint import Checkpoint, TensorRef, open_checkpoint, read_config
from turbofan.model.layers import CausalLM
from turbofan.model.quant import QuantLinear, plan_for

log = logging.getLogger("turbofan.model")

__all__ = ["load_model", "read_config"]

FUSED_ORDER = {"qkv_weight": ("q", "k", "v"), "qkv_bias": ("q", "k", "v"), "gate_up_weight": ("gate", "up")}
NORMS = ("input_norm", "pre_mlp_norm", "post_attn_norm", "post_mlp_norm", "q_norm", "k_norm", "final_norm")


def _grouped(checkpoint: Checkpoint) -> dict[str, list[TensorRef]]:
    """Each parameter's stored parts, in fused order."""
    groups: dict[str, list[TensorRef]] = {}
    for ref in checkpoint.refs:
        groups.setdefault(ref.target, []).append(ref)
    for target, refs in groups.items():
        order = FUSED_ORDER.get(target.rsplit(".", 1)[-1])
        if order is None:
            if len(refs) != 1:
                raise ValueError(f"checkpoint in {checkpoint.path} holds {len(refs)} tensors for {target}")
            continue
        slots = {r.slot: r for r in refs}
        missing = [s for s in order if s not in slots]
        if missing:
            raise ValueError(f"checkpoint is missing {target} parts {missing}")
        groups[target] = [slots[s] for s in order]
    return groups


def _quantizable(refs: list[TensorRef]) -> bool:
    return all(len(r.shape) == 2 and quantizable(torch.empty(r.shape, device="meta")) for r in refs)


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


@contextmanager
def transients_returned() -> Iterator[None]:
    """While loading, allocations of 256 KiB and more are mapped and unmapped one by one, so each slice read and
    repacked goes back to the OS when dropped instead of staying in the heap beside the weights (glibc raises its
    threshold to 32 MiB as big blocks are freed, and then keeps them: ~100 MiB more peak RSS on a 7B). After the
    load the threshold is 32 MiB again (the dynamic one's ceiling), so steps allocate as before. No-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 256 << 10)
    except (OSError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)


def _quantized(checkpoint: Checkpoint, refs: list[TensorRef], fmt: str) -> QuantizedWeight:
    """One matrix in format `fmt`; a fused one (q/k/v, gate/up) filled part by part into its final buffer, so the
    parts never coexist with their concatenation."""
    if len(refs) == 1:
        return checkpoint.quantized(refs[0], fmt)
    out = allocate(sum(r.shape[0] for r in refs), refs[0].shape[1], fmt)
    first = 0
    for ref in refs:
        out.assign_panels(first, checkpoint.quantized(ref, fmt))
        first += ref.shape[0] // PANEL
    return out


def _set(model: CausalLM, name: str, value) -> None:
    """Install a loaded value: a float tensor into its Parameter, a QuantLinear in place of the Parameter."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if isinstance(value, torch.Tensor):
        getattr(owner, attr).data = value
        return
    delattr(owner, attr)  # a Parameter: drop it before setting a plain attribute of the same name
    setattr(owner, attr, value)


def _load_tensor(model: CausalLM, checkpoint: Checkpoint, target: str, refs: list[TensorRef], fmt: str | None,
                 dtype: torch.dtype, device: str) -> str:  # fmt: skip
    """Read one parameter in the form the plan wants and install it; returns what it became for the label
    ("q4k", "float" for a planned matrix the kernels cannot take, "" for a plain float tensor)."""
    if fmt and _quantizable(refs):
        _set(model, target, QuantLinear(_quantized(checkpoint, refs, fmt)))
        return fmt
    parts = [checkpoint.float(r) for r in refs]
    t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if target.rsplit(".", 1)[-1] in NORMS and model.args.norm_offset:
        t = t.float() + model.args.norm_offset
    _set(model, target, t.to(device=device, dtype=dtype).contiguous())
    return "float" if fmt else ""


def load_model(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu", quantization: str = "none"
) -> CausalLM:
    """The model of `path` with its matrices served as `--quantization` plans (model/quant.py). `model.weights`
    says what is served: "float32" or e.g. "q4: 90, q8: 31"."""
    path = Path(path)
    start = time.perf_counter()
    checkpoint = open_checkpoint(path)
    args = checkpoint.args
    plan = plan_for(quantization, checkpoint)
    if plan and torch.device(device).type != "cpu":
        raise ValueError("turbofan's low-bit kernels are for the CPU; on a GPU pass --quantization none")
    model = CausalLM(args)
    groups = _grouped(checkpoint)
    tied = "lm_head" not in groups
    expected = {n for n, _ in model.named_parameters(remove_duplicate=False)} - ({"lm_head"} if tied else set())
    missing = sorted(expected - set(groups))
    if missing:
        raise ValueError(f"checkpoint in {path} is missing tensors for: {', '.join(missing[:8])}")
    counts: Counter[str] = Counter()
    with transients_returned():
        for target, refs in groups.items():
            if target in expected:
                counts[_load_tensor(model, checkpoint, target, refs, plan.get(target), dtype, device)] += 1
    counts.pop("", None)
    if tied:
        _set(model, "lm_head", model.embed if isinstance(model.embed, QuantLinear) else model.embed.data)
    for layer in model.layers:  # a quantized qkv carries its bias (the kernel adds it)
        if isinstance(layer.qkv_weight, QuantLinear) and layer.qkv_bias is not None:
            layer.qkv_weight.bias = layer.qkv_bias.detach().float().contiguous()
            del layer.qkv_bias
            layer.qkv_bias = None
    model.weights = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "float32"
    log.info(
        "loaded weights",
        extra={"path": str(path), "architecture": args.architecture, "format": checkpoint.format,
               "weights": model.weights, "seconds": round(time.perf_counter() - start, 2)},
    )
    return model.eval()
