"""Gemma 3 text: scaled embeddings, (1 + w) norms, sandwich norms, q/k norms, local sliding and global layers."""

from __future__ import annotations

from turbofan.model.architectures import llama
from turbofan.model.args import ModelArgs, rope_from_hf

ARCHITECTURES = ("Gemma3ForCausalLM", "Gemma3TextForCausalLM")


def _layer_types(cfg: dict) -> list[str]:
    if cfg.get("layer_types"):
        return list(cfg["layer_types"])
    pattern = cfg.get("sliding_window_pattern", 6)
    n = cfg["num_hidden_layers"]
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]


def _rope_per_type(cfg: dict) -> dict[str, object]:
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params:  # transformers 5: one parameter set per layer type
        return {t: rope_from_hf(cfg, p) for t, p in params.items()}
    local = {"rope_type": "default", "rope_theta": cfg.get("rope_local_base_freq", 10000.0)}
    return {"full_attention": rope_from_hf(cfg), "sliding_attention": rope_from_hf(cfg, local)}


def model_args(cfg: dict) -> ModelArgs:
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    types = _layer_types(cfg)
    ropes = _rope_per_type(cfg)
    if cfg.get("attn_logit_softcapping"):
        raise ValueError("Gemma attention logit soft-capping (Gemma 2) is not supported; Gemma 3 does not use it")
    return llama.model_args(
        cfg,
        max_position=cfg.get("max_position_embeddings", 32768),
        tie_word_embeddings=cfg.get("tie_word_embeddings", True),
        qk_norm=True,
        hidden_act="gelu_tanh",
        attn_scale=cfg.get("query_pre_attn_scalar", head_dim) ** -0.5,
        rope=[ropes[t] for t in types],
        sliding_window=[cfg.get("sliding_window") if t == "sliding_attention" else None for t in types],
        embed_scale=cfg["hidden_size"] ** 0.5,
        norm_offset=1.0,
        sandwich_norms=True,
        final_logit_softcapping=cfg.get("final_logit_softcapping"),
    )
