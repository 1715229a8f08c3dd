"""Downloading repositories from the Hugging Face hub or, with ``TURBOFAN_USE_MODELSCOPE=1``, ModelScope.

Only safetensors, JSON and tokenizer files are fetched: turbofan never loads pickles. Whether a hub
is reachable is checked first with a short timeout, so an offline machine falls back to the local
cache (or to the next catalogue source) at once instead of waiting on connection retries."""

from __future__ import annotations

import fnmatch
import inspect
import logging
import os
import time
from pathlib import Path
from urllib.parse import urlparse

from tqdm.auto import tqdm

from .errors import HubUnavailableError, ModelNotFoundError, StoreError
from .progress import Progress, Reporter

log = logging.getLogger("turbofan.store")

ALLOW_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "tokenizer.model",
    "*.tiktoken",
    "merges.txt",
    "*.jinja",
]
# Weights, configs and tokenizers sit at the top of a model repository; sub-folders hold other formats
# (onnx/, original/ pickles, runs/), so only top-level files are taken.
IGNORE_PATTERNS = ["*/*"]

_TRUE = {"1", "true", "yes", "on"}
_REACHABLE_CACHE: dict[str, tuple[float, bool]] = {}
_REACHABLE_TTL_S = 60.0


def use_modelscope() -> bool:
    """Seed 001's switch: ``TURBOFAN_USE_MODELSCOPE=1`` (or ``true``) selects ModelScope over Hugging Face."""
    return os.environ.get("TURBOFAN_USE_MODELSCOPE", "").strip().lower() in _TRUE


def hf_offline() -> bool:
    """Whether Hugging Face's offline mode is on (``HF_HUB_OFFLINE``), read at call time."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_endpoint(modelscope: bool = False) -> str:
    """The base URL of the hub in use (honours ``HF_ENDPOINT`` and ``MODELSCOPE_DOMAIN``)."""
    if modelscope:
        domain = os.environ.get("MODELSCOPE_DOMAIN", "www.modelscope.cn")
        return domain if "://" in domain else f"https://{domain}"
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(modelscope: bool = False, timeout: float = 2.0) -> bool:
    """Quick check (one HTTP HEAD, short timeout, cached for a minute) that the hub answers at all."""
    if not modelscope and hf_offline():
        return False
    url = hub_endpoint(modelscope)
    now = time.monotonic()
    cached = _REACHABLE_CACHE.get(url)
    if cached is not None and now - cached[0] < _REACHABLE_TTL_S:
        return cached[1]
    try:
        import httpx

        httpx.head(url, timeout=timeout, follow_redirects=False)
        ok = True
    except Exception as exc:  # any failure to get an HTTP answer means "not reachable"
        log.debug("hub %s not reachable: %s", urlparse(url).netloc, exc)
        ok = False
    _REACHABLE_CACHE[url] = (now, ok)
    return ok


def wanted_file(relpath: str) -> bool:
    """Whether a repository file is one turbofan takes (used to filter cached snapshots too)."""
    rel = relpath.replace(os.sep, "/")
    if any(fnmatch.fnmatch(rel, pat) for pat in IGNORE_PATTERNS):
        return False
    return any(fnmatch.fnmatch(rel, pat) for pat in ALLOW_PATTERNS)


class _QuietTqdm(tqdm):
    """A tqdm that never draws, for ``progress=False``."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def download(repo_id: str, *, modelscope: bool | None = None, progress: Progress = True) -> tuple[Path, str]:
    """Fetch ``repo_id`` (or find it in the local cache when offline); return (snapshot folder, source)."""
    if modelscope is None:
        modelscope = use_modelscope()
    if modelscope:
        return _download_modelscope(repo_id, progress=progress)
    return _download_hf(repo_id, progress=progress)


def _download_hf(repo_id: str, *, progress: Progress) -> tuple[Path, str]:
    try:
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise StoreError(
            "downloading from the Hugging Face hub needs `huggingface_hub`: pip install huggingface_hub"
        ) from exc

    offline = hf_offline()
    reachable = (not offline) and hub_reachable(modelscope=False)
    endpoint = hub_endpoint(False)
    _announce(progress, repo_id, endpoint, reachable)
    try:
        path = snapshot_download(
            repo_id,
            allow_patterns=ALLOW_PATTERNS,
            ignore_patterns=IGNORE_PATTERNS,
            local_files_only=not reachable,
            tqdm_class=None if progress is True else _QuietTqdm,
        )
    except (hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError) as exc:
        kind = "gated or private (set HF_TOKEN)" if isinstance(exc, hf_errors.GatedRepoError) else "not found"
        raise ModelNotFoundError(f"{repo_id} on {endpoint}: repository {kind}") from exc
    except hf_errors.RevisionNotFoundError as exc:
        raise ModelNotFoundError(f"{repo_id} on {endpoint}: revision not found") from exc
    except hf_errors.LocalEntryNotFoundError as exc:
        why = "HF_HUB_OFFLINE is set" if offline else f"the hub {endpoint} cannot be reached"
        raise HubUnavailableError(
            f"cannot download {repo_id}: {why}, and it is not in the local Hugging Face cache. "
            "Connect to the hub once (or copy the files and pass the directory path) and try again."
        ) from exc
    except Exception as exc:  # network errors of many kinds, incomplete snapshots, disk errors
        raise HubUnavailableError(
            f"cannot download {repo_id} from {endpoint}: {type(exc).__name__}: {exc}"
        ) from exc
    snapshot = Path(path)
    revision = snapshot.name if snapshot.parent.name == "snapshots" else "local"
    return snapshot, f"hf:{repo_id}@{revision}"


def _download_modelscope(repo_id: str, *, progress: Progress) -> tuple[Path, str]:
    try:
        from modelscope import snapshot_download as ms_snapshot_download
    except ImportError as exc:
        raise StoreError(
            "TURBOFAN_USE_MODELSCOPE is set, so models are fetched from ModelScope, but the `modelscope` "
            "package is not installed: pip install modelscope (or pip install 'turbofan[modelscope]'), "
            "or unset TURBOFAN_USE_MODELSCOPE to use the Hugging Face hub"
        ) from exc
    params = _parameters(ms_snapshot_download)
    kwargs: dict[str, object] = {}
    if "allow_patterns" in params:
        kwargs["allow_patterns"] = ALLOW_PATTERNS
    elif "allow_file_pattern" in params:
        kwargs["allow_file_pattern"] = ALLOW_PATTERNS
    if "ignore_patterns" in params:
        kwargs["ignore_patterns"] = IGNORE_PATTERNS
    reachable = hub_reachable(modelscope=True)
    if not reachable and "local_files_only" in params:
        kwargs["local_files_only"] = True
    endpoint = hub_endpoint(True)
    _announce(progress, repo_id, endpoint, reachable)
    try:
        path = ms_snapshot_download(repo_id, **kwargs)
    except Exception as exc:  # modelscope raises plain exceptions of many kinds
        why = "cannot be reached and the model is not cached" if not reachable else "failed"
        raise HubUnavailableError(
            f"ModelScope ({endpoint}) download of {repo_id} {why}: {type(exc).__name__}: {exc}"
        ) from exc
    return Path(path), f"modelscope:{repo_id}"


def _announce(progress: Progress, repo_id: str, endpoint: str, reachable: bool) -> None:
    where = f"pulling {repo_id} from {endpoint}" if reachable else f"looking for {repo_id} in the local cache"
    Reporter.of(progress).status(where)


def _parameters(fn) -> set[str]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return {name for name in sig.parameters} | {"allow_patterns", "ignore_patterns", "local_files_only"}
    return set(sig.parameters)
