"""Low-bit weights: the qlinear kernel against its reference on every ISA path, the quantization plans, and a
quantized model through the engine (batch-invariant)."""

from __future__ import annotations

import pytest
import torch

from turbofan import kernels
from turbofan.kernels.quant import dequantize, qlinear, quantize, reference_qlinear
from turbofan.model.batch import ForwardBatch
from turbofan.model.quant import QuantLinear, _format_of
from turbofan.model.runner import ModelRunner

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"kernels: {kernels.unavailable_reason()}")
ISAS = [isa for isa in ("avx512", "avx2", "scalar") if kernels.ISA_LEVELS[isa] <= kernels.ISA_LEVELS[kernels.detected_isa()]]


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_round_trip_error_is_bounded(bits):
    torch.manual_seed(0)
    w = torch.randn(48, 96)
    back = dequantize(quantize(w, bits))
    blocks = w.reshape(48, 3, 32)
    span = blocks.amax(-1) - blocks.amin(-1) if bits == 4 else blocks.abs().amax(-1)
    step = span / (15 if bits == 4 else 127)  # half a step of rounding, plus float16 scales
    err = (back - w).reshape(48, 3, 32).abs().amax(-1)
    assert bool((err <= step * 0.5 + span * 2e-3 + 1e-6).all())


@pytest.mark.parametrize("codes_used", [(0, 15), (2, 12)])
def test_quantize_is_lossless_on_a_grid(codes_used):
    """Values already on a 4-bit grid come back exactly: a dequantized GGUF Q4_1 block spans codes 0..15, a Q4_K
    sub-block (scales found by search) often fewer; min/max alone would re-round the latter onto another grid."""
    torch.manual_seed(1)
    lo, hi = codes_used
    d = (torch.rand(16, 2, 1) + 0.01).half().float()
    m = -torch.rand(16, 2, 1).half().float()
    q = torch.randint(lo, hi + 1, (16, 2, 32)).float()
    q[..., 0], q[..., 1], q[..., 2] = lo, hi, lo + 1
    w = (q * d + m + lo * d).reshape(16, 64) if lo == 0 else (q * d + m).reshape(16, 64)
    back = dequantize(quantize(w, 4))
    if lo == 0:
        assert torch.equal(back, w)
    else:  # the grid now starts at the block minimum, held in float16: exact up to that rounding
        torch.testing.assert_close(back, w, atol=float(m.abs().max()) * 2**-11 + float(d.max()) * 2**-8, rtol=0)


@needs_kernels
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [1, 3, 4, 9, 17])
def test_kernel_equals_reference(bits, isa, m):
    """The kernel's block dots are exact integers; only the float accumulation order differs from the float64
    reference, so 1e-5 relative to the output scale holds."""
    torch.manual_seed(m)
    w, x, bias = torch.randn(64, 160) * 0.1, torch.randn(m, 160), torch.randn(64)
    qw = quantize(w, bits)
    with kernels.forced_isa(isa):
        out = qlinear(x, qw, bias)
    ref = reference_qlinear(x, qw, bias)
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=0)
    # and it is close to dequantize-then-matmul (the activation rounding is the only difference)
    dense = torch.nn.functional.linear(x, dequantize(qw), bias)
    assert (out - dense).norm() / dense.norm() < 0.02


@needs_kernels
@pytest.mark.parametrize("bits", [4, 8])
def test_isa_paths_are_bit_identical_and_rows_independent(bits):
    """Same integer dots and float order on every path; a row's output never depends on its batch mates."""
    torch.manual_seed(2)
    w, x = torch.randn(96, 576) * 0.05, torch.randn(13, 576)
    qw = quantize(w, bits)
    outs = {}
    for isa in ISAS:
        with kernels.forced_isa(isa):
            outs[isa] = qlinear(x, qw)
    for isa in ISAS[1:]:
        assert torch.equal(outs[ISAS[0]], outs[isa]), isa
    full = outs[ISAS[0]]
    for i in (0, 5, 12):
        assert torch.equal(qlinear(x[i : i + 1], qw)[0], full[i])
    mates = x.clone()
    mates[1:] *= 1000  # wild batch mates change nothing for row 0...
    assert torch.equal(qlinear(mates, qw)[0], full[0])
    mates[0, 0] += 1.0  # ...while a change in row 0 itself does
    assert not torch.equal(qlinear(mates, qw)[0], full[0])


@needs_kernels
def test_kernel_refuses_bad_shapes():
    qw = quantize(torch.randn(32, 64), 4)
    with pytest.raises(RuntimeError, match="does not match K"):
        torch.ops.turbofan.qlinear(torch.randn(2, 96), qw.qweight, qw.scales, qw.mins, None, None)
    with pytest.raises(ValueError, match="N % 16"):
        quantize(torch.randn(30, 64), 4)


def test_quant_linear_falls_back_without_kernels(monkeypatch):
    torch.manual_seed(3)
    w, x = torch.randn(32, 64), torch.randn(2, 5, 64)
    monkeypatch.setattr(kernels, "available", lambda: False)  # as on a machine without a compiler
    lin = QuantLinear.of(w, 8)
    out = lin(x)
    torch.testing.assert_close(out, x @ dequantize(lin.q).T)


def test_gguf_types_map_to_block_formats():
    assert _format_of({"Q4_1"}) == "q4"
    assert _format_of({"Q4_K"}) == "q4k" and _format_of({"Q6_K"}) == "q6k"  # the file's own blocks
    assert _format_of({"Q4_K", "Q6_K"}) == "q6k"  # a mixed Q4_K_M fusion: the Q6_K grid
    assert _format_of({"Q4_1", "Q8_0"}) == "q8"  # otherwise the most precise part decides
    assert _format_of({"Q8_0"}) == "q8" and _format_of({"Q5_0"}) == "q8"
    assert _format_of({"F32"}) is None and _format_of({"Q4_K", "F16"}) is None


@pytest.mark.parametrize("mode", ["int8", "int4", "int4_all"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_quantized_model_logits_track_float32(tiny_models, arch, mode):
    path = tiny_models[arch]
    fp = ModelRunner(path, num_blocks=16, block_size=4, quantization="none")
    q = ModelRunner(path, num_blocks=16, block_size=4, quantization=mode)
    assert fp.quantization == "float32"
    # int4 keeps the embedding and LM head in 8 bits; int4_all takes them to 4 too (a draft model's weights). A
    # tied head is the embedding: one matrix.
    tables = 1 if q.model.lm_head is q.model.embed else 2
    assert q.quantization == {"int8": "q8: {n}", "int4": "q4: {m}, q8: {t}", "int4_all": "q4: {n}"}[mode].format(
        n=4 * q.args.num_layers + tables, m=4 * q.args.num_layers, t=tables
    )
    assert not isinstance(q.model.embed, torch.Tensor)  # no float32 table on a quantized path
    ids = torch.randint(0, fp.args.vocab_size, (11,)).tolist()
    batch = ForwardBatch.build([ids], [0], [[0, 1, 2]], [list(range(11))], 4)
    a, b = fp.execute(batch), q.execute(batch)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert bool((cos > (0.99 if mode == "int8" else 0.9)).all()), cos
    assert not torch.equal(a, b)  # it really is a different (quantized) computation


def test_auto_keeps_a_safetensors_model_float32(tiny_models):
    assert ModelRunner(tiny_models["llama"], num_blocks=4).quantization == "float32"


def test_quantized_model_is_batch_invariant(make_llm):
    """Greedy and seeded tokens of a request are the same alone and among batch mates on the int4 path."""
    from turbofan import SamplingParams

    llm = make_llm("llama", quantization="int4")
    prompts = ["Hello world", "a b c d e f g", "the quick brown fox jumps", "x"]
    for params in (
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True),
    ):
        alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
        together = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert alone == together


def test_quantized_logprobs_do_not_depend_on_chunks_cache_hits_or_speculation(make_llm):
    """Bit for bit on the int4 path: every generated token's logprob is the same for a request alone on a fresh
    engine, among batch mates with its prompt cut into 40-token chunks, again with its whole prompt in the prefix
    cache, and with n-gram speculation verifying drafts. On a 3-layer toy the int8 activation rounding hides most
    last-bit differences, so this checks the plumbing end to end; the kernel's own test (test_attention.py) and
    the real-model one (test_real_models.py, 30 layers, where such a difference flips tokens) are the sharp ones."""
    from turbofan import SamplingParams

    base = "the quick brown fox jumps over the lazy dog " * 5
    prompts = [base + tail for tail in ("and then", "a b c d e f", "x y z", "hello world again and again")]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)

    def run(llm, batch):
        outs = [o.outputs[0] for o in llm.generate(batch, params, use_tqdm=False)]
        return [(o.token_ids, [next(iter(d.values())).logprob for d in o.logprobs]) for o in outs]

    alone = [run(make_llm("llama", quantization="int4"), [p])[0] for p in prompts]
    chunked = make_llm("llama", quantization="int4", max_num_batched_tokens=40)
    assert run(chunked, prompts) == alone
    assert run(chunked, prompts) == alone  # the prompts are all in the prefix cache now
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1,
            "adaptive": False}  # fmt: skip
    speculating = make_llm("llama", quantization="int4", speculative_config=spec)
    assert run(speculating, prompts) == alone
    stats = speculating.speculative_stats()
    assert stats["num_accepted_tokens"] > 0 and stats["num_draft_tokens"] > stats["num_accepted_tokens"], stats


def test_unknown_quantization_is_refused(tiny_models):
    with pytest.raises(ValueError, match="int4"):
        ModelRunner(tiny_models["llama"], num_blocks=4, quantization="int3")
