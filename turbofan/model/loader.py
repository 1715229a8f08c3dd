"""Builds a CausalLM from a Hugging Face-style directory (config.json + *.safetensors). Never loads pickles."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors import safe_open

from turbofan.model.architectures import model_args_from_config
from turbofan.model.args import ModelArgs
from turbofan.model.layers import CausalLM

log = logging.getLogger("turbofan.model")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_config(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    if "text_config" in cfg and "num_hidden_layers" not in cfg:  # multimodal wrappers: take the text model
        cfg = {**cfg["text_config"], "architectures": cfg.get("architectures")}
    return cfg


def safetensors_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise ValueError(
                f"{path} holds only pickled weights ({', '.join(pickles[:3])}); turbofan loads safetensors and GGUF "
                "only, because unpickling runs arbitrary code. Convert the checkpoint to safetensors first."
            )
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    return files


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


FUSED_ORDER = {"qkv_weight": ("q", "k", "v"), "qkv_bias": ("q", "k", "v"), "gate_up_weight": ("gate", "up")}
NORMS = ("input_norm", "pre_mlp_norm", "post_attn_norm", "post_mlp_norm", "q_norm", "k_norm", "final_norm")


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> CausalLM:
    path = Path(path)
    start = time.perf_counter()
    args = model_args_from_config(read_config(path))
    model = CausalLM(args)
    tensors: dict[str, torch.Tensor] = {}
    pieces: dict[str, dict[str, torch.Tensor]] = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                target, slot = hf_to_ours(name, args)
                if not target:
                    continue
                t = f.get_tensor(name)
                if slot is None:
                    tensors[target] = t
                else:
                    pieces.setdefault(target, {})[slot] = t
    for target, parts in pieces.items():
        order = FUSED_ORDER[target.rsplit(".", 1)[-1]]
        missing = [s for s in order if s not in parts]
        if missing:
            raise ValueError(f"checkpoint is missing {target} parts {missing}")
        tensors[target] = torch.cat([parts[s] for s in order], dim=0)
    if "lm_head" not in tensors:
        tensors["lm_head"] = tensors["embed"]
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n in params if n not in tensors]
    if missing:
        raise ValueError(f"checkpoint in {path} is missing tensors for: {', '.join(missing[:8])}")
    converted: dict[int, torch.Tensor] = {}
    for name, param in params.items():
        t = tensors[name]
        if name.rsplit(".", 1)[-1] in NORMS and args.norm_offset:
            t = t.float() + args.norm_offset
        key = id(tensors[name])
        if key not in converted:  # tied embeddings stay one tensor
            converted[key] = t.to(device=device, dtype=dtype).contiguous()
        param.data = converted[key] if name.rsplit(".", 1)[-1] not in NORMS else t.to(device=device, dtype=dtype)
    log.info(
        "loaded weights",
        extra={"path": str(path), "architecture": args.architecture, "seconds": round(time.perf_counter() - start, 2)},
    )
    return model.eval()
