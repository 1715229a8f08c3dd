"""turbofan's own CPU kernels: C++ sources compiled at first use, cached on disk, chosen by CPU at run time.

Each kernel source is one C++ file beside this module. It is compiled once per (source, torch, compiler) with
`torch.utils.cpp_extension.load` into a cache folder and registers its ops with TORCH_LIBRARY, so eager
code and compiled graphs call them as `torch.ops.turbofan.<name>` without Python in between.

No build-time CPU flags: the sources carry an AVX2 and an AVX-512 (VNNI) version of each hot loop behind
`__attribute__((target(...)))` and pick one per call from an ISA level that Python decides once (`isa()`):
the best the CPU has, capped by `TURBOFAN_ISA=avx2|avx512|scalar` or by `ATEN_CPU_CAPABILITY=avx2` (the switch
that also forces PyTorch's own AVX2 kernels), so the AVX2 path can be tested on an AVX-512 host.

Where no compiler is there (or the build fails) `available()` is False and callers use their PyTorch
reference path; the reason is logged once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger("turbofan.kernels")

# one translation unit, in this order
SOURCES = (
    "common.cpp",
    "quant_matmul.cpp",
    "fused_ops.cpp",
    "paged_attention.cpp",
    "token_bitmask.cpp",
    "decoder_stack.cpp",
    "gguf_repack.cpp",
)
ISA_LEVELS = {"scalar": 0, "avx2": 1, "avx512": 2}
_lock = threading.Lock()
_state: dict[str, object] = {}


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux names them (empty where /proc/cpuinfo is not there)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def detected_isa() -> str:
    flags = cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "scalar"


def isa() -> str:
    """The ISA level the kernels run at: detected, capped by TURBOFAN_ISA or ATEN_CPU_CAPABILITY."""
    level = detected_isa()
    for cap in (os.environ.get("TURBOFAN_ISA", ""), os.environ.get("ATEN_CPU_CAPABILITY", "")):
        cap = cap.strip().lower()
        if cap == "default":
            cap = "scalar"
        if cap in ISA_LEVELS and ISA_LEVELS[cap] < ISA_LEVELS[level]:
            level = cap
    return level


def cpu_summary() -> str:
    """One line for benchmark output: PyTorch's capability, our kernel ISA and the flags that matter."""
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni")
    flags = cpu_flags()
    return (
        f"torch cpu capability={torch.backends.cpu.get_cpu_capability()} kernel isa={isa()} "
        f"flags={','.join(f for f in wanted if f in flags)}"
    )


def _compiler() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    return cxx if shutil.which(cxx) else None


def _build_dir(source_text: str) -> Path:
    cxx = _compiler() or "none"
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    # torch's own headers are found through its install path: two environments (a venv per checkout, CI's) each
    # get a folder, or each build would invalidate the other's (cpp_extension keys its ninja file on those paths).
    where = os.path.dirname(torch.__file__)
    key = hashlib.sha256("\0".join((source_text, torch.__version__, sys.version, version, where)).encode()).hexdigest()
    root = Path(os.environ.get("TURBOFAN_KERNEL_CACHE") or Path.home() / ".cache" / "turbofan" / "kernels")
    return root / key[:16]


def _ensure_ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; the pip wheel puts it in the venv's bin, which may not be on PATH."""
    if shutil.which("ninja"):
        return
    try:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass


def _sources() -> tuple[str, Path]:
    """The one translation unit's text, and the cache folder its build lives in (keyed by source and toolchain)."""
    here = Path(__file__).parent
    text = "\n".join((here / name).read_text() for name in SOURCES)
    headers = "".join(p.read_text() for p in sorted(here.glob("*.h")))  # included by the sources
    return text, _build_dir(text + headers)


@contextmanager
def _build_lock(build: Path) -> Iterator[None]:
    """One turbofan process builds or loads a cache folder at a time, under an flock the OS drops if the process
    dies. cpp_extension's own lock is a plain file (`lock`) that a build killed midway (Ctrl+C, OOM, a test
    timeout) leaves behind, and every later load then waits on it forever; under our flock no other builder can
    be running, so such a file is stale and goes."""
    try:
        import fcntl
    except ImportError:  # not POSIX: cpp_extension's own lock only
        yield
        return
    with open(build / ".turbofan-build.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process building the kernels in %s", build)
            fcntl.flock(handle, fcntl.LOCK_EX)
        stale = build / "lock"
        if stale.exists():
            log.warning("removing %s, left by a kernel build that was interrupted", stale)
            stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load() -> None:
    from torch.utils import cpp_extension

    if _compiler() is None:
        raise RuntimeError("no C++ compiler (c++) on PATH")
    _ensure_ninja_on_path()
    here = Path(__file__).parent
    text, build = _sources()
    build.mkdir(parents=True, exist_ok=True)
    cached = any(build.glob("*.so"))
    t0 = time.perf_counter()
    if not cached:
        log.info("compiling turbofan kernels (first use, cached in %s)", build)
    with _build_lock(build):
        source = build / "turbofan_kernels.cpp"
        if not source.is_file() or source.read_text() != text:
            source.write_text(text)
        # The headers beside the source, so the build's include path is the cache folder itself: cpp_extension
        # keys its ninja file on the include paths, and a path into the checkout made every other checkout (a
        # second clone, CI, an installed copy) rebuild the cached kernels, ~20 s of a warm start.
        for header in sorted(here.glob("*.h")):
            copy = build / header.name
            if not copy.is_file() or copy.read_text() != header.read_text():
                copy.write_text(header.read_text())
        # load(), not load_inline(): the latter prepends <torch/extension.h> (pybind11 and all), doubling build time.
        cpp_extension.load(
            name="turbofan_kernels",
            sources=[str(source)],
            extra_include_paths=[str(build)],
            extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            is_python_module=False,
            verbose=False,
        )
    log.info(
        "turbofan kernels %s in %.1f s (%s)",
        "loaded" if cached else "compiled",
        time.perf_counter() - t0,
        cpu_summary(),
    )


def available() -> bool:
    """Compile (first use) and load the kernels; False, with the reason logged once, if they cannot be had."""
    if "ok" in _state:
        return bool(_state["ok"])
    with _lock:
        if "ok" not in _state:
            if os.environ.get("TURBOFAN_KERNELS", "").lower() in ("0", "off", "false", "no"):
                _state.update(ok=False, reason="disabled by TURBOFAN_KERNELS")
            else:
                try:
                    _load()
                    from turbofan.kernels import fakes  # noqa: F401  (shapes for compiled graphs)

                    torch.ops.turbofan.set_isa(ISA_LEVELS[isa()])
                    _state.update(ok=True, reason=None)
                except Exception as exc:  # a missing compiler, a failed build: fall back, say why
                    _state.update(ok=False, reason=f"{type(exc).__name__}: {exc}")
            if not _state["ok"]:
                log.warning("turbofan kernels unavailable, using PyTorch fallbacks: %s", _state["reason"])
    return bool(_state["ok"])


def unavailable_reason() -> str | None:
    available()
    return _state.get("reason")  # type: ignore[return-value]


@contextmanager
def forced_isa(name: str) -> Iterator[None]:
    """Run the kernels at a lower ISA level inside the block (tests compare the AVX2 and AVX-512 paths)."""
    if not available():
        raise RuntimeError(f"turbofan kernels unavailable: {unavailable_reason()}")
    old = torch.ops.turbofan.set_isa(min(ISA_LEVELS[name], ISA_LEVELS[detected_isa()]))
    try:
        yield
    finally:
        torch.ops.turbofan.set_isa(old)
