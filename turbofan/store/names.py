"""Telling names apart: catalogue names (``smollm2:135m``), hub repositories (``org/name``) and paths.

Kept separate from the store so that the CLI and the server can classify a model argument without
touching the disk or importing heavy libraries."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

# Ollama-style names: family[:tag]; letters, digits, '.', '_', '-'.
_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(:[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# Hugging Face / ModelScope repository ids: org/name.
_HUB_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def split_name(name: str) -> tuple[str, str | None]:
    """Split ``family:tag`` into its parts; the tag is None when absent (Ollama then uses the default)."""
    family, sep, tag = name.partition(":")
    return family, (tag if sep else None)


def is_model_name(text: str) -> bool:
    """True for an Ollama-style ``family[:tag]`` name."""
    return bool(_MODEL_NAME_RE.match(text))


def is_hub_name(text: str) -> bool:
    """True for an ``org/name`` repository id (it may still be a relative path; callers check that first)."""
    return bool(_HUB_NAME_RE.match(text))


def is_name(text: str) -> bool:
    """True for a name a client may send over HTTP (``family[:tag]`` or ``org/name``): decided from the text
    alone, so the answer never depends on what exists on the server's disk."""
    return is_model_name(text) or is_hub_name(text)


def looks_like_path(text: str) -> bool:
    """True when the argument is clearly a file system path rather than a name.

    ``org/name`` counts as a path only if it exists (like transformers); a bare word such as
    ``smollm2`` is a name, and the store falls back to a directory of that name only if the name
    is unknown."""
    if not text:
        return False
    if text.startswith(("/", "./", "../", "~", ".\\", "..\\")) or text.lower().endswith(".gguf"):
        return True
    if os.sep != "/" and os.sep in text:
        return True
    if "/" in text:
        return os.path.exists(text)
    return False


def dirname_for(name: str) -> str:
    """A file-system-safe directory name for a model name: ``smollm2:135m`` -> ``smollm2-135m``,
    ``Qwen/Qwen2.5-0.5B`` -> ``hub--Qwen--Qwen2.5-0.5B``. The true name lives in ``turbofan.json``."""
    if "/" in name:
        base = "hub--" + name.replace("/", "--")
    else:
        base = name.replace(":", "-")
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", base)
    if safe != base or safe.startswith("."):
        # keep distinct names distinct after sanitising
        safe = safe.lstrip(".") + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return safe


def gguf_import_key(path: Path) -> str:
    """Cache key of a local GGUF file: its name, size and modification time (no full read needed)."""
    st = path.stat()
    raw = f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}".encode()
    return hashlib.sha256(raw).hexdigest()[:12]
