"""EngineConfig: one dataclass for what the engine is built from; CLI flags and env vars map onto it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil
import torch

DEFAULT_MODEL = "smollm2:135m"


def parse_memory(value: str | float | int | None) -> int | None:
    """'2GiB', '512MiB', '2' (GiB), or a fraction like 0.1 of the memory available now."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        for suffix, scale in (("gib", 1 << 30), ("gb", 10**9), ("mib", 1 << 20), ("mb", 10**6), ("g", 1 << 30)):
            if text.endswith(suffix):
                return int(float(text[: -len(suffix)]) * scale)
        value = float(text)
    if 0 < value < 1:
        return int(value * psutil.virtual_memory().available)
    return int(value * (1 << 30))


@dataclass
class EngineConfig:
    model: str = DEFAULT_MODEL
    served_model_name: str | None = None
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on GPU
    device: str = "auto"
    block_size: int = 16
    max_model_len: int | None = None  # default: the model's context, capped at 8192 on CPU
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    kv_cache_memory: str | float | None = "1GiB"
    num_kv_blocks: int | None = None  # overrides kv_cache_memory (tests use it to force preemption)
    enable_prefix_caching: bool = True
    # "auto": GGUF models keep their file's precision in 4/8-bit blocks, safetensors stay float32 (model/quant.py);
    # "int8" / "int4": every layer matrix quantized; "none": float32, bit-comparable with transformers.
    quantization: str | None = "auto"
    # KV-cache dtype (vLLM's --kv-cache-dtype): "auto" = float16 when the weights are served quantized and the
    # attention kernel is there (GGUF models by default), else the model's dtype; or "float32" / "float16".
    kv_cache_dtype: str = "auto"
    chat_template: str | None = None
    models_dir: str | None = None
    tiering: str = "off"
    tier_threshold: int = 32
    profile: bool = False
    seed: int = 0
    # Processes the model is split over (Megatron-style, turbofan/distributed); 1 = this process only.
    tensor_parallel_size: int = 1
    log_stats_interval: float = 10.0
    # vLLM's speculative_config, e.g. {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}
    speculative_config: dict | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {self.block_size}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
        if self.kv_cache_dtype not in ("auto", "float32", "float16"):
            raise ValueError(f"kv_cache_dtype must be auto, float32 or float16, got {self.kv_cache_dtype!r}")
        if self.speculative_config is not None:
            from turbofan.engine.speculative import SpeculativeConfig

            SpeculativeConfig.parse(self.speculative_config)  # refuse a bad config before any weights load
        if self.tiering not in ("off", "on"):
            raise ValueError(f"tiering must be 'off' or 'on', got {self.tiering!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1 and self.tiering == "on":
            raise ValueError("tiering (torch.compile) does not trace the collectives of tensor parallelism: "
                             "use --tiering off with --tensor-parallel-size")  # fmt: skip

    @property
    def resolved_device(self) -> str:
        """`auto` is the CPU: the CUDA path has not been exercised in CI; `--device cuda` uses a GPU when asked."""
        return "cpu" if self.device == "auto" else self.device

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device == "cuda" else torch.float32
        names = {"float32": torch.float32, "float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16}
        if self.dtype not in names:
            raise ValueError(f"dtype must be one of auto, {', '.join(names)}; got {self.dtype!r}")
        return names[self.dtype]

    @property
    def kv_cache_bytes(self) -> int:
        return parse_memory(self.kv_cache_memory) or 1 << 30

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model


def env_default(name: str, fallback: str | None = None) -> str | None:
    return os.environ.get(name, fallback)
