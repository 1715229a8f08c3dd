"""Llama family (Llama 2/3, TinyLlama, SmolLM2, DeepSeek-R1-Distill-Llama)."""

from __future__ import annotations

from turbofan.model.args import ModelArgs, eos_ids, rope_from_hf

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


def model_args(cfg: dict, **overrides) -> ModelArgs:
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    layers = cfg["num_hidden_layers"]
    window = cfg.get("sliding_window")
    args = dict(
        architecture=cfg["architectures"][0],
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        max_position=cfg.get("max_position_embeddings", 4096),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        attention_bias=cfg.get("attention_bias", False),
        rope=[rope_from_hf(cfg)] * layers,
        sliding_window=[window] * layers,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids(cfg),
    )
    args.update(overrides)
    return ModelArgs(**args)
