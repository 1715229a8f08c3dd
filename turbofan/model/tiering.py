"""Tiered execution of the forward pass, after V8's Ignition → TurboFan pipeline.

Tier 0 is eager PyTorch: it runs every shape at once and records feedback (calls, time) per shape key.
A decode key that gets hot is compiled with torch.compile on a background thread while tier 0 keeps serving;
once ready, steps with that key switch to it. A compiled entry is a speculation about its inputs (batch bucket,
dtype, device, weights version): a step that does not match runs on tier 0 and counts as a deopt with its
reason; an entry that raises is dropped, the step reruns on tier 0, and a key that fails twice is never
compiled again ("never optimise"). Prefill runs on tier 0 only: its big matmuls gain nothing from compiling.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from turbofan.model.attention import AttentionMetadata
from turbofan.model.batch import ForwardBatch

log = logging.getLogger("turbofan.tiering")
# Batch buckets a compiled decode entry is specialised for: a quarter step apart from 8 on, so padding wastes at most
# ~25% of a step (batch 33 runs as 40, not 64).
BUCKETS = (1, 2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)
# A compiled entry is measured against tier 0 on its own key after this many calls; slower code is dropped.
JUDGE_AFTER = 16


def bucket_for(n: int) -> int | None:
    return next((b for b in BUCKETS if b >= n), None)


@dataclass
class TierEntry:
    key: str
    bucket: int
    calls: int = 0
    eager_calls: int = 0
    compiled_calls: int = 0
    state: str = "cold"  # cold | compiling | ready | never
    failures: int = 0
    compile_seconds: float | None = None
    eager_ms: float | None = None  # moving averages per step
    compiled_ms: float | None = None
    guard: tuple = ()
    compiled: Callable | None = field(default=None, repr=False)

    def record(self, tier: str, ms: float) -> None:
        name = f"{tier}_ms"
        old = getattr(self, name)
        setattr(self, name, ms if old is None else 0.9 * old + 0.1 * ms)
        setattr(self, f"{tier}_calls", getattr(self, f"{tier}_calls") + 1)

    def row(self) -> dict:
        return {
            "key": self.key,
            "calls": self.calls,
            "tier": 1 if self.state == "ready" else 0,
            "state": self.state,
            "eager_calls": self.eager_calls,
            "compiled_calls": self.compiled_calls,
            "compile_seconds": None if self.compile_seconds is None else round(self.compile_seconds, 2),
            "eager_ms_per_step": None if self.eager_ms is None else round(self.eager_ms, 3),
            "compiled_ms_per_step": None if self.compiled_ms is None else round(self.compiled_ms, 3),
            "failures": self.failures,
        }


class TieredForward:
    """Drop-in for ModelRunner.forward_fn that picks tier 0 or tier 1 per step."""

    def __init__(
        self,
        runner,
        threshold: int = 32,
        cache_dir: str | Path | None = None,
        compile_fn: Callable[[Callable], Callable] | None = None,
    ):
        self.runner = runner
        self.threshold = threshold
        self.entries: dict[str, TierEntry] = {}
        self.tier_calls: Counter[str] = Counter()
        self.deopts: Counter[str] = Counter()
        self.compile_seconds_total = 0.0
        self._compile = compile_fn or (lambda fn: torch.compile(fn, dynamic=False))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="turbofan-compiler")
        self._lock = threading.Lock()
        if cache_dir is not None:  # Inductor's on-disk cache is the code cache: restarts tier up faster
            # Set outright: importing torch._dynamo already put a /tmp default there; Inductor re-reads it.
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)

    def guard(self) -> tuple:
        r = self.runner
        return (r.dtype, str(r.device), r.model_version)

    def _entry(self, key: str, bucket: int) -> TierEntry:
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = TierEntry(key, bucket)
        return entry

    def __call__(self, batch: ForwardBatch) -> torch.Tensor:
        if not batch.is_decode:
            bucket = bucket_for(batch.num_tokens) or batch.num_tokens
            entry = self._entry(f"prefill[t={bucket}]", bucket)
            entry.calls += 1
            return self._eager(entry, batch)
        size = batch.query_lens.shape[0]
        bucket = bucket_for(size)
        if bucket is None:
            self._deopt(f"decode[b={size}]", "batch larger than any bucket")
            return self._eager(None, batch)
        entry = self._entry(f"decode[b={bucket}]", bucket)
        entry.calls += 1
        if entry.state == "ready":
            if entry.guard != self.guard():
                self._deopt(entry.key, "guard failed: dtype, device or weights changed")
                entry.state, entry.compiled = "cold", None
            else:
                out = self._compiled(entry, batch)
                if out is not None:
                    return out
        elif entry.state == "cold" and entry.calls >= self.threshold:
            self._submit(entry)
        elif any(e.state == "ready" for e in self.entries.values()):
            self._deopt(entry.key, "no compiled entry")
        return self._eager(entry, batch)

    def _eager(self, entry: TierEntry | None, batch: ForwardBatch) -> torch.Tensor:
        start = time.perf_counter()
        out = self.runner.eager_forward(batch)
        self.tier_calls["0"] += 1
        if entry is not None:
            entry.record("eager", (time.perf_counter() - start) * 1000)
        return out

    def _compiled(self, entry: TierEntry, batch: ForwardBatch) -> torch.Tensor | None:
        start = time.perf_counter()
        try:
            # Compiled entries see plain tensors under no_grad, exactly as in warm-up: inference-mode tensors
            # would fail Dynamo's guards and recompile on the serving thread.
            with torch.inference_mode(False), torch.no_grad():
                padded = batch.padded_decode(entry.bucket, self.runner.trash_block)
                logits = entry.compiled(padded.input_ids, padded.positions, self._meta(padded))
                out = logits.index_select(0, batch.logits_indices)
        except Exception as exc:  # a broken speculation: back to tier 0, and maybe never again
            entry.failures += 1
            entry.compiled = None
            entry.state = "never" if entry.failures >= 2 else "cold"
            entry.calls = 0
            self._deopt(entry.key, f"compiled entry raised {type(exc).__name__}")
            log.warning("deopt %s: compiled entry raised %s: %s", entry.key, type(exc).__name__, exc)
            return None
        self.tier_calls["1"] += 1
        entry.record("compiled", (time.perf_counter() - start) * 1000)
        self._judge(entry)
        return out

    def _judge(self, entry: TierEntry) -> None:
        """V8 drops optimised code that does not pay: once measured, an entry slower than tier 0 on its own key
        goes back to tier 0 for good."""
        if entry.compiled_calls != JUDGE_AFTER or entry.eager_ms is None or entry.compiled_ms is None:
            return
        if entry.compiled_ms > entry.eager_ms:
            entry.state, entry.compiled = "never", None
            self._deopt(entry.key, "slower than tier 0")
            log.info(
                "dropped %s: compiled %.2f ms/step vs tier 0 %.2f ms/step",
                entry.key,
                entry.compiled_ms,
                entry.eager_ms,
                extra={"key": entry.key, "compiled_ms": entry.compiled_ms, "eager_ms": entry.eager_ms},
            )

    def _meta(self, batch: ForwardBatch) -> AttentionMetadata:
        meta = AttentionMetadata.from_batch(batch, self.runner.windows)
        meta.mark_dynamic()  # the context length changes every step: one compile serves them all
        return meta

    def _deopt(self, key: str, reason: str) -> None:
        self.deopts[reason] += 1
        if self.deopts[reason] == 1 or self.deopts[reason] % 1000 == 0:
            log.info("deopt %s: %s", key, reason, extra={"key": key, "reason": reason, "count": self.deopts[reason]})

    # -- the background compiler --------------------------------------------------------------------------------
    def _submit(self, entry: TierEntry) -> None:
        entry.state = "compiling"
        self._pool.submit(self._compile_entry, entry, entry.calls)

    def _warmup_batch(self, bucket: int) -> ForwardBatch:
        """A bucket-shaped decode batch that reads and writes only the trash block."""
        r = self.runner
        trash = r.trash_block
        batch = ForwardBatch.build([[0]] * bucket, [1] * bucket, [[trash]] * bucket, [[0]] * bucket, r.block_size)
        batch.prompt_lens = torch.zeros(bucket, dtype=torch.long)  # decode rows, as the engine's steps give them
        return batch

    def _compile_entry(self, entry: TierEntry, calls: int) -> None:
        # Compiling is mostly Python holding the GIL; the serving thread re-takes the GIL after every torch op.
        # A short switch interval bounds each of those waits, so serving slows down instead of stalling.
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, 2e-4))
        try:
            self._compile_entry_inner(entry, calls)
        finally:
            sys.setswitchinterval(interval)

    def _compile_entry_inner(self, entry: TierEntry, calls: int) -> None:
        start = time.perf_counter()
        try:
            compiled = self._compile(self.runner.forward_all)
            with torch.inference_mode(False), torch.no_grad():
                batch = self._warmup_batch(entry.bucket)
                compiled(batch.input_ids, batch.positions, self._meta(batch))
        except Exception as exc:
            entry.failures += 1
            entry.state = "never" if entry.failures >= 2 else "cold"
            entry.calls = 0
            log.warning("compile failed for %s: %s: %s", entry.key, type(exc).__name__, exc)
            return
        seconds = time.perf_counter() - start
        entry.compile_seconds = seconds
        self.compile_seconds_total += seconds
        entry.guard = self.guard()
        entry.compiled = compiled
        entry.state = "ready"
        log.info(
            "tier-up %s after %d calls, compiled in %.1f s",
            entry.key,
            calls,
            seconds,
            extra={"key": entry.key, "calls": calls, "compile_seconds": round(seconds, 2)},
        )

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until queued compilations finish (benchmarks and tests; serving never waits)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while any(e.state == "compiling" for e in self.entries.values()):
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def table(self) -> list[dict]:
        return [e.row() for e in sorted(self.entries.values(), key=lambda e: e.key)]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
