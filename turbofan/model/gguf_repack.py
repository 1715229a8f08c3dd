"""GGUF quantized blocks -> turbofan's q4/q8 kernel formats, without a float32 copy of the tensor.

Where turbofan's format holds the file's grid, the codes are carried over unchanged:
- Q4_0 (w = d * (q - 8)) and Q4_1 (w = d * q + m) -> q4 with the file's own float16 d and m: exact.
- Q4_K (super-blocks of 256: w = d * sc_j * q - dmin * m_j per sub-block j of 32) -> q4 with the same codes and
  each sub-block's scale and min rounded once to float16 (the kernel's scale type; relative error <= 2^-11).
- Q8_0 (w = d * q) -> q8 with the same codes and d: exact (a block using the code -128, which llama.cpp's
  quantizer never writes, goes the general way).
- Q4_K -> q4k and Q6_K -> q6k (kernels/quant.py's K formats): the file's blocks rearranged into panels, exact.
Every other type (Q5_x, IQ*, F16 ...) and every mixed fusion is dequantized a slice of rows at a time and
re-quantized to the planned format (`quantize`), so the float32 working set is one slice, never the tensor.

The C++ op `turbofan::gguf_repack` (kernels/gguf_repack.cpp) does the same in one pass over the file's bytes (a
1.5B model in about a second instead of half a minute) for the common types; this module is its reference (the
tests require identical bytes) and the path for the rest, or where the kernels cannot be compiled.
"""

from __future__ import annotations

import numpy as np
import torch

from turbofan.kernels.quant import BITS, PANEL, QuantizedWeight, _pack_codes, _panels, concat, pack, quantize

_Q4_K_BLOCK = 144  # bytes of one 256-weight Q4_K super-block
SLICE_ELEMENTS = 1 << 24  # weights per slice of rows: 64 MiB of float32 at most on the general path


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 stored at byte `start` of every block [..., bytes] -> [...] (float16)."""
    return np.ascontiguousarray(blocks[..., start : start + 2]).view(np.float16)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] packed bytes -> [..., 32] codes: element j in the low nibble of byte j, j + 16 in the high one."""
    return np.concatenate((qs & 0x0F, qs >> 4), axis=-1)


def _q4_0(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    blocks = raw.reshape(raw.shape[0], -1, 18)
    d = _f16(blocks, 0)
    return _nibbles(blocks[..., 2:]), d, (d.astype(np.float32) * -8).astype(np.float16)


def _q4_1(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    blocks = raw.reshape(raw.shape[0], -1, 20)
    return _nibbles(blocks[..., 4:]), _f16(blocks, 0), _f16(blocks, 2)


def _q4_k_fields(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K rows [N, bytes] -> codes [N, K/32, 32], 6-bit sc and m [N * K/256, 8], float16 d and dmin [N * K/256]."""
    from gguf.quants import Q4_K

    n = raw.shape[0]
    blocks = raw.reshape(-1, _Q4_K_BLOCK)
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16])
    qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    codes = (qs & 0x0F).reshape(n, -1, 32)  # sub-block 2j: low nibbles of qs[32j:32j+32]; 2j+1: high nibbles
    return codes, sc, m, _f16(blocks, 0), _f16(blocks, 2)


def _q4_k(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K -> q4: the sub-block scale d * sc and min dmin * m rounded once to float16."""
    n = raw.shape[0]
    codes, sc, m, d, dmin = _q4_k_fields(raw)
    scales = (d.astype(np.float32)[:, None] * sc.astype(np.float32)).astype(np.float16).reshape(n, -1)
    mins = (-(dmin.astype(np.float32)[:, None] * m.astype(np.float32))).astype(np.float16).reshape(n, -1)
    return codes, scales, mins


_Q4_DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k}


def _q8_0(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    blocks = raw.reshape(raw.shape[0], -1, 34)
    codes = blocks[..., 2:].view(np.int8)
    if (codes == -128).any():
        return None
    return codes, _f16(blocks, 0)


def _slice_rows(k: int) -> int:
    return max(PANEL, SLICE_ELEMENTS // max(k, 1) // PANEL * PANEL)


def _direct(raw: np.ndarray, type_name: str, bits: int) -> QuantizedWeight | None:
    if bits == 4 and type_name in _Q4_DECODERS:
        codes, scales, mins = _Q4_DECODERS[type_name](raw)
        return pack(torch.from_numpy(codes), torch.from_numpy(scales), torch.from_numpy(mins), 4)
    if bits == 8 and type_name == "Q8_0":
        decoded = _q8_0(raw)
        if decoded is not None:
            return pack(torch.from_numpy(np.ascontiguousarray(decoded[0])), torch.from_numpy(decoded[1]), None, 8)
    return None


# ggml types the C++ op decodes (kernels/gguf_repack.cpp); q4 it makes from the 4-bit ones only.
KERNEL_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"}


# The K formats hold exactly one ggml type each.
K_SOURCES = {"q4k": "Q4_K", "q6k": "Q6_K"}


def repack(raw: np.ndarray, type_name: str, shape: tuple[int, int], fmt: str, use_kernel: bool = True) -> QuantizedWeight:
    """A GGUF tensor's stored bytes `raw` [N, bytes per row] (ggml type `type_name`, torch shape [N, K]) in
    turbofan's format `fmt` (q4, q8, q4k, q6k): by the C++ op where it decodes the type, else here."""
    from gguf import GGMLQuantizationType

    from turbofan import kernels

    if fmt == "q4k" and type_name != "Q4_K":
        raise ValueError(f"q4k holds Q4_K tensors only, not {type_name}")
    native = fmt == "q8" or (fmt in K_SOURCES and type_name == K_SOURCES[fmt]) or (fmt == "q4" and type_name in _Q4_DECODERS)
    kernel_ok = type_name in KERNEL_TYPES and native
    if use_kernel and fmt == "q6k" and type_name in KERNEL_TYPES and not native and kernels.available():
        values = torch.ops.turbofan.gguf_dequantize(  # the reference's float values, decoded in C++
            torch.from_numpy(np.ascontiguousarray(raw)), GGMLQuantizationType[type_name].value, shape[1])
        return quantize_q6k(values)
    if use_kernel and kernel_ok and kernels.available():
        qweight, scales, mins, wsum = torch.ops.turbofan.gguf_repack(
            torch.from_numpy(np.ascontiguousarray(raw)), GGMLQuantizationType[type_name].value, shape[1], fmt
        )
        return QuantizedWeight(BITS[fmt], qweight, scales, mins if fmt in ("q4", "q4k") else None,
                               wsum if fmt != "q4" else None)  # fmt: skip
    return reference_repack(raw, type_name, shape, fmt)


def _k_format(raw: np.ndarray, fmt: str) -> QuantizedWeight:
    """Q4_K -> q4k, Q6_K -> q6k in numpy and PyTorch (the C++ op's reference)."""
    n = raw.shape[0]
    if fmt == "q4k":
        codes_np, sc, m, d, dmin = _q4_k_fields(raw)
        codes = torch.from_numpy(np.ascontiguousarray(codes_np))
        supers = np.stack([d, dmin], axis=-1).reshape(n, -1, 2)  # [N, K/256, (d, dmin)]
        return QuantizedWeight(
            4, _pack_codes(codes, 4), _panels(torch.from_numpy(sc.reshape(n, -1).copy())).reshape(n // PANEL, -1),
            _panels(torch.from_numpy(m.reshape(n, -1).copy())).reshape(n // PANEL, -1),
            _panels(torch.from_numpy(supers)).reshape(n // PANEL, -1),
        )
    blocks = raw.reshape(n, -1, 210)
    ql, qh = blocks[..., :128], blocks[..., 128:192]
    scales = blocks[..., 192:208].view(np.int8)  # [N, K/256, 16]
    # element i of a super-block: half h = i // 128; low nibble from ql[64h + j % 64] (high nibble past 64);
    # top bits from qh[32h + j % 32] >> 2 * (j // 32), with j = i % 128 (as gguf-py's Q6_K decoder)
    lo = (ql.reshape(n, -1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)) & 0x0F
    hi = (qh.reshape(n, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 1, 4, 1)) & 0x03
    codes = torch.from_numpy(np.ascontiguousarray(lo.reshape(n, -1, 256) | (hi.reshape(n, -1, 256) << 4)))
    return pack_q6k(codes.reshape(n, -1, 32), torch.from_numpy(scales.reshape(n, -1, 2).copy()),
                    torch.from_numpy(np.ascontiguousarray(_f16(blocks, 208))))


def pack_q6k(codes: torch.Tensor, sc: torch.Tensor, d: torch.Tensor) -> QuantizedWeight:
    """q6k panels from codes [N, K/32, 32] (0..63), int8 scales per half block [N, K/32, 2] and float16 d per
    super-block [N, K/256]."""
    n = codes.shape[0]
    quads = codes.reshape(n, -1, 8, 4)
    low = (quads & 0x0F).reshape(n, -1, 32).to(torch.uint8)
    top = (quads >> 4).to(torch.int32)  # [N, nb, 8, 4]
    planes = sum(top[:, :, t::4] << (2 * t) for t in range(4)).to(torch.uint8)  # [N, nb, 2 planes, 4]
    planes = _panels(planes).permute(0, 1, 2, 4, 3).reshape(n // PANEL, -1, 128)  # [P, nb, 2 planes x 16 rows x 4]
    nb = planes.shape[1]
    qweight = torch.cat((_pack_codes(low, 4).reshape(n // PANEL, nb, 256), planes), dim=2).reshape(n // PANEL, -1)
    return QuantizedWeight(6, qweight, _panels(sc.to(torch.int8)).reshape(n // PANEL, -1), None,
                           _panels(d.to(torch.float16)).reshape(n // PANEL, -1))


def quantize_q6k(w: torch.Tensor) -> QuantizedWeight:
    """Float weights [N, K] (K % 256 == 0) in q6k: per 16 a scale s = amax / 31, per 256 d = max(s) / 127 in
    float16, sc = round(s / d); codes round(w / (d * sc)) in -32..31, stored + 32. For a matrix fused from a
    Q6_K part and Q4_K parts (q/k/v of a Q4_K_M file): the Q4_K values take a 6-bit grid (about a quarter of their
    own step added as error) instead of 8.5 bits more per weight in q8."""
    n, k = w.shape
    halves = w.float().reshape(n, k // 256, 16, 16)
    s = halves.abs().amax(-1) / 31.0  # [N, K/256, 16]
    d = (s.amax(-1) / 127.0).half()  # [N, K/256]
    df = d.float()[..., None]
    sc = torch.where(df > 0, s / df.clamp(min=1e-30), 0).round().clamp(0, 127)
    ds = (df * sc)[..., None]  # d * sc in float32, as the kernel forms it
    q = torch.where(ds > 0, halves / ds.clamp(min=1e-30), 0).round().clamp(-32, 31) + 32
    return pack_q6k(q.to(torch.int32).reshape(n, -1, 32), sc.to(torch.int8).reshape(n, -1, 2), d)


def reference_repack(raw: np.ndarray, type_name: str, shape: tuple[int, int], fmt: str) -> QuantizedWeight:
    """The same in numpy and PyTorch, a slice of rows at a time: the yardstick for the C++ op."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if fmt in K_SOURCES and type_name == K_SOURCES[fmt]:
        return _k_format(raw, fmt)
    if fmt == "q6k":  # another type in a fused q6k matrix: its float values, a slice of rows at a time
        n, k = shape
        step = _slice_rows(k)
        qtype = GGMLQuantizationType[type_name]
        parts = [quantize_q6k(torch.from_numpy(np.asarray(dequantize(raw[i : i + step], qtype), dtype=np.float32)
                                               .reshape(-1, k))) for i in range(0, n, step)]  # fmt: skip
        return parts[0] if len(parts) == 1 else concat(parts)
    if fmt in K_SOURCES:
        raise ValueError(f"{fmt} holds {K_SOURCES[fmt]} tensors only, not {type_name}")
    bits = BITS[fmt]

    n, k = shape
    step = _slice_rows(k)
    parts = []
    qtype = GGMLQuantizationType[type_name]
    for start in range(0, n, step):
        rows = raw[start : start + step]
        q = _direct(rows, type_name, bits)
        if q is None:
            values = np.asarray(dequantize(rows, qtype), dtype=np.float32).reshape(rows.shape[0], k)
            q = quantize(torch.from_numpy(values), bits)
        parts.append(q)
    return parts[0] if len(parts) == 1 else concat(parts)
