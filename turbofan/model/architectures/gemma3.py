"""Gemma 3 text: scaled embeddings, (1 + w) norms, sandwich norms, q/k norms, local sliding and global layers."""

from __future__ import annotations

from turbofan.model.args import ModelArgs, eos_ids, rope_from_hf

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
    return ModelArgs(
        architecture=cfg["architectures"][0],
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        max_position=cfg.get("max_position_embeddings", 32768),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=cfg.get("tie_word_embeddings", True),
        attention_bias=cfg.get("attention_bias", False),
        qk_norm=True,
        hidden_act="gelu_tanh",
        attn_scale=cfg.get("query_pre_attn_scalar", head_dim) ** -0.5,
        rope=[ropes[t] for t in types],
        sliding_window=[cfg.get("sliding_window") if t == "sliding_attention" else None for t in types],
        embed_scale=cfg["hidden_size"] ** 0.5,
        norm_offset=1.0,
        sandwich_norms=True,
        final_logit_softcapping=cfg.get("final_logit_softcapping"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids(cfg),
    )
