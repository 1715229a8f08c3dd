"""How much memory a model will take once loaded, estimated from its files before loading it (the model manager's
preflight). Three parts: weights (parameters from the safetensors headers, at the precision they will be served
in), the KV cache (what the engine config allocates), and runtime buffers (logits and activations of the largest
step, plus a fixed allowance for the allocator and the tokenizer)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from turbofan.store.layout import read_json, safetensors_stats
from turbofan.store.manifest import read_manifest

MIB = 1 << 20
RUNTIME_FIXED = 96 * MIB  # allocator slack, tokenizer, compiled kernels' scratch
ENCODER_ARCHITECTURES = ("BertModel", "BertForMaskedLM", "XLMRobertaModel", "RobertaModel")


@dataclass(frozen=True)
class Footprint:
    weights: int
    kv_cache: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.runtime

    def describe(self) -> str:
        parts = [f"weights {self.weights / (1 << 30):.2f} GiB"]
        if self.kv_cache:
            parts.append(f"KV cache {self.kv_cache / (1 << 30):.2f} GiB")
        parts.append(f"runtime {self.runtime / (1 << 30):.2f} GiB")
        return " + ".join(parts)


def is_encoder(path: Path) -> bool:
    """An encoder-only (BERT-family) checkpoint: served for embeddings, never for generation."""
    archs = read_json(Path(path) / "config.json").get("architectures") or []
    return any(a in ENCODER_ARCHITECTURES for a in archs)


def _weight_bytes(path: Path, quantization: str | None) -> int:
    """The weights as they will be served: each tensor's bytes in the format the quantization plan gives it,
    from the checkpoint's tensor table (no tensor is read)."""
    from turbofan.model.checkpoint import open_checkpoint
    from turbofan.model.quant import plan_for, planned_bytes

    checkpoint = open_checkpoint(path)
    return planned_bytes(checkpoint, plan_for(quantization or "none", checkpoint))


def estimate(path: Path, config) -> Footprint:
    """`config`: the EngineConfig the model would be built with (KV cache size, batch limits, quantization)."""
    path = Path(path)
    cfg = read_json(path / "config.json")
    cfg = {**cfg, **(cfg.get("text_config") or {})}
    hidden = int(cfg.get("hidden_size") or 0)
    inter = int(cfg.get("intermediate_size") or 4 * hidden)
    vocab = int(cfg.get("vocab_size") or 0)
    if is_encoder(path):
        parameters, _ = safetensors_stats(path)
        positions = int(cfg.get("max_position_embeddings") or 512)
        activations = 32 * positions * (inter + 4 * hidden) * 4  # a batch of 32 full-length texts
        return Footprint(parameters * 4, 0, RUNTIME_FIXED + activations)
    weights = _weight_bytes(path, config.quantization)
    manifest = read_manifest(path)
    kv_itemsize = 2 if (manifest is not None and manifest.format == "gguf" and config.kv_cache_dtype == "auto") else 4
    if config.kv_cache_dtype in ("float16", "float32"):
        kv_itemsize = 2 if config.kv_cache_dtype == "float16" else 4
    if config.num_kv_blocks:
        heads = int(cfg.get("num_attention_heads") or 1)
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        layers = int(cfg.get("num_hidden_layers") or 0)
        per_block = layers * 2 * config.block_size * kv_heads * head_dim * kv_itemsize
        kv = per_block * (config.num_kv_blocks + 1)
    else:
        kv = config.kv_cache_bytes
    tokens = config.max_num_batched_tokens
    runtime = RUNTIME_FIXED + 2 * config.max_num_seqs * vocab * 4 + tokens * (3 * inter + 6 * hidden) * 4
    return Footprint(weights, kv, runtime)
