"""What an HF-style model directory must hold, and cheap facts about one (no tensor is loaded).

Reading only safetensors headers keeps ``list``/``show``/``resolve`` fast and lets local directories
be described without writing anything into them."""

from __future__ import annotations

import hashlib
import json
import struct
from collections import Counter
from pathlib import Path

from .errors import ModelNotFoundError, UnsupportedFormatError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
_ST_DTYPE_LABELS = {
    "F32": "F32",
    "F16": "F16",
    "BF16": "BF16",
    "F64": "F64",
    "F8_E4M3": "F8_E4M3",
    "F8_E5M2": "F8_E5M2",
}


def safetensors_files(path: Path) -> list[Path]:
    """The safetensors weight files of a directory, sorted (shards in order)."""
    return sorted(p for p in path.glob("*.safetensors") if p.is_file())


def check_hf_dir(path: Path) -> None:
    """Raise a clear error unless ``path`` is a loadable HF directory (config, safetensors, tokenizer)."""
    if not path.is_dir():
        raise ModelNotFoundError(f"{path} is not a directory")
    if not safetensors_files(path):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise UnsupportedFormatError(
                f"{path} holds only PyTorch pickle weights ({', '.join(pickles[:4])}); turbofan loads "
                "safetensors and GGUF only, because unpickling can run arbitrary code. Convert it once, "
                "e.g. AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out) (writes safetensors)."
            )
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f" (it has GGUF files: pass one of them as the path: {', '.join(ggufs)})" if ggufs else ""
        raise UnsupportedFormatError(f"{path} has no *.safetensors weights{hint}")
    if not (path / "config.json").is_file():
        raise UnsupportedFormatError(f"{path} has weights but no config.json (Hugging Face format expected)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UnsupportedFormatError(
            f"{path} has no tokenizer files (expected tokenizer.json and tokenizer_config.json)"
        )


def read_safetensors_header(file: Path) -> dict:
    """The JSON header of a safetensors file: tensor names, dtypes, shapes, offsets."""
    with file.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise UnsupportedFormatError(f"{file} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * 1024 * 1024:
            raise UnsupportedFormatError(f"{file} is not a safetensors file (header of {length} bytes)")
        return json.loads(fh.read(length))


def safetensors_stats(path: Path) -> tuple[int, str]:
    """(parameter count, main dtype label such as ``BF16``) over all safetensors files of a directory."""
    total = 0
    dtypes: Counter[str] = Counter()
    for file in safetensors_files(path):
        for name, info in read_safetensors_header(file).items():
            if name == "__metadata__":
                continue
            n = 1
            for dim in info["shape"]:
                n *= int(dim)
            total += n
            dtypes[info["dtype"]] += n
    main = dtypes.most_common(1)[0][0] if dtypes else "F32"
    return total, _ST_DTYPE_LABELS.get(main, main)


def weights_digest(path: Path) -> str:
    """A content digest of a safetensors directory without hashing gigabytes: config, file names,
    sizes and safetensors headers (which hold every tensor's name, shape and byte range)."""
    h = hashlib.sha256()
    config = path / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for file in safetensors_files(path):
        h.update(file.name.encode() + b"\0" + str(file.stat().st_size).encode() + b"\0")
        h.update(json.dumps(read_safetensors_header(file), sort_keys=True).encode())
    return h.hexdigest()


def file_sha256(file: Path) -> str:
    """sha256 of a whole file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with file.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dir_size(path: Path) -> int:
    """Bytes of all regular files under ``path`` (hard links counted in full, like ``ls``)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def read_json(file: Path) -> dict:
    """A JSON object from disk, or {} when the file is absent."""
    if not file.is_file():
        return {}
    with file.open(encoding="utf-8") as fh:
        return json.load(fh)
