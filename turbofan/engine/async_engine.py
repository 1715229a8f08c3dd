"""AsyncEngine: the engine loop on its own thread, one output stream per request for asyncio callers.

The HTTP event loop never runs a forward pass: it hands requests to the engine thread through a command queue
and receives outputs through per-request asyncio queues. A consumer that stops listening (a client that
disconnects) aborts its request, which frees its KV blocks on the next loop iteration.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import asdict

import psutil

from turbofan.engine.engine import Engine
from turbofan.engine.outputs import RequestOutput
from turbofan.engine.params import SamplingParams

log = logging.getLogger("turbofan.engine")
stats_log = logging.getLogger("turbofan.stats")


class QueueFullError(RuntimeError):
    """Too many requests are already waiting: the caller should retry later (HTTP 503/429)."""


class EngineDeadError(RuntimeError):
    """The engine loop stopped after an internal error; requests cannot be served."""


class AsyncEngine:
    def __init__(self, engine: Engine, max_waiting: int = 256, log_stats_interval: float = 10.0):
        self.engine = engine
        self.max_waiting = max_waiting
        self.log_stats_interval = log_stats_interval
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead: BaseException | None = None
        self.on_step = None  # optional hook(outputs) for observers (metrics); called on the engine thread
        self._torch_profile: tuple[int, str | None, asyncio.Future] | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="turbofan-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)

    @property
    def dead(self) -> BaseException | None:
        """The error that stopped the engine loop, or None while it is healthy."""
        return self._dead

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # -- requests -----------------------------------------------------------------------------------------------
    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        if self._dead is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self._dead}")
        ids = self.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.engine.validate_prompt(ids, params)
        waiting = len(self._streams) - self.engine.scheduler.max_num_seqs
        if waiting >= self.max_waiting:
            raise QueueFullError(f"the server is busy: {waiting} requests are already waiting; retry later")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._commands.put(("add", request_id, prompt if isinstance(prompt, str) else None, ids, params, time.time()))
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await stream.get()
                while not stream.empty() and not isinstance(item, BaseException) and not item.finished:
                    item = stream.get_nowait()  # a slow consumer only needs the latest cumulative output
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))
                self._wake.set()

    def beam_search(self, prompt: str | list[int], params: SamplingParams, request_id: str):
        """Beam search as an output stream with one (final) RequestOutput; beams run as concurrent requests."""
        from turbofan.engine.beam_search import beam_search_async

        return beam_search_async(self, prompt, params, request_id)

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    # -- the engine thread --------------------------------------------------------------------------------------
    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(stream.put_nowait, item)

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, text, ids, params, arrival = cmd
                if rid not in self._streams:  # the caller already left
                    continue
                try:
                    request = self.engine.add_request(rid, ids, params, arrival)
                    request.prompt = text
                except Exception as exc:  # validation raced with a config change, or an id clash
                    self._deliver(rid, exc)
            else:
                self.engine.abort_request(cmd[1])

    def _run(self) -> None:
        last_log = time.monotonic()
        last_tokens = 0
        try:
            while not self._stopping:
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                elif self._torch_profile is not None:
                    self._run_torch_profile()
                else:
                    outputs = self.engine.step()
                    for out in outputs:
                        self._deliver(out.request_id, out)
                    if self.on_step is not None and outputs:
                        self.on_step(outputs)
                now = time.monotonic()
                if self.log_stats_interval and now - last_log >= self.log_stats_interval:
                    last_tokens = self._log_stats(now - last_log, last_tokens)
                    last_log = now
        except BaseException as exc:  # keep serving errors visible; never leave callers hanging
            log.exception("engine loop failed")
            self._dead = exc
            for rid in list(self._streams):
                self._deliver(rid, EngineDeadError(f"the engine stopped after an error: {exc}"))

    async def profile_torch(self, steps: int, trace_path: str | None = None) -> dict:
        """Record the next `steps` engine steps with torch.profiler (seed 002's per-op table).

        Returns the top ops by self CPU time with their call counts; writes a Chrome trace if asked.
        """
        if steps < 1:
            raise ValueError("steps must be at least 1")
        future = asyncio.get_running_loop().create_future()
        self._torch_profile = (steps, trace_path, future)
        self._wake.set()
        return await future

    def _run_torch_profile(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        steps, trace_path, future = self._torch_profile
        self._torch_profile = None
        done = 0
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            while done < steps and self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    self._deliver(out.request_id, out)
                done += 1
                self._drain_commands()
        if trace_path:
            prof.export_chrome_trace(trace_path)
        rows = [
            {
                "op": e.key,
                "calls": e.count,
                "self_cpu_ms": round(e.self_cpu_time_total / 1000, 3),
                "cpu_total_ms": round(e.cpu_time_total / 1000, 3),
            }
            for e in sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:30]
        ]
        result = {"steps": done, "ops": rows, "trace": trace_path}
        self._loop.call_soon_threadsafe(future.set_result, result)

    def _log_stats(self, seconds: float, last_tokens: int) -> int:
        stats = self.engine.stats()
        if stats.num_running == 0 and stats.num_waiting == 0 and stats.generation_tokens_total == last_tokens:
            return last_tokens
        extra = asdict(stats)
        extra["generation_tokens_per_s"] = round((stats.generation_tokens_total - last_tokens) / seconds, 2)
        extra["kv_usage_pct"] = round(100 * stats.kv_usage, 2)
        extra["rss_mib"] = round(psutil.Process(os.getpid()).memory_info().rss / (1 << 20), 1)
        try:
            import torch

            if torch.cuda.is_available():
                extra["gpu_memory_mib"] = round(torch.cuda.memory_allocated() / (1 << 20), 1)
        except Exception:  # noqa: S110 (optional information)
            pass
        stats_log.info("engine stats", extra=extra)
        return stats.generation_tokens_total
