"""Small file-system helpers for installing model directories safely.

Installs are built in a hidden temporary directory and renamed into place, under a per-model lock,
so a crash or two processes pulling at once never leave a half-written model that looks complete."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; installs are still atomic renames
    fcntl = None  # type: ignore[assignment]


@contextlib.contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock held for the duration (a no-op where fcntl is missing)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a+") as fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` (following symlinks, e.g. into the HF cache) to ``dst``, or copy across devices."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    real = src.resolve()
    try:
        os.link(real, dst)
    except OSError:
        shutil.copy2(real, dst)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished directory into place, replacing an older copy."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
