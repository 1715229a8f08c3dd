"""``turbofan.json``: what the store knows about one installed model, written last so that a
directory with a manifest is complete. Also what ``list``/``show`` and Ollama's tags report."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

MANIFEST_NAME = "turbofan.json"
FORMAT_VERSION = 1


def format_parameter_size(n: int) -> str:
    """Ollama's style: ``134.52M``, ``1.5B``."""
    if n >= 1_000_000_000:
        return f"{n / 1e9:.1f}B"
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.2f}K"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Manifest:
    """The fields of ``turbofan.json``; unknown keys from newer versions are kept in ``extra``."""

    name: str
    source: str
    format: str  # format of the original weights: "gguf" or "safetensors"
    architecture: str  # transformers class, e.g. LlamaForCausalLM
    model_type: str  # config.model_type, e.g. llama, gemma3_text
    family: str  # Ollama's family, e.g. llama, gemma3
    parameters: int
    context_length: int | None
    quantization: str | None  # of the original file: Q4_1, Q4_K_M, BF16 ...
    dtype: str  # of the weights here: "gguf" (the file's own types) or a safetensors dtype
    size_bytes: int  # on disk in this directory
    digest: str  # sha256 hex: of the original GGUF file, or of config + safetensors headers
    created_at: str = field(default_factory=utc_now)
    original_file: str | None = None
    original_size_bytes: int | None = None
    gguf_file: str | None = None  # the original GGUF kept next to the converted weights, if any
    license: str | None = None
    description: str | None = None
    has_chat_template: bool = False
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def parameter_size(self) -> str:
        return format_parameter_size(self.parameters)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        extra = data.pop("extra")
        data["parameter_size"] = self.parameter_size
        return {**extra, **data}

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names and k != "extra"}
        extra = {k: v for k, v in data.items() if k not in names and k != "parameter_size"}
        return cls(**known, extra=extra)

    def write(self, directory: Path) -> Path:
        """Write atomically (temp file + rename) so readers never see half a manifest."""
        target = directory / MANIFEST_NAME
        tmp = directory / f".{MANIFEST_NAME}.tmp"
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, target)
        return target


def read_manifest(directory: Path | str) -> Manifest | None:
    """The manifest of an installed model, or None if the directory has none (or it is unreadable)."""
    file = Path(directory) / MANIFEST_NAME
    try:
        with file.open(encoding="utf-8") as fh:
            return Manifest.from_dict(json.load(fh))
    except (OSError, ValueError, TypeError):
        return None
