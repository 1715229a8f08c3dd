"""Block-quantized weights (blocks of 32 along K) for the `turbofan::qlinear` kernel, and their references.

Formats, chosen to hold GGUF's own precisions without loss where they can:
- q4: w = d * q + m with q in 0..15 (GGUF Q4_1; Q4_K's sub-blocks of 32 have the same form), two per byte,
  byte j of a block holding element j (low nibble) and j + 16 (high nibble); d, m float16 per block. 5 bits/weight.
- q8: w = d * q with q in -127..127 (GGUF Q8_0); d float16 per block. 9.5 bits/weight (codes, scale, code sum).
- q4k: GGUF Q4_K as stored: q4's codes, per block a 6-bit scale sc and min m (one byte each), per super-block of
  256 a float16 d and dmin; w = (d * sc) * q - dmin * m, formed in float32 as ggml does. 4.625 bits/weight.
- q6k: GGUF Q6_K as stored: codes 0..63 (q4's nibble planes plus a plane of the top two bits), per 16 an int8
  scale sc, per super-block a float16 d; w = (d * sc) * (q - 32). 6.5625 bits/weight.
The K formats come only from GGUF files (model/gguf_repack.py), and hold the file's values exactly. A weight's
format is told by its tensors: `QuantizedWeight.fmt`. In the K formats the fourth tensor (`wsum`) holds the
super-block scales (q4k: each super-block's 16 lanes of d, then of dmin; q6k: the 16 lanes of d).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32


PANEL = 16  # output rows per panel: a vector's lanes are output channels (turbofan/kernels/quant_matmul.cpp)


_BLOCK_BYTES = {"q4": 256, "q8": 512, "q4k": 256, "q6k": 384}  # one block of 32 of a 16-row panel
BITS = {"q4": 4, "q8": 8, "q4k": 4, "q6k": 6}


@dataclass
class QuantizedWeight:
    """A [N, K] weight in a block format (`bits` 4 or 8; 4 or 6 for the K formats), packed in panels of 16 rows for
    the kernel."""

    bits: int
    qweight: torch.Tensor  # q4, q4k: uint8 [N/16, K/32 * 256]; q8: int8 [N/16, K/32 * 512]; q6k: uint8 [.., K/32 * 384]
    scales: torch.Tensor  # float16 [N/16, K/32 * 16]; q4k: uint8 like that; q6k: int8 [N/16, K/32 * 32]
    mins: torch.Tensor | None  # q4: float16 like scales; q4k: uint8 like scales
    wsum: torch.Tensor | None  # q8: int32 like scales, each block's sum of codes; K formats: super-block scales

    @property
    def fmt(self) -> str:
        if self.scales.dtype == torch.uint8:
            return "q4k"
        if self.scales.dtype == torch.int8:
            return "q6k"
        return "q4" if self.mins is not None else "q8"

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0] * PANEL, self.qweight.shape[1] // _BLOCK_BYTES[self.fmt] * BLOCK

    @property
    def nbytes(self) -> int:
        parts = (self.qweight, self.scales, self.mins, self.wsum)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def assign_panels(self, first: int, part: QuantizedWeight) -> None:
        """Copy `part`'s panels into this weight from panel `first` on (a matrix filled slice by slice)."""
        for mine, theirs in zip((self.qweight, self.scales, self.mins, self.wsum),
                                (part.qweight, part.scales, part.mins, part.wsum)):  # fmt: skip
            if mine is not None:
                mine[first : first + theirs.shape[0]].copy_(theirs)


def allocate(n: int, k: int, fmt: str) -> QuantizedWeight:
    """An uninitialised [n, k] weight in format `fmt`, to be filled by `assign_panels`."""
    panels, nb = n // PANEL, k // BLOCK
    u8, f16 = torch.uint8, torch.float16
    qweight = torch.empty(panels, nb * _BLOCK_BYTES[fmt], dtype=torch.int8 if fmt == "q8" else u8)
    if fmt == "q4k":
        scales = torch.empty(panels, nb * PANEL, dtype=u8)
        return QuantizedWeight(4, qweight, scales, torch.empty_like(scales), torch.empty(panels, nb // 8 * 32, dtype=f16))
    if fmt == "q6k":
        scales = torch.empty(panels, nb * 2 * PANEL, dtype=torch.int8)
        return QuantizedWeight(6, qweight, scales, None, torch.empty(panels, nb // 8 * PANEL, dtype=f16))
    scales = torch.empty(panels, nb * PANEL, dtype=f16)
    mins = torch.empty_like(scales) if fmt == "q4" else None
    wsum = torch.empty(panels, nb * PANEL, dtype=torch.int32) if fmt == "q8" else None
    return QuantizedWeight(BITS[fmt], qweight, scales, mins, wsum)


def quantizable(weight: torch.Tensor) -> bool:
    return weight.dim() == 2 and weight.shape[1] % BLOCK == 0 and weight.shape[0] % PANEL == 0


def _panels(t: torch.Tensor) -> torch.Tensor:
    """[N, nb, ...] -> [N/16, nb, ..., 16 rows] contiguous: the panel-major order the kernel reads."""
    n, nb = t.shape[:2]
    t = t.reshape(n // PANEL, PANEL, nb, *t.shape[2:])
    return t.movedim(1, -1).contiguous()


def _pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [N, nb, 32] -> panel bytes. Each 64-byte group is 16 rows x one 4-element quad of K (row-major);
    for 4 bits the low nibbles hold quads 0..3 of a block and the high nibbles quads 4..7."""
    n, nb, _ = q.shape
    quads = _panels(q.reshape(n, nb, 8, 4).transpose(2, 3))  # [P, nb, 4 elems, 8 quads, 16 rows]
    quads = quads.permute(0, 1, 3, 4, 2)  # [P, nb, 8 quads, 16 rows, 4 elems]
    if bits == 4:
        quads = quads[:, :, :4] | (quads[:, :, 4:] << 4)
    return quads.reshape(n // PANEL, -1).contiguous()


def _unpack_codes(qw: QuantizedWeight) -> torch.Tensor:
    n, k = qw.shape
    nb = k // BLOCK
    raw = qw.qweight.reshape(n // PANEL, nb, -1, PANEL, 4).to(torch.int32)
    if qw.bits == 4:
        raw = torch.cat((raw & 0x0F, raw >> 4), dim=2)  # quads 0..3, then 4..7
    return raw.permute(0, 3, 1, 2, 4).reshape(n, nb, BLOCK)  # [N, nb, 32] in element order


def pack(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bits: int) -> QuantizedWeight:
    """Codes [N, K/32, 32] (q4: uint8 0..15; q8: int8 -127..127) with per-block float16 scales (and q4 mins)
    [N, K/32] -> the kernel's panel layout. The one place the layout is written: `quantize` and the GGUF
    repacker (turbofan/model/gguf_repack.py) both end here."""
    n = codes.shape[0]
    if bits == 8:
        wsum = codes.to(torch.int32).sum(-1, dtype=torch.int32)
        return QuantizedWeight(8, _pack_codes(codes, 8), _panels(scales).reshape(n // PANEL, -1), None,
                               _panels(wsum).reshape(n // PANEL, -1))
    if bits == 4:
        return QuantizedWeight(4, _pack_codes(codes, 4), _panels(scales).reshape(n // PANEL, -1),
                               _panels(mins).reshape(n // PANEL, -1), None)
    raise ValueError(f"bits must be 4 or 8, got {bits}")


def concat(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack weights of one format along N (q/k/v or gate/up fused into one matrix): panels are whole rows, so
    the parts' bytes are concatenated unchanged."""
    formats = {p.fmt for p in parts}
    if len(formats) != 1:
        raise ValueError(f"cannot fuse weights of different formats: {sorted(formats)}")

    def cat(field: str) -> torch.Tensor | None:
        tensors = [getattr(p, field) for p in parts]
        return None if tensors[0] is None else torch.cat(tensors, dim=0)

    return QuantizedWeight(parts[0].bits, cat("qweight"), cat("scales"), cat("mins"), cat("wsum"))


def quantize(weight: torch.Tensor, bits: int) -> QuantizedWeight:
    """Round a float [N, K] weight to the q4 or q8 block format (scales rounded to float16 first, so the codes
    are chosen against the scales actually stored)."""
    w = weight.detach().float()
    if not quantizable(w):
        raise ValueError(f"a [{', '.join(map(str, w.shape))}] weight needs N % {PANEL} == 0 and K % {BLOCK} == 0")
    n, k = w.shape
    blocks = w.reshape(n, k // BLOCK, BLOCK)
    if bits == 8:
        scales = (blocks.abs().amax(-1) / 127.0).half()
        d = scales.float()[..., None]
        q = torch.where(d > 0, blocks / d.clamp(min=1e-30), 0).round().clamp(-127, 127).to(torch.int8)
        return pack(q, scales, None, 8)
    if bits == 4:
        lo = blocks.amin(-1)
        mins = lo.half()
        scales = _grid_step(blocks, lo).half()
        d, m = scales.float()[..., None], mins.float()[..., None]
        q = torch.where(d > 0, (blocks - m) / d.clamp(min=1e-30), 0).round().clamp(0, 15).to(torch.uint8)
        return pack(q, scales, mins, 4)
    raise ValueError(f"bits must be 4 or 8, got {bits}")


def _grid_step(blocks: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """The 4-bit step of each block [N, nb, 32]: (max - min) / 15, unless the values already sit on a grid of at
    most 16 levels starting at the minimum, as a dequantized GGUF 4-bit block does. Then that grid's step is
    kept, so re-quantizing loses nothing: Q4_K picks its sub-block scales by search, so its codes need not reach
    0 and 15 and min/max would pick another, coarser grid."""
    hi = blocks.amax(-1)
    span = hi - lo
    fallback = span / 15.0
    ordered = blocks.sort(-1).values
    gaps = ordered.diff(dim=-1)
    tol = span[..., None] * 1e-4
    step = torch.where(gaps > tol, gaps, torch.inf).amin(-1)  # the smallest gap between distinct values
    step = torch.where(torch.isfinite(step), step, fallback)
    levels = (blocks - lo[..., None]) / step[..., None]
    on_grid = ((levels - levels.round()).abs() * step[..., None] <= tol).all(-1) & (levels.round().amax(-1) <= 15)
    return torch.where(on_grid & (step > 0), step, fallback)


def _unpanel(t: torch.Tensor, n: int) -> torch.Tensor:
    """[N/16, nb * 16] -> [N, nb]."""
    return t.reshape(n // PANEL, -1, PANEL).transpose(1, 2).reshape(n, -1)


def codes(qw: QuantizedWeight) -> torch.Tensor:
    """The integer codes [N, K/32, 32] (int32) of a quantized weight, in element order."""
    return _unpack_codes(qw)


def dequantize_rows(qw: QuantizedWeight, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of the weight as float32 [len(rows), K], reading only their bytes: the token-embedding lookup
    of a quantized embedding table (llama.cpp's get_rows), so the table never exists in float32."""
    if qw.fmt in ("q4k", "q6k"):
        return _k_rows(qw, rows)
    n, k = qw.shape
    nb = k // BLOCK
    rows = rows.reshape(-1).long()
    panel, lane = rows // PANEL, rows % PANEL
    if qw.bits == 8:
        raw = qw.qweight.view(n // PANEL, nb, 8, PANEL, 4)[panel, :, :, lane, :].float()  # [T, nb, 8 quads, 4]
    else:
        raw = qw.qweight.view(n // PANEL, nb, 4, PANEL, 4)[panel, :, :, lane, :]
        raw = torch.cat((raw & 0x0F, raw >> 4), dim=2).float()  # quads 0..3 (low nibbles), then 4..7
    w = raw.reshape(-1, nb, BLOCK) * qw.scales.view(n // PANEL, nb, PANEL)[panel, :, lane].float()[..., None]
    if qw.mins is not None:
        w = w + qw.mins.view(n // PANEL, nb, PANEL)[panel, :, lane].float()[..., None]
    return w.reshape(-1, k)


def k_parts(qw: QuantizedWeight, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Rows of a K-format weight as (codes [T, K/32, 32] int32, scale [T, K/32, 32] float32 per element, min
    [T, K/32] float32 or None): q4k w = scale * q - min; q6k w = scale * (q - 32). Scales formed as ggml forms them."""
    n, k = qw.shape
    nb, panels = k // BLOCK, n // PANEL
    rows = rows.reshape(-1).long()
    panel, lane = rows // PANEL, rows % PANEL
    groups = _BLOCK_BYTES[qw.fmt] // 64
    raw = qw.qweight.view(panels, nb, groups, PANEL, 4)[panel, :, :, lane, :].to(torch.int32)  # [T, nb, groups, 4]
    codes = torch.cat((raw[:, :, :4] & 0x0F, raw[:, :, :4] >> 4), dim=2)  # quads 0..7 of each block
    if qw.fmt == "q6k":
        shifts = torch.arange(4, dtype=torch.int32).mul(2)[None, None, :, None]
        high = torch.cat([(raw[:, :, 4 + h : 5 + h] >> shifts) & 3 for h in (0, 1)], dim=2)
        codes = codes | (high << 4)
        d = qw.wsum.view(panels, nb // 8, PANEL)[panel, :, lane].float().repeat_interleave(8, dim=1)  # [T, nb]
        sc = qw.scales.view(panels, nb, 2, PANEL)[panel, :, :, lane].float()  # [T, nb, 2 halves]
        scale = (d[..., None] * sc).repeat_interleave(16, dim=2)
        return codes.reshape(-1, nb, BLOCK), scale, None
    sup = qw.wsum.view(panels, nb // 8, 2, PANEL)[panel, :, :, lane].float()  # [T, nb/8, (d, dmin)]
    d, dmin = (sup[:, :, i].repeat_interleave(8, dim=1) for i in (0, 1))
    sc = qw.scales.view(panels, nb, PANEL)[panel, :, lane].float()
    m = qw.mins.view(panels, nb, PANEL)[panel, :, lane].float()
    return codes.reshape(-1, nb, BLOCK), (d * sc)[..., None].expand(-1, -1, BLOCK), dmin * m


def _k_rows(qw: QuantizedWeight, rows: torch.Tensor) -> torch.Tensor:
    codes, scale, mins = k_parts(qw, rows)
    if mins is None:
        w = scale * (codes - 32).float()
    else:
        w = scale * codes.float() - mins[..., None]
    return w.reshape(codes.shape[0], -1)


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    if qw.fmt in ("q4k", "q6k"):
        return _k_rows(qw, torch.arange(qw.shape[0]))
    n, k = qw.shape
    w = codes(qw).float() * _unpanel(qw.scales, n).float()[..., None]
    if qw.mins is not None:
        w = w + _unpanel(qw.mins, n).float()[..., None]
    return w.reshape(n, k)


def qlinear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel call for a 2-D x."""
    return torch.ops.turbofan.qlinear(x, qw.qweight, qw.scales, qw.mins, qw.wsum, bias)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row int8 blocks of 32 exactly as the kernel makes them: (codes [M, K/32, 32], scales, scale * sum)."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // BLOCK, BLOCK)
    d = blocks.abs().amax(-1) / 127.0
    inv = torch.where(d != 0, 1.0 / d, 0.0)
    q = (blocks * inv[..., None]).round().to(torch.int32)  # round half to even, like nearbyint
    return q, d, d * q.sum(-1).float()


def reference_qlinear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's math in float64 (exact integer dots, per-block scales): the yardstick for `turbofan::qlinear`."""
    q, d, s = quantize_activations(x)
    n = qw.shape[0]
    if qw.fmt in ("q4k", "q6k"):
        return _reference_k(q, d, s, qw, bias)
    dots = torch.einsum("mbk,nbk->mnb", q.double(), codes(qw).double())  # exact: |dot| < 2^20
    out = (dots * d.double()[:, None, :] * _unpanel(qw.scales, n).double()[None]).sum(-1)
    if qw.mins is not None:
        out = out + (s.double()[:, None, :] * _unpanel(qw.mins, n).double()[None]).sum(-1)
    if bias is not None:
        out = out + bias.double()
    return out.float()


def _reference_k(q: torch.Tensor, d: torch.Tensor, s: torch.Tensor, qw: QuantizedWeight,
                 bias: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """`reference_qlinear` for the K formats: per block (per half of 16 for q6k) the exact integer dot times the
    activation scale and the weight's float32 scale; q4k's min times the activation block sum."""
    codes, scale, mins = k_parts(qw, torch.arange(qw.shape[0]))
    m, nb = q.shape[0], q.shape[1]
    if mins is None:  # q6k: (sum of q * x over each half of 16) - 32 * (sum of x over it), times d * sc
        qh = q.double().reshape(m, nb, 2, 16)
        ch = codes.double().reshape(-1, nb, 2, 16)
        dots = torch.einsum("mbhk,nbhk->mnbh", qh, ch) - 32 * qh.sum(-1)[:, None]
        sh = scale.double().reshape(-1, nb, 2, 16)[..., 0]  # [N, nb, 2]
        out = (dots * d.double()[:, None, :, None] * sh[None]).sum((-1, -2))
    else:
        dots = torch.einsum("mbk,nbk->mnb", q.double(), codes.double())
        out = (dots * d.double()[:, None, :] * scale.double()[None, :, :, 0]).sum(-1)
        out = out - (s.double()[:, None, :] * mins.double()[None]).sum(-1)
    if bias is not None:
        out = out + bias.double()
    return out.float()
