"""Qwen2 family (Qwen2.5, DeepSeek-R1-Distill-Qwen): Llama with q/k/v biases and optional sliding layers."""

from __future__ import annotations

from turbofan.model.architectures import llama
from turbofan.model.args import ModelArgs

ARCHITECTURES = ("Qwen2ForCausalLM",)


def model_args(cfg: dict) -> ModelArgs:
    layers = cfg["num_hidden_layers"]
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    first_sliding = cfg.get("max_window_layers", layers)
    return llama.model_args(
        cfg,
        attention_bias=True,
        sliding_window=[window if i >= first_sliding else None for i in range(layers)],
    )
