"""ModelRunner: owns the weights and the paged KV cache, turns a ForwardBatch into logits."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from turbofan import kernels
from turbofan.kernels import attention as attention_kernel
from turbofan.model.attention import AttentionMetadata
from turbofan.model.batch import ForwardBatch
from turbofan.model.checkpoint import open_checkpoint
from turbofan.model.layers import CausalLM, use_fused_ops
from turbofan.model.loader import load_model
from turbofan.model.quant import plan_for, quantize_model

log = logging.getLogger("turbofan.model")


def kv_bytes_per_block(model: CausalLM, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block over all layers, K and V, in the cache's dtype."""
    a = model.args
    return a.num_layers * 2 * block_size * model.cache_kv_heads * a.head_dim * torch.finfo(dtype).bits // 8


KV_CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def resolve_kv_cache_dtype(kv_cache_dtype: str, quantization: str, dtype: torch.dtype, device: str) -> torch.dtype:
    """The KV cache's dtype for --kv-cache-dtype (vLLM's flag): auto | float32 | float16.

    auto: float16 where the weights are served quantized (`quantization` is what quantize_model reports; anything
    but "float32", e.g. the default path for GGUF models) on a float32 CPU model with the attention kernel
    available: the kernel rounds k/v to float16 as it writes them and widens them to float32 as it reads, so a
    decode step reads half the KV bytes, at a quality cost well inside that of 4-bit weights. Otherwise the model's
    dtype, so `--quantization none` stays the exact float32 path. An explicit float16 without the kernels (no
    compiler) is served by the PyTorch fallback, which converts on write and on gather: correct, only slower.
    """
    if kv_cache_dtype == "auto":
        eligible = quantization != "float32" and dtype == torch.float32 and device == "cpu"
        if eligible and kernels.available() and attention_kernel.supports(torch.float16):
            return torch.float16
        return dtype
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of auto, {', '.join(KV_CACHE_DTYPES)}; got {kv_cache_dtype!r}")
    return KV_CACHE_DTYPES[kv_cache_dtype]


class Sharding(Protocol):
    """How a tensor-parallel rank cuts its model and agrees on the KV cache with the other ranks
    (turbofan/distributed/tensor_parallel.py; the model floor only sees this shape)."""

    def __call__(self, model: CausalLM) -> None: ...

    def agree_kv_dtype(self, dtype: torch.dtype) -> torch.dtype: ...

    def sum(self, n: int) -> int: ...


class ModelRunner:
    def __init__(
        self,
        model_path: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_bytes: int | None = None,
        quantization: str | None = "auto",
        kv_cache_dtype: str = "auto",
        sharding: Sharding | None = None,
    ):
        t0 = time.perf_counter()
        mode = quantization or "none"
        if sharding is None:  # each matrix read straight into the format it is served in
            self.model = load_model(model_path, dtype=dtype, device=device, quantization=mode)
            # What is actually served, for /api/show, /api/ps and logs: "float32" or e.g. "q4: 90, q8: 31".
            self.quantization = self.model.weights
        else:  # each rank cuts its slices out of the float weights first, then quantizes them
            self.model = load_model(model_path, dtype=dtype, device=device)
            sharding(self.model)
            self.quantization = quantize_model(self.model, plan_for(mode, open_checkpoint(model_path)))
        self.model.use_fused_ops(use_fused_ops())
        log.info("weights served as %s (--quantization %s)", self.quantization, quantization or "none")
        self.load_seconds = time.perf_counter() - t0
        self.args = self.model.args
        self.windows = tuple(sorted({w for w in self.args.sliding_window if w is not None}))
        self.dtype, self.device, self.block_size = dtype, device, block_size
        # What the KV cache is kept in (float16 halves the bytes per block, so a memory budget holds twice the blocks).
        self.kv_cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype, self.quantization, dtype, device)
        if sharding is not None:  # rank 0 decides; the budget covers every rank's KV heads
            self.kv_cache_dtype = sharding.agree_kv_dtype(self.kv_cache_dtype)
        per_block = kv_bytes_per_block(self.model, block_size, self.kv_cache_dtype)
        if sharding is not None:
            per_block = sharding.sum(per_block)
        if num_blocks is None:
            num_blocks = max(int((kv_cache_bytes or 1 << 30) // per_block), 2)
        self.num_blocks = num_blocks
        # One extra block past the ones the block manager hands out: padding rows of a bucketed batch write there.
        self.trash_block = num_blocks
        a = self.args
        self.kv_cache = torch.zeros(
            a.num_layers,
            2,
            (num_blocks + 1) * block_size,
            self.model.cache_kv_heads,
            a.head_dim,
            dtype=self.kv_cache_dtype,
            device=device,
        )
        self.model_version = 0  # bumped whenever the weights change; compiled entries guard on it
        self.kv_cache_bytes = per_block * num_blocks
        kv_name = str(self.kv_cache_dtype).removeprefix("torch.")
        log.info(
            "KV cache: %d blocks of %d tokens, %.3f GiB, kept in %s (--kv-cache-dtype %s)",
            num_blocks,
            block_size,
            self.kv_cache_bytes / (1 << 30),
            kv_name,
            kv_cache_dtype,
        )
        if self.kv_cache_dtype != dtype and not (kernels.available() and attention_kernel.supports(self.kv_cache_dtype)):
            log.warning("a %s KV cache without the attention kernel: the PyTorch fallback converts it (slower)", kv_name)
        # The forward the runner calls; the tiering layer may swap in compiled versions per shape.
        self.forward_fn: Callable[[ForwardBatch], torch.Tensor] = self.eager_forward

    def forward_all(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Logits for every row: the shape-stable function the optimising tier compiles per bucket."""
        return self.model.compute_logits(self.model(input_ids, positions, self.kv_cache, meta))

    @torch.inference_mode()
    def eager_forward(self, batch: ForwardBatch) -> torch.Tensor:
        meta = AttentionMetadata.from_batch(batch, self.windows)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_cache, meta)
        return self.model.compute_logits(hidden.index_select(0, batch.logits_indices))

    @torch.inference_mode()
    def hidden_states(self, batch: ForwardBatch) -> torch.Tensor:
        """Final hidden states (after the final norm) of every row, float32 on the host: what embeddings pool.
        Eager: embeddings are rare next to decode steps, and the compiled tiers are keyed on logits."""
        batch = batch if self.device == "cpu" else batch.to(self.device)
        meta = AttentionMetadata.from_batch(batch, self.windows)
        return self.model(batch.input_ids, batch.positions, self.kv_cache, meta).float().cpu()

    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [len(batch.logits_indices), vocab] in float32 (the forward function picks its grad mode), on the
        host: the batch moves to the runner's device and the logits come back to the sampler's."""
        if self.device == "cpu":
            return self.forward_fn(batch)
        return self.forward_fn(batch.to(self.device)).cpu()

    @torch.inference_mode()
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole KV blocks (src -> dst) before a shared block is written."""
        if not pairs:
            return
        bs, dev = self.block_size, self.kv_cache.device
        offs = torch.arange(bs, device=dev)
        src = torch.tensor([s for s, _ in pairs], device=dev)[:, None] * bs + offs
        dst = torch.tensor([d for _, d in pairs], device=dev)[:, None] * bs + offs
        self.kv_cache[:, :, dst.flatten()] = self.kv_cache[:, :, src.flatten()]
