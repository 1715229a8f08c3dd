"""Qwen3 dense models: Llama with RMSNorm on each head's queries and keys."""

from __future__ import annotations

from turbofan.model.architectures import llama
from turbofan.model.args import ModelArgs

ARCHITECTURES = ("Qwen3ForCausalLM",)


def model_args(cfg: dict) -> ModelArgs:
    layers = cfg["num_hidden_layers"]
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    return llama.model_args(
        cfg, qk_norm=True, attention_bias=cfg.get("attention_bias", False), sliding_window=[window] * layers
    )
