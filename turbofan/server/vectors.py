"""Embedding vectors as JSON text, written by numpy in bulk.

An answer of 2,048 vectors of 1,536 floats is three million numbers: `.tolist()` makes a Python float of each (24
bytes, plus a list slot), and FastAPI's encoder then walks every one of them again. Here each number is formatted
with array operations into a fixed-width field (no Python object per value): nine significant digits in scientific
notation, `-1.23456789e-02`, which reads back as exactly the same float32 (FLT_DECIMAL_DIG is 9). A positive
number has a space where the sign goes: whitespace between JSON tokens is allowed. Work is done a block of rows at
a time, so the temporary arrays stay a few MB whatever the answer's size.
"""

from __future__ import annotations

import base64

import numpy as np

_WIDTH = 16  # sign, digit, point, 8 digits, "e", exponent sign, 2 exponent digits, separator
_ROWS_PER_BLOCK = 256
_ZERO = ord("0")


def json_rows(vectors: np.ndarray) -> list[bytes]:
    """Each row of a float matrix as the text of a JSON array of its float32 values."""
    matrix = np.asarray(vectors, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError("the model produced values that are not finite numbers")
    if matrix.shape[1] == 0:
        return [b"[]"] * matrix.shape[0]
    rows: list[bytes] = []
    for start in range(0, matrix.shape[0], _ROWS_PER_BLOCK):
        block = _format_block(matrix[start : start + _ROWS_PER_BLOCK])
        rows += [b"[" + row.tobytes() for row in block]
    return rows


def base64_rows(vectors: np.ndarray) -> list[bytes]:
    """Each row as a JSON string of its little-endian float32 bytes in base64 (OpenAI's `encoding_format`)."""
    matrix = np.asarray(vectors, dtype="<f4")
    return [b'"' + base64.b64encode(row.tobytes()) + b'"' for row in matrix]


def _decimal(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mantissa, exponent) with |value| = mantissa * 10**(exponent - 8), the mantissa nine digits (0 for 0)."""
    a = np.abs(values.astype(np.float64))
    exponent = np.zeros(a.shape, np.int64)
    nonzero = a > 0
    exponent[nonzero] = np.floor(np.log10(a[nonzero])).astype(np.int64)
    mantissa = np.rint(a / np.power(10.0, exponent - 8)).astype(np.int64)
    high = mantissa >= 1_000_000_000  # rounding carried into a tenth digit, or log10 came out one too small
    exponent[high] += 1
    mantissa[high] = np.rint(a[high] / np.power(10.0, exponent[high] - 8)).astype(np.int64)
    low = nonzero & (mantissa < 100_000_000)  # log10 came out one too large
    exponent[low] -= 1
    mantissa[low] = np.rint(a[low] / np.power(10.0, exponent[low] - 8)).astype(np.int64)
    return mantissa, exponent


def _format_block(values: np.ndarray) -> np.ndarray:
    """uint8 [rows, columns * _WIDTH]: each value's field, then "," (or "]" after a row's last value)."""
    mantissa, exponent = _decimal(values)
    out = np.empty(values.shape + (_WIDTH,), np.uint8)
    out[..., 0] = np.where(values < 0, ord("-"), ord(" "))
    for position in (10, 9, 8, 7, 6, 5, 4, 3, 1):  # the last digit first; position 2 is the point
        out[..., position] = mantissa % 10 + _ZERO
        mantissa //= 10
    out[..., 2] = ord(".")
    out[..., 11] = ord("e")
    out[..., 12] = np.where(exponent < 0, ord("-"), ord("+"))
    magnitude = np.abs(exponent)  # at most 45 for a float32
    out[..., 13] = magnitude // 10 + _ZERO
    out[..., 14] = magnitude % 10 + _ZERO
    out[..., 15] = ord(",")
    out[:, -1, 15] = ord("]")
    return out.reshape(values.shape[0], -1)
