"""What the store hands out: a resolved model directory, list entries and ``show`` details.

Plain dataclasses so that the engine, the CLI and the HTTP server (``/api/tags``, ``/api/show``)
share one vocabulary without depending on how the store finds or converts files."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .layout import read_json
from .manifest import Manifest


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load: ``path`` is an HF-style directory (config.json, *.safetensors, tokenizer)."""

    name: str
    path: Path
    source: str
    digest: str = ""
    manifest: Manifest | None = field(default=None, compare=False, repr=False)

    @property
    def short_digest(self) -> str:
        """The first 12 hex digits of the digest (what Ollama shows as an ID)."""
        return self.digest[:12]

    @property
    def gguf_file(self) -> Path | None:
        """The original GGUF file kept next to the converted weights, if there is one."""
        if self.manifest is None or not self.manifest.gguf_file:
            return None
        file = self.path / self.manifest.gguf_file
        return file if file.is_file() else None


@dataclass(frozen=True)
class StoreEntry:
    """One installed model as ``list()`` reports it (fields map onto Ollama's ``/api/tags``)."""

    name: str
    path: Path
    source: str
    size: int
    modified_at: datetime
    digest: str
    format: str
    family: str
    architecture: str
    model_type: str
    parameters: int
    parameter_size: str
    quantization: str | None
    context_length: int | None
    has_chat_template: bool

    @property
    def short_digest(self) -> str:
        return self.digest[:12]

    @classmethod
    def from_manifest(cls, path: Path, m: Manifest) -> StoreEntry:
        try:
            modified = datetime.fromisoformat(m.created_at)
        except (TypeError, ValueError):
            modified = datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc)
        return cls(
            name=m.name,
            path=path,
            source=m.source,
            size=m.size_bytes,
            modified_at=modified,
            digest=m.digest,
            format=m.format,
            family=m.family,
            architecture=m.architecture,
            model_type=m.model_type,
            parameters=m.parameters,
            parameter_size=m.parameter_size,
            quantization=m.quantization,
            context_length=m.context_length,
            has_chat_template=m.has_chat_template,
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["modified_at"] = self.modified_at.isoformat()
        return data


@dataclass(frozen=True)
class ModelInfo:
    """Details for ``show`` (Ollama's ``/api/show``): the entry plus config, template and tokenizer settings."""

    entry: StoreEntry
    manifest: dict[str, Any]
    config: dict[str, Any]
    generation_config: dict[str, Any]
    tokenizer_config: dict[str, Any]
    chat_template: str | None
    license: str | None

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def path(self) -> Path:
        return self.entry.path

    @classmethod
    def from_dir(cls, entry: StoreEntry, manifest: Manifest) -> ModelInfo:
        tok_cfg = read_json(entry.path / "tokenizer_config.json")
        chat_template = tok_cfg.pop("chat_template", None)
        jinja = entry.path / "chat_template.jinja"
        if chat_template is None and jinja.is_file():
            chat_template = jinja.read_text(encoding="utf-8")
        tok_cfg.pop("added_tokens_decoder", None)  # thousands of entries for big vocabularies
        return cls(
            entry=entry,
            manifest=manifest.to_dict(),
            config=read_json(entry.path / "config.json"),
            generation_config=read_json(entry.path / "generation_config.json"),
            tokenizer_config=tok_cfg,
            chat_template=_default_template(chat_template),
            license=manifest.license,
        )


def _default_template(template: Any) -> str | None:
    """HF allows a list of named templates; the one named ``default`` is the chat template."""
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        for item in template:
            if isinstance(item, dict) and item.get("name") == "default":
                return item.get("template")
    return None
