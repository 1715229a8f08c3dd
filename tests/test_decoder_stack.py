"""The decoder layers as one C++ call (turbofan/kernels/decoder_stack.cpp) against the per-layer Python forward.

Both call the same kernels in the same order, so logits and the KV cache must be the same bytes, on every
architecture (biases, q/k norms, Gemma's sandwich norms, GELU and sliding windows), float and quantized weights,
for a step mixing prefill chunks and decode rows."""

from __future__ import annotations

import pytest
import torch

from turbofan import kernels
from turbofan.model.batch import ForwardBatch
from turbofan.model.runner import ModelRunner

pytestmark = pytest.mark.skipif(not kernels.available(), reason="turbofan kernels unavailable")

BLOCK = 4


def _steps(vocab: int) -> list[ForwardBatch]:
    """Two steps over two sequences: prefills of 6 and 9 tokens, then a decode row and a 5-token chunk (past
    Gemma's window of 8)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (30,), generator=g).tolist()
    tables = [[1, 2, 3, 4], [5, 6, 7, 8]]
    return [
        ForwardBatch.build([ids[:6], ids[6:15]], [0, 0], tables, [[5], [8]], BLOCK),
        ForwardBatch.build([ids[15:16], ids[16:21]], [6, 9], tables, [[0], [0, 2, 4]], BLOCK),
    ]


@pytest.mark.parametrize("quantization", ["none", "int4", "int8"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_the_stack_is_the_per_layer_forward(tiny_models, arch, quantization):
    runner = ModelRunner(tiny_models[arch], num_blocks=16, block_size=BLOCK, quantization=quantization)
    model = runner.model
    stack = model.stack
    assert stack is not None
    steps = _steps(model.args.vocab_size)
    calls = []

    class Counted:  # the stack, counting its calls: the stacked run must really take it
        def forward(self, *args):
            calls.append(1)
            return stack.forward(*args)

    results = []
    for use_stack in (True, False):
        model.stack = Counted() if use_stack else None
        runner.kv_cache.zero_()
        logits = [runner.execute(batch) for batch in steps]
        results.append((logits, runner.kv_cache.clone()))
    assert len(calls) == len(steps)
    (stacked, kv_stacked), (layered, kv_layered) = results
    for a, b in zip(stacked, layered, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(kv_stacked, kv_layered) and kv_stacked.abs().sum() > 0


def test_a_stack_needs_a_full_set_of_weights():
    with pytest.raises(RuntimeError, match="expected 46 weights for 2 layers"):
        torch.classes.turbofan.DecoderStack([torch.zeros(1)] * 23, [0, 0], [0, 0], 4, 2, 1e-6, 0.125, False)
