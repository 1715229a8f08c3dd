"""The own fused layer ops against the eager PyTorch ops they replace."""

from __future__ import annotations

import pytest
import torch

from turbofan import kernels
from turbofan.model import layers

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels: {kernels.unavailable_reason()}")
TOL = {"atol": 2e-6, "rtol": 2e-6}  # a different float summation order for the mean of squares, nothing else


@pytest.mark.parametrize("shape", [(1, 576), (7, 640), (5, 3, 64), (2, 4, 256), (3, 37)])
def test_rms_norm(shape):
    torch.manual_seed(0)
    x, w = torch.randn(shape) * 3, torch.randn(shape[-1])
    torch.testing.assert_close(layers.rms_norm(x, w, 1e-6, fused=True), layers.rms_norm(x, w, 1e-6), **TOL)


def test_add_rms_norm():
    torch.manual_seed(1)
    x, d, w = torch.randn(9, 576), torch.randn(9, 576), torch.randn(576)
    s, h = layers.add_rms_norm(x, d, w, 1e-5, fused=True)
    rs, rh = layers.add_rms_norm(x, d, w, 1e-5)
    assert torch.equal(s, rs)
    torch.testing.assert_close(h, rh, **TOL)


def test_rope_on_a_strided_view():
    torch.manual_seed(2)
    t, h, kvh, d = 6, 4, 2, 64
    qkv = torch.randn(t, (h + 2 * kvh) * d)
    q = qkv[:, : h * d].reshape(t, h, d)  # a view with the fused projection's row stride
    ang = torch.randn(t, 1, d // 2)
    cos, sin = ang.cos(), ang.sin()
    torch.testing.assert_close(layers.rotate(q, cos, sin, fused=True), layers.rotate(q, cos, sin), **TOL)


ISAS = [isa for isa in ("avx512", "avx2", "scalar") if kernels.ISA_LEVELS[isa] <= kernels.ISA_LEVELS[kernels.detected_isa()]]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("gelu", [False, True])
def test_gated_act(gelu, isa):
    """The own vectorisable exp is within ~2 ulp; extreme inputs saturate instead of overflowing."""
    torch.manual_seed(3)
    gu = torch.randn(5, 2 * 96) * 4
    gu[0, :4] = torch.tensor([-200.0, 200.0, -90.0, 90.0])
    with kernels.forced_isa(isa):
        out = layers.gated_act(gu, gelu, fused=True)
    torch.testing.assert_close(out, layers.gated_act(gu, gelu), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
def test_norm_and_rope_on_every_isa(isa):
    torch.manual_seed(5)
    x, w = torch.randn(6, 576), torch.randn(576)
    q = torch.randn(6, 9, 64)
    ang = torch.randn(6, 1, 32)
    with kernels.forced_isa(isa):
        torch.testing.assert_close(layers.rms_norm(x, w, 1e-6, fused=True), layers.rms_norm(x, w, 1e-6), **TOL)
        got = layers.rotate(q, ang.cos(), ang.sin(), fused=True)
    torch.testing.assert_close(got, layers.rotate(q, ang.cos(), ang.sin()), **TOL)


def test_rows_are_independent():
    torch.manual_seed(4)
    x, w = torch.randn(8, 576), torch.randn(576)
    full = layers.rms_norm(x, w, 1e-6, fused=True)
    assert torch.equal(layers.rms_norm(x[3:4], w, 1e-6, fused=True)[0], full[3])


def test_bad_input_is_refused():
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.turbofan.rms_norm(torch.randn(2, 8).double(), torch.randn(8).double(), 1e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qk_norm", [False, True])
def test_qkv_rope_equals_split_norm_rotate(isa, qk_norm):
    torch.manual_seed(6)
    t, h, kvh, d = 5, 4, 2, 32
    qkv = torch.randn(t, (h + 2 * kvh) * d)
    ang = torch.randn(t, 1, d // 2)
    cos, sin = ang.cos(), ang.sin()
    qn, kn = (torch.randn(d), torch.randn(d)) if qk_norm else (None, None)
    with kernels.forced_isa(isa):
        q, k, v = torch.ops.turbofan.qkv_rope(qkv, cos, sin, h, kvh, qn, kn, 1e-6)
    rq, rk, rv = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    rq, rk, rv = rq.reshape(t, h, d), rk.reshape(t, kvh, d), rv.reshape(t, kvh, d)
    if qk_norm:
        rq, rk = layers.rms_norm(rq, qn, 1e-6), layers.rms_norm(rk, kn, 1e-6)
    torch.testing.assert_close(q, layers.rotate(rq, cos, sin), **TOL)
    torch.testing.assert_close(k, layers.rotate(rk, cos, sin), **TOL)
    assert torch.equal(v, rv)


@pytest.mark.parametrize("vocab, rows", [(49152, [0, 2, 1]), (100, [3, 0]), (33, [1]), (262144, [0])])
def test_apply_token_bitmask_equals_the_unpacked_mask(vocab, rows):
    """The grammar-mask op (constraints.GrammarMasks) against numpy's unpackbits: the same -inf positions, the
    other logits untouched, rows not listed untouched, bits past the vocabulary ignored, popcounts as counts."""
    import numpy as np

    rng = np.random.default_rng(vocab)
    logits = torch.from_numpy(rng.standard_normal((max(rows) + 2, vocab), dtype=np.float32))
    words = (vocab + 31) // 32 + 1  # wider than needed, as GrammarMasks' buffer may be
    bitmask = rng.integers(0, 2**32, (len(rows) + 1, words), dtype=np.uint32)
    bitmask[0, : words // 2] = 0  # whole words banned
    bitmask[-1 if len(rows) > 1 else 0, words // 2 :] = 0xFFFFFFFF  # whole words allowed, past the vocabulary too
    bitmask = torch.from_numpy(bitmask.view(np.int32))
    allowed = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool)
    expected = logits.clone()
    for j, r in enumerate(rows):
        expected[r, torch.from_numpy(~allowed[j])] = float("-inf")
    counts = torch.ops.turbofan.apply_token_bitmask(logits, bitmask, torch.tensor(rows))
    assert torch.equal(logits, expected)
    assert counts.tolist() == allowed[: len(rows)].sum(axis=1).tolist()


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_load():
    """cpp_extension's plain `lock` file, left in the cache folder by a build killed midway, made every later load
    wait on it forever; turbofan's flock (dropped by the OS with its process) lets the next load remove it."""
    import subprocess
    import sys

    _, build = kernels._sources()
    stale = build / "lock"
    stale.write_text("")
    code = "from turbofan import kernels; assert kernels.available(), kernels.unavailable_reason()"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert not stale.exists()


@pytest.mark.parametrize("rows, n", [(1, 49152), (64, 49152), (3, 1), (5, 100), (2, 262144), (0, 7)])
def test_argmax_rows_is_torch_argmax(rows, n):
    g = torch.Generator().manual_seed(rows * 7 + n)
    x = torch.randn(rows, n, generator=g)
    if rows >= 3 and n >= 100:  # ties (the first wins), a NaN (counts as the largest), a row of -inf
        x[0, 10] = x[0, 60] = x[0].max() + 1
        x[1, n - 1] = float("nan")
        x[2] = float("-inf")
    assert torch.equal(torch.ops.turbofan.argmax_rows(x), x.argmax(-1))
    if rows:
        assert torch.equal(torch.ops.turbofan.argmax_rows(x[:, ::1].t().contiguous().t()), x.argmax(-1))
