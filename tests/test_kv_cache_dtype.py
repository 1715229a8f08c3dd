"""The KV cache's dtype (--kv-cache-dtype auto | float32 | float16): what auto picks, what a memory budget holds,
and a float16 cache through a whole model on the kernel and on the PyTorch fallback."""

from __future__ import annotations

import pytest
import torch

from turbofan import kernels
from turbofan.cli import build_parser, engine_config
from turbofan.config import EngineConfig
from turbofan.model.attention import AttentionMetadata
from turbofan.model.batch import ForwardBatch
from turbofan.model.runner import ModelRunner, kv_bytes_per_block, resolve_kv_cache_dtype

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"kernels: {kernels.unavailable_reason()}")


@needs_kernels
def test_auto_is_float16_for_quantized_weights_and_float32_for_none(tiny_models):
    q = ModelRunner(tiny_models["llama"], num_blocks=8, block_size=4, quantization="int4")
    assert q.quantization.startswith("q4")
    assert q.kv_cache_dtype == torch.float16 and q.kv_cache.dtype == torch.float16
    fp = ModelRunner(tiny_models["llama"], num_blocks=8, block_size=4, quantization="none")
    assert fp.quantization == "float32"
    assert fp.kv_cache_dtype == torch.float32 and fp.kv_cache.dtype == torch.float32
    # "auto" quantization of a safetensors model keeps float32 weights, hence a float32 cache
    assert ModelRunner(tiny_models["llama"], num_blocks=8).kv_cache_dtype == torch.float32


def test_auto_without_the_kernels_keeps_the_model_dtype(monkeypatch):
    monkeypatch.setattr(kernels, "available", lambda: False)
    assert resolve_kv_cache_dtype("auto", "q4: 120, q8: 1", torch.float32, "cpu") == torch.float32
    assert resolve_kv_cache_dtype("float16", "float32", torch.float32, "cpu") == torch.float16  # asked for: served
    assert resolve_kv_cache_dtype("auto", "q4: 120", torch.bfloat16, "cuda") == torch.bfloat16
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        resolve_kv_cache_dtype("fp8", "float32", torch.float32, "cpu")


def test_explicit_dtypes_and_the_memory_budget(tiny_models):
    path = tiny_models["llama"]
    budget = 1 << 20
    f32 = ModelRunner(path, kv_cache_bytes=budget, quantization="int4", kv_cache_dtype="float32")
    f16 = ModelRunner(path, kv_cache_bytes=budget, quantization="none", kv_cache_dtype="float16")
    assert f32.kv_cache.dtype == torch.float32 and f16.kv_cache.dtype == torch.float16
    assert kv_bytes_per_block(f16.model, 16, torch.float16) * 2 == kv_bytes_per_block(f32.model, 16, torch.float32)
    assert f16.num_blocks == 2 * f32.num_blocks  # half the bytes per block: twice the blocks in one budget
    assert f16.kv_cache_bytes <= budget and f32.kv_cache_bytes <= budget


def test_config_and_cli_flag():
    assert EngineConfig().kv_cache_dtype == "auto"
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="bfloat16")
    args = build_parser().parse_args(["serve", "m", "--kv-cache-dtype", "float16"])
    assert engine_config(args).kv_cache_dtype == "float16"
    assert engine_config(build_parser().parse_args(["serve", "m"])).kv_cache_dtype == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "m", "--kv-cache-dtype", "fp8"])


def _prefill_then_decode(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    """Logits of a 9-token prefill and two decode steps (the decodes read the cache the prefill wrote)."""
    out = [runner.execute(ForwardBatch.build([ids[:9]], [0], [[0, 1, 2, 3]], [list(range(9))], 4))]
    for n in (9, 10):
        out.append(runner.execute(ForwardBatch.build([[ids[n]]], [n], [[0, 1, 2, 3]], [[0]], 4)))
    return torch.cat(out)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_float16_cache_through_the_model_kernel_and_fallback(tiny_models, arch, monkeypatch):
    """A float16 cache changes the logits only by the rounding of K/V; the PyTorch fallback (no compiler) serves
    it too, converting on write and on gather, and agrees with the kernel."""
    path = tiny_models[arch]
    ids = torch.randint(0, 300, (11,), generator=torch.Generator().manual_seed(0)).tolist()
    ref = _prefill_then_decode(ModelRunner(path, num_blocks=8, block_size=4, quantization="none"), ids)
    runner = ModelRunner(path, num_blocks=8, block_size=4, quantization="none", kv_cache_dtype="float16")
    got = None
    if kernels.available():
        got = _prefill_then_decode(runner, ids)
        cos = torch.nn.functional.cosine_similarity(ref, got, dim=-1)
        assert bool((cos > 0.9999).all()), cos
        assert not torch.equal(ref, got)  # it really read a rounded cache
    monkeypatch.setattr(kernels, "available", lambda: False)  # what a machine without a compiler runs
    runner.kv_cache.zero_()
    probe = ForwardBatch.build([[1]], [0], [[0]], [[0]], 4)
    assert not AttentionMetadata.from_batch(probe).use_kernel
    fallback = _prefill_then_decode(runner, ids)
    cos = torch.nn.functional.cosine_similarity(ref, fallback, dim=-1)
    assert bool((cos > 0.9999).all()), cos
    if got is not None:  # the same rounding, the same attention up to summation order
        torch.testing.assert_close(fallback, got, atol=1e-4, rtol=1e-4)
