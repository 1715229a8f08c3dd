"""Where a model's weights come from: a safetensors directory or the GGUF file a store entry keeps.

A checkpoint lists its tensors by turbofan parameter name (`TensorRef`: target, fused slot, type, shape) and hands
out one tensor at a time, either as floats in Hugging Face layout or directly in a quantized kernel format. The
loader asks for each tensor in the form the plan wants and drops what it read before asking for the next, so peak
memory is the model as served plus one tensor: a GGUF is never expanded to float32, a bfloat16 safetensors file
is quantized tensor by tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from turbofan.kernels.quant import BITS, QuantizedWeight, quantize
from turbofan.model.architectures import model_args_from_config
from turbofan.model.args import ModelArgs


@dataclass(frozen=True)
class TensorRef:
    """One stored tensor: `target` is our parameter name, `slot` its part of a fused matrix (q/k/v, gate/up)."""

    source: str  # the name in the file
    target: str
    slot: str | None
    type_name: str  # ggml type (Q4_K, F32 ...) or safetensors dtype (BF16 ...)
    shape: tuple[int, ...]  # torch order


class Checkpoint(Protocol):
    path: Path
    format: str  # "gguf" | "safetensors"
    args: ModelArgs
    refs: list[TensorRef]

    def float(self, ref: TensorRef) -> torch.Tensor:
        """The tensor in Hugging Face layout, in its stored float dtype (a GGUF tensor: float32)."""
        ...

    def quantized(self, ref: TensorRef, fmt: str) -> QuantizedWeight:
        """The tensor in turbofan's block format `fmt` (kernels/quant.py), without materialising more than a slice
        in float32."""
        ...


def read_config(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    if "text_config" in cfg and "num_hidden_layers" not in cfg:  # multimodal wrappers: take the text model
        cfg = {**cfg["text_config"], "architectures": cfg.get("architectures")}
    return cfg


def hf_to_ours(name: str, args: ModelArgs) -> tuple[str, str | None]:
    """Maps an HF tensor name to (our parameter path, fused slot or None)."""
    name = name.removeprefix("language_model.").removeprefix("model.language_model.")
    if name in ("model.embed_tokens.weight",):
        return "embed", None
    if name == "model.norm.weight":
        return "final_norm", None
    if name == "lm_head.weight":
        return "lm_head", None
    parts = name.split(".")
    if parts[:2] != ["model", "layers"]:
        return "", None
    prefix = f"layers.{parts[2]}."
    rest = ".".join(parts[3:])
    post_attention = "post_attn_norm" if args.sandwich_norms else "pre_mlp_norm"
    table = {
        "self_attn.q_proj.weight": ("qkv_weight", "q"),
        "self_attn.k_proj.weight": ("qkv_weight", "k"),
        "self_attn.v_proj.weight": ("qkv_weight", "v"),
        "self_attn.q_proj.bias": ("qkv_bias", "q"),
        "self_attn.k_proj.bias": ("qkv_bias", "k"),
        "self_attn.v_proj.bias": ("qkv_bias", "v"),
        "self_attn.o_proj.weight": ("o_weight", None),
        "mlp.gate_proj.weight": ("gate_up_weight", "gate"),
        "mlp.up_proj.weight": ("gate_up_weight", "up"),
        "mlp.down_proj.weight": ("down_weight", None),
        "input_layernorm.weight": ("input_norm", None),
        "post_attention_layernorm.weight": (post_attention, None),
        "pre_feedforward_layernorm.weight": ("pre_mlp_norm", None),
        "post_feedforward_layernorm.weight": ("post_mlp_norm", None),
        "self_attn.q_norm.weight": ("q_norm", None),
        "self_attn.k_norm.weight": ("k_norm", None),
    }
    if rest not in table:
        return "", None
    target, slot = table[rest]
    return prefix + target, slot


class SafetensorsCheckpoint:
    """An HF directory of *.safetensors files, read tensor by tensor through safetensors' memory map."""

    format = "safetensors"

    def __init__(self, path: Path):
        from safetensors import safe_open

        from turbofan.store.layout import read_safetensors_header

        self.path = path
        self.args = model_args_from_config(read_config(path))
        self.refs: list[TensorRef] = []
        self._file_of: dict[str, Path] = {}
        self._open = safe_open
        for file in safetensors_files(path):
            for name, info in read_safetensors_header(file).items():
                if name == "__metadata__":
                    continue
                target, slot = hf_to_ours(name, self.args)
                if target:
                    shape = tuple(int(d) for d in info["shape"])
                    self.refs.append(TensorRef(name, target, slot, info["dtype"], shape))
                    self._file_of[name] = file

    def float(self, ref: TensorRef) -> torch.Tensor:
        with self._open(str(self._file_of[ref.source]), framework="pt") as f:
            return f.get_tensor(ref.source)

    def quantized(self, ref: TensorRef, fmt: str) -> QuantizedWeight:
        return quantize(self.float(ref), BITS[fmt])


class GGUFCheckpoint:
    """The GGUF file of a store entry (config.json and the tokenizer files beside it, written at pull time)."""

    format = "gguf"

    def __init__(self, path: Path, gguf_file: Path):
        from turbofan.store.gguf_reader import GGUFFile
        from turbofan.store.gguf_tensors import SKIPPED_TENSORS, hf_tensor_name

        self.path = path
        cfg = read_config(path)
        self.args = model_args_from_config(cfg)
        self.gguf = GGUFFile(gguf_file, string_arrays=())
        self._n_head = int(cfg["num_attention_heads"])
        self._n_head_kv = int(cfg.get("num_key_value_heads") or self._n_head)
        self.refs = []
        self._info = {}
        for info in self.gguf.tensors:
            if info.name in SKIPPED_TENSORS:
                continue
            hf = hf_tensor_name(info.name, self.gguf.architecture)
            target, slot = hf_to_ours(hf, self.args) if hf else ("", None)
            if not target:
                raise ValueError(f"{gguf_file.name}: tensor {info.name!r} has no place in turbofan's model")
            self.refs.append(TensorRef(info.name, target, slot, self.gguf.type_name(info), info.shape))
            self._info[info.name] = info

    def float(self, ref: TensorRef) -> torch.Tensor:
        from turbofan.store.gguf_tensors import to_hf_layout

        values = self.gguf.dequantize(self._info[ref.source])
        values = to_hf_layout(ref.source, values, self.gguf.architecture, self._n_head, self._n_head_kv)
        return torch.from_numpy(np.require(values, np.float32, ["C", "W", "O"]))

    def quantized(self, ref: TensorRef, fmt: str) -> QuantizedWeight:
        """Repacked a slice of rows at a time into preallocated panels, so a large matrix (an LM head) costs its
        final size plus one slice, not plus its stored bytes."""
        from turbofan.kernels.quant import PANEL, allocate
        from turbofan.model.gguf_repack import SLICE_ELEMENTS, repack
        from turbofan.store.gguf_tensors import layout_row_order

        info = self._info[ref.source]
        order = layout_row_order(ref.source, self.gguf.architecture, ref.shape[0], self._n_head, self._n_head_kv)
        if order is not None:  # llama.cpp permuted these rows for its rotary layout: undo it on the stored rows
            return repack(self.gguf.read(info)[order], ref.type_name, ref.shape, fmt)
        n, k = ref.shape
        step = max(PANEL, SLICE_ELEMENTS // k // PANEL * PANEL)
        if step >= n:
            return repack(self.gguf.read(info), ref.type_name, ref.shape, fmt)
        out = allocate(n, k, fmt)
        for start in range(0, n, step):
            part = repack(self.gguf.read(info, slice(start, start + step)), ref.type_name,
                          (min(step, n - start), k), fmt)  # fmt: skip
            out.assign_panels(start // PANEL, part)
        return out


def safetensors_files(path: Path) -> list[Path]:
    """The directory's safetensors files, or a clear error (pickled weights are never loaded)."""
    from turbofan.store.layout import PICKLE_SUFFIXES
    from turbofan.store.layout import safetensors_files as found

    files = found(path)
    if not files:
        pickles = [p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles:
            raise ValueError(
                f"{path} holds only pickled weights ({', '.join(pickles[:3])}); turbofan loads safetensors and GGUF "
                "only, because unpickling runs arbitrary code. Convert the checkpoint to safetensors first."
            )
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    return files


def gguf_file_of(path: Path) -> Path | None:
    """The GGUF a store entry keeps (named in turbofan.json; a directory without a manifest: its only .gguf file
    when it has no safetensors), or None for a safetensors directory."""
    from turbofan.store.manifest import read_manifest

    manifest = read_manifest(path)
    if manifest is None:
        ggufs = sorted(path.glob("*.gguf"))
        return ggufs[0] if len(ggufs) == 1 and not any(path.glob("*.safetensors")) else None
    if manifest.format != "gguf":
        return None
    name = manifest.gguf_file or manifest.original_file
    return path / name if name and (path / name).is_file() else None


def open_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint of a model directory: its GGUF when the store keeps one, else its safetensors files."""
    path = Path(path)
    gguf_file = gguf_file_of(path)
    if gguf_file is not None:
        return GGUFCheckpoint(path, gguf_file)
    return SafetensorsCheckpoint(path)
