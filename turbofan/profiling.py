"""The profiling aspect (seed 002's profiler): calls and cumulative time per public method of each component.

It is a container post-processor: with profiling on, the named components are wrapped in proxies when they are
created (or when a cycle first needs them early, so everyone holds the same proxy). With profiling off nothing
is wrapped and components are plain objects: zero overhead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import MethodType
from typing import Any

PROFILED_COMPONENTS = ("scheduler", "block_manager", "runner", "sampler", "detokenizer", "tokenizer", "engine")


@dataclass
class CallStats:
    calls: int = 0
    seconds: float = 0.0


class Profiler:
    def __init__(self) -> None:
        self.stats: dict[tuple[str, str], CallStats] = {}
        self._lock = threading.Lock()

    def record(self, component: str, method: str, seconds: float) -> None:
        with self._lock:
            entry = self.stats.setdefault((component, method), CallStats())
            entry.calls += 1
            entry.seconds += seconds

    def table(self) -> list[dict]:
        with self._lock:
            rows = [
                {
                    "component": c,
                    "method": m,
                    "calls": s.calls,
                    "total_s": round(s.seconds, 6),
                    "avg_ms": round(1000 * s.seconds / s.calls, 4) if s.calls else 0.0,
                }
                for (c, m), s in self.stats.items()
            ]
        return sorted(rows, key=lambda r: r["total_s"], reverse=True)

    def render(self) -> str:
        lines = [f"{'component.method':<44} {'calls':>9} {'total s':>10} {'avg ms':>10}"]
        for r in self.table():
            lines.append(f"{r['component'] + '.' + r['method']:<44} {r['calls']:>9} {r['total_s']:>10.3f} {r['avg_ms']:>10.3f}")
        return "\n".join(lines)


class ProfiledProxy:
    """Forwards everything to its target; public methods are timed on the way through."""

    __slots__ = ("_target", "_component", "_profiler", "_wrapped")

    def __init__(self, target: Any, component: str, profiler: Profiler):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_component", component)
        object.__setattr__(self, "_profiler", profiler)
        object.__setattr__(self, "_wrapped", {})

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if name.startswith("_") or not isinstance(value, MethodType):  # only the component's own methods
            return value
        wrapped = self._wrapped.get(name)
        if wrapped is None or wrapped.__wrapped__ != value:
            profiler, component = self._profiler, self._component

            def wrapped(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return value(*args, **kwargs)
                finally:
                    profiler.record(component, name, time.perf_counter() - start)

            wrapped.__wrapped__ = value
            self._wrapped[name] = wrapped
        return wrapped

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target, name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._target(*args, **kwargs)
        finally:
            self._profiler.record(self._component, "__call__", time.perf_counter() - start)

    def __repr__(self) -> str:
        return f"ProfiledProxy({self._target!r})"


class ProfilingPostProcessor:
    """Wraps components once: early (through a cycle) or after init, never both (Spring's earlyProxyReferences)."""

    def __init__(self, profiler: Profiler, components: Iterable[str] = PROFILED_COMPONENTS):
        self.profiler = profiler
        self.components = set(components)
        self._early: set[str] = set()

    def early_reference(self, obj: Any, name: str) -> Any:
        if name not in self.components:
            return obj
        self._early.add(name)
        return ProfiledProxy(obj, name, self.profiler)

    def after_init(self, obj: Any, name: str) -> Any:
        if name not in self.components or name in self._early:
            return obj
        return ProfiledProxy(obj, name, self.profiler)


def unwrap(obj: Any) -> Any:
    return object.__getattribute__(obj, "_target") if isinstance(obj, ProfiledProxy) else obj
