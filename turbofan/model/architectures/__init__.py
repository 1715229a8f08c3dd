"""Supported architectures: each module maps a Hugging Face config.json onto ModelArgs."""

from __future__ import annotations

from turbofan.model.architectures import gemma3, llama, qwen2, qwen3
from turbofan.model.args import ModelArgs

_MODULES = (llama, qwen2, qwen3, gemma3)
REGISTRY = {name: module.model_args for module in _MODULES for name in module.ARCHITECTURES}


def model_args_from_config(cfg: dict) -> ModelArgs:
    archs = cfg.get("architectures") or []
    if not archs and cfg.get("model_type") == "gemma3_text":
        archs = cfg["architectures"] = ["Gemma3ForCausalLM"]
    for arch in archs:
        if arch in REGISTRY:
            return REGISTRY[arch](cfg)
    raise ValueError(
        f"unsupported architecture {archs or cfg.get('model_type')!r}; turbofan supports: {', '.join(sorted(REGISTRY))}"
    )
