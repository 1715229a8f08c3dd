"""A small, fast GGUF reader: metadata and tensor table in one pass over a memory map.

``gguf.GGUFReader`` builds Python objects for every vocabulary entry (about 20 s for Gemma's 262k
tokens); this reader keeps numeric arrays as zero-copy numpy views and decodes string arrays only
when asked, so opening a file takes milliseconds. Dequantization is left to ``gguf.quants``."""

from __future__ import annotations

import struct
from collections.abc import Container
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UnsupportedFormatError

_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
_SCALAR_FORMATS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_SCALAR_DTYPES = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
DEFAULT_STRING_ARRAYS = ("tokenizer.ggml.tokens",)


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's place in the file. ``shape`` is in torch order (GGUF lists dims fastest-first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute, in bytes from the start of the file
    nbytes: int


class GGUFFile:
    """Metadata (``metadata``) and tensors (``tensors``, ``tensor_names``) of a GGUF file.

    String arrays are decoded only for the keys in ``string_arrays`` (others hold their length)."""

    def __init__(self, path: Path | str, string_arrays: Container[str] = DEFAULT_STRING_ARRAYS):
        self.path = Path(path)
        try:
            self._blob = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise UnsupportedFormatError(f"{self.path} cannot be read as a GGUF file: {exc}") from exc
        self._string_arrays = string_arrays
        try:
            self._parse()
        except (struct.error, ValueError, IndexError, UnicodeDecodeError) as exc:
            raise UnsupportedFormatError(f"{self.path} is not a valid GGUF file: {exc}") from exc

    # -- parsing -------------------------------------------------------------------------------
    def _parse(self) -> None:
        blob = self._blob
        if len(blob) < 24 or bytes(blob[:4]) != _MAGIC:
            raise UnsupportedFormatError(f"{self.path} is not a GGUF file (no GGUF magic bytes)")
        version, tensor_count, kv_count = struct.unpack_from("<IQQ", blob, 4)
        if version not in (2, 3):
            raise UnsupportedFormatError(
                f"{self.path}: GGUF version {version} is not supported (2 and 3 are)"
            )
        pos = 24
        self.metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key, pos = self._string(pos)
            (vtype,) = struct.unpack_from("<I", blob, pos)
            self.metadata[key], pos = self._value(pos + 4, vtype, key in self._string_arrays)
        import gguf

        entries = []
        for _ in range(tensor_count):
            name, pos = self._string(pos)
            (ndim,) = struct.unpack_from("<I", blob, pos)
            dims = struct.unpack_from(f"<{ndim}Q", blob, pos + 4)
            ggml_type, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * ndim)
            pos += 4 + 8 * ndim + 12
            entries.append((name, tuple(int(d) for d in reversed(dims)), int(ggml_type), int(offset)))
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = (pos + alignment - 1) // alignment * alignment
        self.tensors: list[GGUFTensorInfo] = []
        for name, shape, ggml_type, offset in entries:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
            nbytes = prod(shape) // block * type_size
            start = data_start + offset
            if start + nbytes > len(blob):
                raise UnsupportedFormatError(f"{self.path} is truncated: tensor {name} ends past the file")
            self.tensors.append(GGUFTensorInfo(name, shape, ggml_type, start, nbytes))

    def _string(self, pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self._blob, pos)
        return bytes(self._blob[pos + 8 : pos + 8 + n]).decode("utf-8", errors="replace"), pos + 8 + n

    def _value(self, pos: int, vtype: int, keep_strings: bool) -> tuple[Any, int]:
        if vtype in _SCALAR_FORMATS:
            (value,) = struct.unpack_from(_SCALAR_FORMATS[vtype], self._blob, pos)
            return value, pos + struct.calcsize(_SCALAR_FORMATS[vtype])
        if vtype == _STRING:
            return self._string(pos)
        if vtype != _ARRAY:
            raise ValueError(f"unknown metadata value type {vtype}")
        itype, count = struct.unpack_from("<IQ", self._blob, pos)
        pos += 12
        if itype in _SCALAR_DTYPES:
            dtype = np.dtype(_SCALAR_DTYPES[itype])
            end = pos + count * dtype.itemsize
            return self._blob[pos:end].view(dtype), end
        if itype == _STRING:
            if not keep_strings:
                for _ in range(count):  # skip, only walking the length prefixes
                    (n,) = struct.unpack_from("<Q", self._blob, pos)
                    pos += 8 + n
                return count, pos
            items = []
            for _ in range(count):
                item, pos = self._string(pos)
                items.append(item)
            return items, pos
        items = []
        for _ in range(count):
            item, pos = self._value(pos, itype, keep_strings)
            items.append(item)
        return items, pos

    # -- access --------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def token(self, token_id: int | None) -> str | None:
        """The text of one vocabulary entry (None if there is no vocabulary or no such id)."""
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if token_id is None or not isinstance(tokens, list) or not 0 <= int(token_id) < len(tokens):
            return None
        return tokens[int(token_id)]

    def raw(self, info: GGUFTensorInfo) -> np.ndarray:
        """The stored bytes of a tensor, shaped (rows..., bytes per row) as ``gguf.quants`` expects."""
        data = self._blob[info.offset : info.offset + info.nbytes]
        rows = info.shape[:-1]
        return data.reshape(*rows, info.nbytes // max(prod(rows), 1))

    def read(self, info: GGUFTensorInfo, rows: slice | None = None) -> np.ndarray:
        """The stored bytes of a tensor (or of the rows ``rows`` of a 2-D one) read into memory (not mapped),
        shaped [rows, bytes per row]. Loading reads each slice once and drops it after repacking; reading through
        the map instead would leave the file's pages in the process's resident set (VmHWM counts them) beside the
        repacked copy."""
        lead = info.shape[:-1]
        row_bytes = info.nbytes // max(prod(lead), 1)
        start, stop = (0, prod(lead)) if rows is None else (rows.start, min(rows.stop, prod(lead)))
        nbytes = (stop - start) * row_bytes
        out = np.empty(nbytes, dtype=np.uint8)
        with self.path.open("rb") as fh:
            fh.seek(info.offset + start * row_bytes)
            if fh.readinto(memoryview(out)) != nbytes:
                raise UnsupportedFormatError(f"{self.path} is truncated: tensor {info.name} ends past the file")
        return out.reshape(*lead, row_bytes) if rows is None else out.reshape(stop - start, row_bytes)

    def type_name(self, info: GGUFTensorInfo) -> str:
        """The tensor's ggml type name: ``Q4_K``, ``F32`` ..."""
        import gguf

        return gguf.GGMLQuantizationType(info.ggml_type).name

    def dequantize(self, info: GGUFTensorInfo) -> np.ndarray:
        """A tensor as float32 in torch shape (a read-only view for tensors stored as F32)."""
        import gguf
        from gguf.quants import dequantize

        values = dequantize(self.raw(info), gguf.GGMLQuantizationType(info.ggml_type))
        return np.asarray(values, dtype=np.float32).reshape(info.shape)
