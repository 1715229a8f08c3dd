"""ModelArgs: everything the forward pass needs to know about an architecture, read from config.json."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class RopeArgs:
    theta: float = 10000.0
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def inv_freq(self, head_dim: int) -> list[float]:
        """Rotary inverse frequencies, with the scaling rules of HF transformers' rope init functions."""
        base = [1.0 / (self.theta ** (i / head_dim)) for i in range(0, head_dim, 2)]
        if self.kind == "default":
            return base
        if self.kind == "linear":
            return [f / self.factor for f in base]
        if self.kind == "llama3":
            low_wavelen = self.original_max_position / self.low_freq_factor
            high_wavelen = self.original_max_position / self.high_freq_factor
            out = []
            for f in base:
                wavelen = 2 * math.pi / f
                if wavelen < high_wavelen:
                    out.append(f)
                elif wavelen > low_wavelen:
                    out.append(f / self.factor)
                else:
                    smooth = (self.original_max_position / wavelen - self.low_freq_factor) / (
                        self.high_freq_factor - self.low_freq_factor
                    )
                    out.append((1 - smooth) * f / self.factor + smooth * f)
            return out
        raise ValueError(f"rope scaling type {self.kind!r} is not supported (default, linear, llama3 are)")


@dataclass
class ModelArgs:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"  # silu | gelu_tanh
    attn_scale: float | None = None  # None: head_dim ** -0.5
    rope: list[RopeArgs] = field(default_factory=list)  # one per layer
    sliding_window: list[int | None] = field(default_factory=list)  # one per layer
    # Gemma-style details.
    embed_scale: float = 1.0
    norm_offset: float = 0.0  # RMSNorm multiplies by (offset + weight); Gemma stores weight - 1
    sandwich_norms: bool = False  # extra norms after attention and around the MLP
    final_logit_softcapping: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5


def rope_from_hf(cfg: dict, params: dict | None = None) -> RopeArgs:
    """Reads both the transformers 4.x (`rope_theta` + `rope_scaling`) and 5.x (`rope_parameters`) spellings."""
    params = dict(params if params is not None else (cfg.get("rope_parameters") or {}))
    scaling = cfg.get("rope_scaling") or {}
    if params.get("rope_type", "default") == "default" and scaling:
        params = {**scaling, **params, "rope_type": scaling.get("rope_type", scaling.get("type", "default"))}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    return RopeArgs(
        theta=float(theta),
        kind=kind,
        factor=float(params.get("factor", 1.0) or 1.0),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(params.get("original_max_position_embeddings", 8192)),
    )


def eos_ids(cfg: dict) -> list[int]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return []
    return list(eos) if isinstance(eos, list) else [int(eos)]
