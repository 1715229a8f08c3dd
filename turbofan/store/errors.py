"""Errors the store raises: one base class so callers (CLI, HTTP server) can turn any of them into a
message for people instead of a stack trace from deep inside a download or a conversion."""

from __future__ import annotations


class StoreError(Exception):
    """Base class: a model could not be found, fetched, converted or loaded from the store."""


class ModelNotFoundError(StoreError, LookupError):
    """The name is unknown, not pulled yet, or its source does not have it."""


class HubUnavailableError(ModelNotFoundError):
    """A hub (Hugging Face or ModelScope) could not be reached and the files are not cached locally."""


class UnsupportedFormatError(StoreError, ValueError):
    """The files exist but are in a format turbofan refuses to load (pickles) or cannot read."""


class UnsupportedArchitectureError(StoreError, ValueError):
    """The model's architecture has no converter or no model implementation in turbofan."""


class FetchError(StoreError):
    """Downloading a source (pip wheel, hub snapshot) failed."""


class ConversionError(StoreError):
    """Turning a GGUF file into an HF-style directory failed (unexpected tensors, shapes, metadata)."""
