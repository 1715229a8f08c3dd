"""--quantization int8: close to float32, runs through the whole engine, refuses what it cannot do."""

from __future__ import annotations

import pytest
import torch

from turbofan.model.batch import ForwardBatch
from turbofan.model.quant import Int8Linear
from turbofan.model.runner import ModelRunner


def test_int8_linear_is_close_to_float():
    torch.manual_seed(0)
    w, b, x = torch.randn(96, 64), torch.randn(96), torch.randn(5, 64)
    ref = torch.nn.functional.linear(x, w, b)
    out = Int8Linear(w, b)(x)
    assert out.shape == ref.shape
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.03, rel


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_int8_model_logits_track_float32(tiny_models, arch):
    path = tiny_models[arch]
    fp = ModelRunner(path, num_blocks=16, block_size=4)
    q8 = ModelRunner(path, num_blocks=16, block_size=4, quantization="int8")
    ids = torch.randint(0, fp.args.vocab_size, (11,)).tolist()
    batch = ForwardBatch.build([ids], [0], [[0, 1, 2]], [list(range(11))], 4)
    a, b = fp.execute(batch), q8.execute(batch)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert bool((cos > 0.99).all()), cos
    assert not torch.equal(a, b)  # it really is a different (quantized) computation


def test_int8_runs_through_the_engine(make_llm):
    from turbofan import SamplingParams

    llm = make_llm("llama", quantization="int8")
    out = llm.generate(["Hello world"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 12


def test_unknown_quantization_is_refused(tiny_models):
    with pytest.raises(ValueError, match="int8"):
        ModelRunner(tiny_models["llama"], num_blocks=4, quantization="int4")
