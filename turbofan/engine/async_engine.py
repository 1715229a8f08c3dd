"""AsyncEngine: the EngineClient the server uses — the engine loop on its own thread, deltas to asyncio callers.

The HTTP event loop never runs a forward pass: it hands requests to the engine thread through a command queue,
and the engine thread hands each step's deltas back with one `call_soon_threadsafe` per step (not one per
request), which the event loop fans out to per-request streams. A consumer that fell behind reads its pending
deltas merged into one. A consumer that stops listening (a client that disconnects) aborts its request, which
frees its KV blocks on the next loop iteration.

Given a loader, the engine is also *built* on the engine thread, so one thread does all the torch work. That
matters: OpenMP (libgomp) keeps a thread team per thread that ever ran a parallel region, and once it manages more
threads than there are CPUs it stops spin-waiting between parallel regions; a model loaded on one thread and run
on another then decodes at about half speed on a 2-core machine. The engine thread and the event loop also trade
the GIL (the forward runs Python between its ops): starting lowers the interpreter's switch interval from 5 ms to
0.5 ms, so neither waits long for the other.

Embedding requests to the model (Ollama's /api/embed takes any model) run on the same thread between steps:
prefill-only forwards that return the last token's final hidden state (engine/hidden_states.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict

import psutil

from turbofan.engine.client import EngineClient
from turbofan.engine.embed_inputs import check_rows, fit_rows
from turbofan.engine.engine import Engine, EngineStats
from turbofan.engine.errors import RequestFailedError
from turbofan.engine.outputs import CompletionDelta, RequestDelta
from turbofan.engine.params import SamplingParams

log = logging.getLogger("turbofan.engine")
stats_log = logging.getLogger("turbofan.stats")
SWITCH_INTERVAL = 0.0005  # seconds a thread waits for the GIL before it asks for it (Python's default: 0.005)


class QueueFullError(RuntimeError):
    """Too many requests are already waiting: the caller should retry later (HTTP 503/429)."""


class EngineDeadError(RuntimeError):
    """The engine loop stopped after an internal error; requests cannot be served."""


class _Stream:
    """One request's pending deltas, filled on the event loop by the per-step dispatch."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: deque = deque()
        self.waiter: asyncio.Future | None = None

    def put(self, item) -> None:
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self):
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        item = self.items.popleft()
        while self.items and isinstance(item, RequestDelta) and not item.finished:
            nxt = self.items[0]
            if not isinstance(nxt, RequestDelta):
                break
            item = item.merge(self.items.popleft())  # the consumer fell behind: one merged delta
        return item


class AsyncEngine(EngineClient):
    def __init__(
        self,
        engine: Engine | None = None,
        max_waiting: int = 256,
        log_stats_interval: float = 10.0,
        loader: Callable[[], Engine] | None = None,
    ):
        """Wrap a built `engine`, or build one with `loader` on the engine thread when started."""
        if (engine is None) == (loader is None):
            raise ValueError("give an engine or a loader")
        self._loader = loader
        self._ready: asyncio.Future | None = None
        if engine is not None:
            self._bind(engine)
        self.max_waiting = max_waiting
        self.log_stats_interval = log_stats_interval
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead: BaseException | None = None
        self._torch_profile: tuple[int, str | None, asyncio.Future] | None = None
        self._embeds: deque = deque()  # EmbedJobs on the engine thread, first come first served
        self._embedder = None  # a HiddenStateEmbedder, made on the engine thread when first needed
        self._embeds_in_flight = 0

    def _bind(self, engine: Engine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.info = engine.model_info()
        self.dimensions = engine.runner.args.hidden_size

    # -- lifecycle ----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the engine thread; with a loader, returns once the engine is built (or raises why it was not)."""
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        self._thread = threading.Thread(target=self._run, name="turbofan-engine", daemon=True)
        self._thread.start()
        if self._loader is not None:
            await self._ready

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)

    @property
    def dead(self) -> BaseException | None:
        return self._dead

    @property
    def num_in_flight(self) -> int:
        return len(self._streams) + self._embeds_in_flight

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def tiers(self) -> dict:
        return self.engine.tiers()

    def profile_table(self) -> list[dict] | None:
        profiler = self.engine.profiler
        return None if profiler is None else profiler.table()

    def profile_report(self) -> str | None:
        profiler = self.engine.profiler
        return None if profiler is None else profiler.render()

    # -- requests -----------------------------------------------------------------------------------------------
    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestDelta]:
        if self._dead is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self._dead}")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.engine.validate_prompt(ids, params)
        waiting = len(self._streams) - self.engine.scheduler.max_num_seqs
        if waiting >= self.max_waiting:
            raise QueueFullError(f"the server is busy: {waiting} requests are already waiting; retry later")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = _Stream()
        self._streams[request_id] = stream
        text = prompt if isinstance(prompt, str) else None
        self._commands.put(("add", request_id, text, ids, params, time.time()))
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await stream.get()
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

    def tokenize(self, texts: list[str], truncate: bool) -> list[list[int]]:
        """Embedding inputs: each text's token ids (with the tokenizer's special tokens), cut to the context length
        when `truncate`, else a ValueError naming both lengths."""
        ids = [self.tokenizer.encode(text) for text in texts]
        return fit_rows(ids, self.info.max_model_len, self.info.name, truncate, keep_last=False)

    async def embed(self, batch: list[list[int]]):
        """The normalised final hidden state of each token list's last token (or the pooling the model's
        sentence-transformers files configure), float32 [len(batch), hidden]."""
        if self._dead is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self._dead}")
        check_rows(batch, self.info.max_model_len, self.info.vocab_size, self.info.name)
        from turbofan.engine.hidden_states import EmbedJob

        job = EmbedJob([list(row) for row in batch], asyncio.get_running_loop().create_future())
        self._embeds_in_flight += 1
        try:
            self._commands.put(("embed", job))
            self._wake.set()
            return await job.future
        finally:
            job.cancelled = not job.future.done() or job.future.cancelled()  # the caller left: no more slices
            self._embeds_in_flight -= 1

    def beam_search(self, prompt: str | list[int], params: SamplingParams, request_id: str):
        from turbofan.engine.beam_search import beam_search_async

        return beam_search_async(self, prompt, params, request_id)

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    # -- the engine thread --------------------------------------------------------------------------------------
    def _dispatch(self, items: list) -> None:
        """On the event loop: hand each delta (or error) of a step to its request's stream."""
        streams = self._streams
        for rid, item in items:
            stream = streams.get(rid)
            if stream is not None:
                stream.put(item)

    def _deliver(self, items: list) -> None:
        if items and self._loop is not None:
            self._loop.call_soon_threadsafe(self._dispatch, items)

    def _drain_commands(self) -> None:
        errors = []
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add":
                _, rid, text, ids, params, arrival = cmd
                if rid not in self._streams:  # the caller already left
                    continue
                try:
                    self.engine.add_request(rid, ids, params, arrival, prompt_text=text)
                except Exception as exc:  # validation raced with a config change, or an id clash
                    errors.append((rid, exc))
            elif cmd[0] == "embed":
                self._embeds.append(cmd[1])
            else:
                out = self.engine.abort_request(cmd[1])
                if out is not None:  # anyone still listening learns how it ended
                    final = [CompletionDelta(c.index, finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                             for c in out.outputs]  # fmt: skip
                    delta = RequestDelta(out.request_id, final, True, out.prompt, out.prompt_token_ids, out.metrics,
                                         out.num_cached_tokens)  # fmt: skip
                    errors.append((out.request_id, delta))
        self._deliver(errors)

    def _run_embeds(self) -> None:
        """One slice (one forward) of the first pending embedding job, so the generation step runs between slices
        and a running stream waits for one forward, never a whole job. An unfinished job goes to the back (jobs
        take turns); one that waits for KV blocks holds back those after it; one whose client left is dropped."""
        from turbofan.engine.hidden_states import HiddenStateEmbedder

        if self._embedder is None:
            self._embedder = HiddenStateEmbedder.for_engine(self.engine)
        self._drop_abandoned_embeds()
        if not self._embeds:
            return
        job = self._embeds[0]
        before = job.done
        try:
            if not self._embedder.advance(job, max_forwards=1):
                if job.done > before:
                    self._embeds.rotate(-1)  # more slices, after the next step and the other jobs' turns
                    return
                if self.engine.has_unfinished_requests():
                    return  # a step will free blocks
                raise RuntimeError("the KV cache has too few free blocks for this input")  # (validated)
            outcome = (True, HiddenStateEmbedder.result(job))
        except Exception as exc:  # this request fails; the engine serves on
            log.exception("an embedding forward failed")
            outcome = (False, RequestFailedError([], exc))
        self._embeds.popleft()
        self._loop.call_soon_threadsafe(_settle_future, job.future, *outcome)

    def _drop_abandoned_embeds(self) -> None:
        """Forget the embedding jobs whose callers stopped waiting (a client that disconnected): their remaining
        slices never run."""
        for job in [j for j in self._embeds if j.cancelled]:
            self._embeds.remove(job)
            log.info("embedding request abandoned by its client", extra={"rows": len(job.rows), "rows_done": job.done})

    def _step(self) -> None:
        try:
            deltas = self.engine.step()
        except RequestFailedError as exc:  # those requests are aborted already; the loop goes on
            self._deliver([(rid, exc) for rid in exc.request_ids] + [(d.request_id, d) for d in exc.deltas])
            return
        if deltas:
            self._deliver([(d.request_id, d) for d in deltas])

    def _load(self) -> bool:
        try:
            self._bind(self._loader())
        except BaseException as exc:  # noqa: BLE001 — handed to start()'s caller
            self._settle(lambda f, error=exc: f.set_exception(error))
            return False
        self._settle(lambda f: f.set_result(None))
        return True

    def _settle(self, how) -> None:
        def settle() -> None:
            if not self._ready.done():
                how(self._ready)

        with contextlib.suppress(RuntimeError):  # the event loop is gone (shut down while loading)
            self._loop.call_soon_threadsafe(settle)

    def _run(self) -> None:
        if self._loader is not None and not self._load():
            return
        last_log = time.monotonic()
        last_tokens = 0
        try:
            while not self._stopping:
                self._drain_commands()
                if self._embeds:
                    self._run_embeds()
                if self._torch_profile is not None:
                    self._run_torch_profile()
                elif not self.engine.has_unfinished_requests():
                    if self._embeds:
                        continue
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                else:
                    self._step()
                if self.log_stats_interval:
                    now = time.monotonic()
                    if now - last_log >= self.log_stats_interval:
                        last_tokens = self._log_stats(now - last_log, last_tokens)
                        last_log = now
        except BaseException as exc:  # keep serving errors visible; never leave callers hanging
            log.exception("engine loop failed")
            self._dead = exc
            error = EngineDeadError(f"the engine stopped after an error: {exc}")
            self._deliver([(rid, error) for rid in list(self._streams)])
            for job in self._embeds:
                self._loop.call_soon_threadsafe(_settle_future, job.future, False, error)
            if self._torch_profile is not None:
                future = self._torch_profile[2]
                self._loop.call_soon_threadsafe(lambda: future.done() or future.set_exception(error))

    async def profile_torch(self, steps: int, trace_path: str | None = None, timeout: float = 10.0) -> dict:
        """Record the next `steps` engine steps with torch.profiler (seed 002's per-op table), or as many as run
        within `timeout` seconds (an idle server answers with none rather than never).

        Returns the top ops by self CPU time with their call counts; writes a Chrome trace if asked.
        """
        if steps < 1:
            raise ValueError("steps must be at least 1")
        if self._dead is not None or self._thread is None or not self._thread.is_alive():
            raise EngineDeadError("the engine loop is not running")
        future = asyncio.get_running_loop().create_future()
        self._torch_profile = (steps, trace_path, future, time.monotonic() + timeout)
        self._wake.set()
        return await future

    def _run_torch_profile(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        steps, trace_path, future, deadline = self._torch_profile
        self._torch_profile = None
        done = 0
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            while done < steps and time.monotonic() < deadline and not self._stopping:
                if self.engine.has_unfinished_requests():
                    self._step()
                    done += 1
                else:
                    self._wake.wait(timeout=min(0.05, max(deadline - time.monotonic(), 0.0)))
                    self._wake.clear()
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


def _settle_future(future: asyncio.Future, ok: bool, value) -> None:
    """On the event loop: hand a result (or an error) to a caller that may have left already."""
    if not future.done():
        future.set_result(value) if ok else future.set_exception(value)
