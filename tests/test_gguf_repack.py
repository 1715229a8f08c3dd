"""GGUF blocks -> turbofan's q4/q8 panels: the C++ op against its Python reference, byte for byte, for every ggml
type it decodes; exactness where the format keeps the file's grid; the embedding lookup of a quantized table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from turbofan import kernels
from turbofan.kernels.quant import dequantize, dequantize_rows, quantize
from turbofan.model.gguf_repack import reference_repack, repack

N, K = 48, 512  # 3 panels, 2 super-blocks of 256 per row
_K_QUANTS = {"Q4_K": (144, ((0, 0.004), (2, 0.002))), "Q5_K": (176, ((0, 0.003), (2, 0.002))),
             "Q6_K": (210, ((208, 0.0005),))}  # fmt: skip


def gguf_bytes(type_name: str, seed: int = 0) -> np.ndarray:
    """[N, bytes per row] of a tensor stored as `type_name`: gguf-py's own quantizer where it has one, else random
    blocks with sane float16 scales (random bytes there would be NaNs)."""
    import gguf

    rng = np.random.default_rng(seed)
    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name in _K_QUANTS:
        nbytes, fields = _K_QUANTS[type_name]
        raw = rng.integers(0, 256, size=(N, K // 256, nbytes), dtype=np.uint8)
        for offset, value in fields:
            raw[..., offset : offset + 2] = np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)
        return raw.reshape(N, -1)
    values = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
    if type_name == "F32":
        return values.view(np.uint8)
    if type_name == "F16":
        return values.astype(np.float16).view(np.uint8)
    return gguf.quants.quantize(values, qtype)


def _same(a, b) -> bool:
    return all(
        (x is None and y is None) or torch.equal(x, y)
        for x, y in zip((a.qweight, a.scales, a.mins, a.wsum), (b.qweight, b.scales, b.mins, b.wsum))
    )


def _dequantized(raw: np.ndarray, type_name: str) -> torch.Tensor:
    import gguf

    values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name])
    return torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(N, K))


TYPES_8 = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.skipif(not kernels.available(), reason="needs the compiled kernels")
@pytest.mark.parametrize(("type_name", "fmt"), [(t, "q8") for t in TYPES_8] + [(t, "q4") for t in ("Q4_0", "Q4_1", "Q4_K")])
def test_kernel_repack_is_the_reference_byte_for_byte(type_name, fmt):
    if type_name == "BF16":
        import gguf

        raw = gguf.quants.quantize((np.random.default_rng(1).standard_normal((N, K)) * 0.05).astype(np.float32),
                                   gguf.GGMLQuantizationType.BF16)  # fmt: skip
    else:
        raw = gguf_bytes(type_name)
    ours = repack(raw, type_name, (N, K), fmt)
    assert _same(ours, reference_repack(raw, type_name, (N, K), fmt))
    assert _same(ours, quantize(_dequantized(raw, type_name), 8)) or fmt == "q4"  # q8: the float path exactly


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1"])
def test_legacy_4bit_types_are_carried_exactly(type_name):
    raw = gguf_bytes(type_name)
    assert torch.equal(dequantize(repack(raw, type_name, (N, K), "q4")), _dequantized(raw, type_name))


def test_q8_0_is_carried_exactly():
    raw = gguf_bytes("Q8_0")
    q = repack(raw, "Q8_0", (N, K), "q8")
    assert torch.equal(dequantize(q), _dequantized(raw, "Q8_0"))


def test_q4_k_keeps_its_codes_and_rounds_only_the_scales():
    """Q4_K's sub-block scale d * sc and min dmin * m become float16 (the q4 format's scale type): the codes are
    the file's, and each value is off by at most that rounding (2^-11 relative, times the largest code)."""
    raw = gguf_bytes("Q4_K")
    ref = _dequantized(raw, "Q4_K")
    got = dequantize(repack(raw, "Q4_K", (N, K), "q4"))
    blocks = ref.reshape(N, K // 32, 32)
    span = blocks.abs().amax(-1, keepdim=True)
    assert bool(((got.reshape(N, K // 32, 32) - blocks).abs() <= span * 16 * 2.0**-11 + 1e-7).all())


def test_a_mixed_fusion_requantizes_from_floats():
    """A Q6_K tensor in a q4 plan (int4 on a Q4_K_M file) goes the float way: dequantize, quantize to 4 bits."""
    raw = gguf_bytes("Q6_K")
    assert _same(repack(raw, "Q6_K", (N, K), "q4"), quantize(_dequantized(raw, "Q6_K"), 4))


@pytest.mark.parametrize("bits", [4, 8])
def test_embedding_rows_are_the_dequantized_rows(bits):
    w = torch.randn(64, 96)
    q = quantize(w, bits)
    ids = torch.tensor([[0, 5, 17], [63, 17, 31]])
    rows = dequantize_rows(q, ids.flatten()).reshape(2, 3, 96)
    assert torch.equal(rows, dequantize(q)[ids])


# -- the K formats: Q4_K and Q6_K kept as stored ----------------------------------------------------------------
@pytest.mark.parametrize(("type_name", "fmt"), [("Q4_K", "q4k"), ("Q6_K", "q6k")])
def test_k_formats_hold_the_files_values_exactly(type_name, fmt):
    raw = gguf_bytes(type_name)
    q = reference_repack(raw, type_name, (N, K), fmt)
    assert q.fmt == fmt and q.shape == (N, K)
    assert torch.equal(dequantize(q), _dequantized(raw, type_name))
    ids = torch.tensor([3, 47, 16, 3])
    assert torch.equal(dequantize_rows(q, ids), _dequantized(raw, type_name)[ids])  # the embedding lookup
    bits_per_weight = q.nbytes * 8 / (N * K)
    assert bits_per_weight == {"q4k": 4.625, "q6k": 6.5625}[fmt]  # the file's own size: 4.5 + 1/8, 6.5625


@pytest.mark.skipif(not kernels.available(), reason="needs the compiled kernels")
@pytest.mark.parametrize(("type_name", "fmt"), [("Q4_K", "q4k"), ("Q6_K", "q6k")])
def test_kernel_k_repack_is_the_reference(type_name, fmt):
    raw = gguf_bytes(type_name, seed=3)
    assert _same(repack(raw, type_name, (N, K), fmt), reference_repack(raw, type_name, (N, K), fmt))


@pytest.mark.skipif(not kernels.available(), reason="needs the compiled kernels")
@pytest.mark.parametrize(("type_name", "fmt"), [("Q4_K", "q4k"), ("Q6_K", "q6k")])
@pytest.mark.parametrize("m", [1, 3, 9, 17])
def test_k_format_kernel_equals_reference_on_every_isa(type_name, fmt, m):
    """Exact integer dots, float32 scales formed as ggml forms them; every ISA path gives the same bytes, and a
    row's output does not depend on its batch mates."""
    from turbofan.kernels.quant import qlinear, reference_qlinear

    q = repack(gguf_bytes(type_name, seed=m), type_name, (N, K), fmt)
    x, bias = torch.randn(m, K, generator=torch.Generator().manual_seed(m)), torch.randn(N)
    outs = {}
    for isa in ("scalar", "avx2", "avx512"):
        if kernels.ISA_LEVELS[isa] <= kernels.ISA_LEVELS[kernels.detected_isa()]:
            with kernels.forced_isa(isa):
                outs[isa] = qlinear(x, q, bias)
    ref = reference_qlinear(x, q, bias)
    first = next(iter(outs.values()))
    torch.testing.assert_close(first, ref, atol=1e-5 * ref.abs().max().item(), rtol=0)
    for isa, out in outs.items():
        assert torch.equal(out, first), isa
    assert torch.equal(qlinear(x[-1:], q, bias)[0], first[-1])
    dense = torch.nn.functional.linear(x, dequantize(q), bias)
    assert (first - dense).norm() / dense.norm() < 0.02


def test_a_q4_k_part_of_a_q6k_fusion_takes_the_6bit_grid():
    """q/k (Q4_K) fused with v (Q6_K): the Q6_K part exactly, the Q4_K part re-quantized to q6k with 1.5% RMS
    error (Q4_K's own is ~9% on Gaussian weights, so the sum grows by ~1%)."""
    from turbofan.kernels.quant import concat

    q4, q6 = gguf_bytes("Q4_K", seed=5), gguf_bytes("Q6_K", seed=6)
    fused = concat([reference_repack(q4, "Q4_K", (N, K), "q6k"), reference_repack(q6, "Q6_K", (N, K), "q6k")])
    assert fused.fmt == "q6k" and fused.shape == (2 * N, K)
    got = dequantize(fused)
    assert torch.equal(got[N:], _dequantized(q6, "Q6_K"))
    ref = _dequantized(q4, "Q4_K")
    assert (got[:N] - ref).norm() / ref.norm() < 0.03
    if kernels.available():  # and the op routes the Q4_K part the same way
        assert _same(repack(q4, "Q4_K", (N, K), "q6k"), reference_repack(q4, "Q4_K", (N, K), "q6k"))
