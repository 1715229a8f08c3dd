"""Optional int8 weights (`--quantization int8`): per-channel int8 weights, activations quantized per call.

Decode on a CPU is bound by reading the weights; int8 reads a quarter of the bytes and fbgemm's AVX2 int8 GEMM
is 2-4x faster than float32 at the batch sizes a local server sees (docs/benchmarks.md). It changes the
numbers, so it is opt-in: the default path stays bit-for-bit comparable with Hugging Face transformers.
"""

from __future__ import annotations

import torch

from turbofan.model.layers import CausalLM

QUANTIZABLE = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")


class Int8Linear:
    """A packed fbgemm int8 weight (and bias) that is called like F.linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8).double()
        zero_points = torch.zeros(w.shape[0], dtype=torch.long)
        qweight = torch.quantize_per_channel(w, scales, zero_points, axis=0, dtype=torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.float())
        self.out_features = w.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).float(), self.packed, True)
        return out.reshape(*shape[:-1], self.out_features)


def quantize_int8(model: CausalLM) -> CausalLM:
    if next(iter(model.parameters())).device.type != "cpu":
        raise ValueError("--quantization int8 uses fbgemm and is for CPU; on a GPU use float16/bfloat16")
    for layer in model.layers:
        for name in QUANTIZABLE:
            weight = getattr(layer, name)
            bias = layer.qkv_bias if name == "qkv_weight" else None
            delattr(layer, name)
            setattr(layer, name, Int8Linear(weight, bias))
            if name == "qkv_weight" and bias is not None:
                del layer.qkv_bias
                layer.qkv_bias = None
    head = model.lm_head
    del model.lm_head
    model.lm_head = Int8Linear(head)
    return model
