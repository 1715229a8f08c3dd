"""EmbeddingEngine: the EngineClient of an embedding model — an encoder on its own thread, requests batched.

Requests queue up while a forward runs; the thread works in *slices* of at most `batch_tokens` tokens (one
forward; a longer text alone): the first pending job's next texts and, room left, the next jobs' (small concurrent
requests share a forward), sorted by length (equal lengths side by side: attention's runs) and packed without
padding (model/architectures/bert.py). An unfinished job then goes to the back, so a large job never holds back
the others; a job whose caller left (a client that disconnected) is dropped with its remaining slices; a job is
handed its rows back on the event loop with one `call_soon_threadsafe` once all are done. A failing forward ends
the requests of that slice (RequestFailedError), never the engine: only a broken worker marks it dead.
Generation requests are refused: it has no LM head.

The thread ends once it has been idle for `linger` seconds, and the next request starts a new one. Every thread
that runs torch ops keeps an OpenMP thread team; once a process has more OpenMP threads than CPUs, libgomp stops
spin-waiting between parallel regions (its "throttled" spin: 100 iterations, then a futex sleep), so each op pays
a wake-up. An idle embedding model would otherwise cost the chat model beside it that on every op, for as long as
it stays loaded (measured: smollm2 decoded at 0.42x beside an idle embedding thread; docs/benchmarks.md).

The layers run in bfloat16 where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX: oneDNN's bf16 matmuls
are then ~2x float32's) and float32 elsewhere (AVX2: bf16 would be emulated, slower). Like a speculative tier it is
checked before it is trusted: at load, a few probe texts are embedded both ways, and unless every cosine is at
least BF16_MIN_COSINE the float32 layers are kept.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import dataclasses
import json
import logging
import math
import queue
import sys
import threading
import time
from pathlib import Path

import torch

from turbofan.engine.async_engine import SWITCH_INTERVAL, EngineDeadError
from turbofan.engine.client import EngineClient, ModelInfo
from turbofan.engine.embed_inputs import check_rows, fit_rows
from turbofan.engine.engine import EngineStats
from turbofan.engine.errors import RequestFailedError

log = logging.getLogger("turbofan.engine")
BF16_MIN_COSINE = 0.9995  # served vectors must stay > 0.999 from sentence-transformers: half the distance
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "A KV cache keeps the keys and values of earlier tokens, so decoding reads them instead of recomputing.",
    "你好，世界",
    "short",
    "Paris is the capital of France, and it is known for the Eiffel Tower. " * 4,
)


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), checked at run time."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


@dataclasses.dataclass(eq=False)
class _Job:
    """One embed() call on the worker thread: its rows, the caller's future, the vectors done so far."""

    rows: list[list[int]]
    future: asyncio.Future
    out: torch.Tensor | None = None  # [len(rows), dimensions], made at the job's first slice
    done: int = 0  # rows embedded
    cancelled: bool = False  # set on the event loop when the caller stops waiting; read on the worker thread


class EmbeddingEngine(EngineClient):
    def __init__(
        self,
        path: str | Path,
        name: str,
        batch_tokens: int = 1024,
        device: str = "cpu",
        dtype: str = "auto",
        linger: float = 2.0,
    ):
        """`batch_tokens`: tokens per forward (texts are packed, one longer text runs alone); `dtype`: the layers'
        dtype, "auto" (bfloat16 where native and accurate, see above), "float32" or "bfloat16"; `linger`: seconds
        the worker thread waits for more work before it ends (math.inf: it never does)."""
        if dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"embedding dtype must be auto, float32 or bfloat16, got {dtype!r}")
        self.path = Path(path)
        self.name = name
        self.batch_tokens = batch_tokens
        self.device = device
        self.dtype = dtype
        self.linger = linger
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None  # the worker, while one runs
        self._thread_lock = (
            threading.Lock()
        )  # orders "queue empty, the worker ends" against "a job, start one"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future | None = None
        self._dead: BaseException | None = None
        self._in_flight = 0
        self.texts_total = 0
        self.batches_total = 0

    # -- lifecycle ------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the thread; returns once the model is built (or raises why it was not)."""
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        with self._thread_lock:
            self._start_worker(load=True)
        await self._ready

    async def stop(self) -> None:
        with self._thread_lock:
            thread = self._thread
            if thread is not None:
                self._queue.put(None)
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 10)
        self.model = None

    def _start_worker(self, load: bool = False) -> None:
        """(under _thread_lock)"""
        self._thread = threading.Thread(
            target=self._run, args=(load,), name=f"turbofan-embed-{self.name}", daemon=True
        )
        self._thread.start()

    def load(self) -> None:
        """Build the encoder, its tokenizer and its pooling (called on the engine thread)."""
        from turbofan.model.architectures.bert import load_bert
        from turbofan.model.pooling import read_pooling
        from turbofan.model.tokenizer import Tokenizer

        t0 = time.perf_counter()
        cfg = json.loads((self.path / "config.json").read_text())
        self.model = load_bert(self.path, cfg, self.device)
        self.tokenizer = Tokenizer(self.path)
        self.pooling = read_pooling(self.path)
        self.max_length = min(self.pooling.max_seq_length or cfg.get("max_position_embeddings", 512),
                              cfg.get("max_position_embeddings", 512))  # fmt: skip
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.info = ModelInfo(
            name=self.name, root=self.name, path=str(self.path), max_model_len=self.max_length,
            vocab_size=cfg["vocab_size"], eos_token_ids=(), device=self.device, dtype="float32",
            architecture=(cfg.get("architectures") or ["BertModel"])[0], quantization="float32",
            weights_bytes=weights, kv_cache_bytes=0,
        )  # fmt: skip
        self.dimensions = cfg["hidden_size"]
        layers_dtype = self.choose_dtype()
        self.info = dataclasses.replace(self.info, dtype=layers_dtype, quantization=layers_dtype,
                                        weights_bytes=sum(p.numel() * p.element_size() for p in self.model.parameters()))  # fmt: skip
        self.load_seconds = time.perf_counter() - t0

    def choose_dtype(self) -> str:
        """Cast the layers to bfloat16 if asked, or ("auto") if the CPU has native bf16 and the probe texts keep
        their direction (min cosine >= BF16_MIN_COSINE against float32); returns the dtype chosen."""
        if self.dtype == "float32" or (self.dtype == "auto" and not native_bf16()):
            return "float32"
        layers = self.model.layers
        reduced = copy.deepcopy(layers).to(torch.bfloat16)
        if self.dtype == "auto":
            probe = self.tokenize(list(PROBE_TEXTS), truncate=True)
            reference = self.encode(probe)
            self.model.layers = reduced
            cosine = torch.nn.functional.cosine_similarity(self.encode(probe), reference).min().item()
            self.texts_total = self.batches_total = 0
            if cosine < BF16_MIN_COSINE:
                log.warning("bfloat16 layers moved the probe embeddings (min cosine %.6f): serving float32", cosine,
                            extra={"model": self.name, "min_cosine": cosine})  # fmt: skip
                self.model.layers = layers
                return "float32"
        self.model.layers = reduced
        return "bfloat16"

    @property
    def dead(self) -> BaseException | None:
        return self._dead

    @property
    def num_in_flight(self) -> int:
        return self._in_flight

    def stats(self) -> EngineStats:
        return EngineStats(
            self._in_flight, 0, 0.0, 0, 0, 0.0, 0, 0, 0, self.texts_total, 0, self.batches_total
        )

    # -- requests -------------------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str], truncate: bool) -> list[list[int]]:
        """Token ids with the model's special tokens; longer than the context: cut (truncate) or a ValueError."""
        ids = self.tokenizer.hf(texts, add_special_tokens=True, truncation=False)["input_ids"]
        return fit_rows(ids, self.max_length, self.name, truncate, keep_last=True)  # keep the closing [SEP]

    async def embed(self, batch: list[list[int]]) -> torch.Tensor:
        """One pooled (and, as configured, normalised) float32 row per token list."""
        if self._dead is not None:
            raise EngineDeadError(f"the embedding engine stopped after an error: {self._dead}")
        check_rows(batch, self.max_length, self.info.vocab_size, self.name)
        if not batch:
            return torch.empty(0, self.dimensions)
        job = _Job(batch, self._loop.create_future())
        self._in_flight += 1
        try:
            with self._thread_lock:
                self._queue.put(job)
                if self._thread is None:
                    self._start_worker()
            return await job.future
        finally:
            job.cancelled = job.future.cancelled() or not job.future.done()  # the caller left: no more slices
            self._in_flight -= 1

    async def generate(self, prompt, params, request_id):
        raise ValueError(f'"{self.name}" is an embedding model: it does not generate text')
        yield  # an async generator, like every EngineClient's

    def beam_search(self, prompt, params, request_id):
        return self.generate(prompt, params, request_id)

    async def abort(self, request_id: str) -> None:
        return None

    # -- the engine thread ----------------------------------------------------------------------------------------
    def _settle(self, future: asyncio.Future, value=None, error: BaseException | None = None) -> None:
        def settle() -> None:
            if not future.done():
                future.set_exception(error) if error is not None else future.set_result(value)

        with contextlib.suppress(RuntimeError):  # the event loop is gone
            self._loop.call_soon_threadsafe(settle)

    def _run(self, load: bool) -> None:
        if load:
            try:
                self.load()
            except BaseException as exc:  # noqa: BLE001 — handed to start()'s caller
                with self._thread_lock:
                    self._thread = None
                self._settle(self._ready, error=exc)
                return
            self._settle(self._ready)
        active: collections.deque[_Job] = collections.deque()
        stopping = [False]
        try:
            while self._take_jobs(active, stopping):
                self._drop_abandoned(active)
                if active:
                    self._run_slice(active)
        except BaseException as exc:  # noqa: BLE001 — a broken worker (not a request's error): every waiter learns why
            log.exception("the embedding worker failed")
            self._dead = exc
            error = EngineDeadError(f"the embedding engine stopped after an error: {exc}")
            with self._thread_lock:
                self._thread = None
                with contextlib.suppress(queue.Empty):
                    while True:
                        item = self._queue.get_nowait()
                        if item is not None:
                            active.append(item)
            for job in active:
                self._settle(job.future, error=error)

    def _take_jobs(self, active: collections.deque, stopping: list[bool]) -> bool:
        """Move queued jobs into `active`, waiting (up to `linger`) only while none is active. False: the worker
        ends (idle for `linger`, or stopped and done)."""
        block = not active and not stopping[0]
        while True:
            try:
                timeout = None if math.isinf(self.linger) else self.linger
                item = self._queue.get(timeout=timeout) if block else self._queue.get_nowait()
            except queue.Empty:
                if not block:
                    break
                with self._thread_lock:  # idle: end, unless a job arrived just now
                    if self._queue.empty():
                        self._thread = None
                        return False
                continue
            block = False
            if item is None:
                stopping[0] = True
            else:
                active.append(item)
        if stopping[0] and not active:
            with self._thread_lock:
                self._thread = None
            return False
        return True

    @staticmethod
    def _drop_abandoned(active: collections.deque) -> None:
        """Forget the jobs whose callers stopped waiting: their remaining slices never run."""
        for job in [j for j in active if j.cancelled]:
            active.remove(job)
            log.info("embedding request abandoned by its client", extra={"rows": len(job.rows), "rows_done": job.done})

    def _slice(self, active: collections.deque) -> list[tuple[_Job, int, int]]:
        """The next forward's rows as (job, start, stop) pieces: at most `batch_tokens` tokens (at least one row),
        the first job's next rows, then the next jobs' while room is left."""
        pieces, tokens = [], 0
        for job in active:
            start = stop = job.done
            while stop < len(job.rows):
                n = len(job.rows[stop])
                if tokens and tokens + n > self.batch_tokens:
                    break
                tokens, stop = tokens + n, stop + 1
            if stop > start:
                pieces.append((job, start, stop))
            if stop < len(job.rows):
                break
        return pieces

    def _run_slice(self, active: collections.deque) -> None:
        """Embed one slice; settle the jobs it finishes, and send the first job to the back if it is not. A failure
        ends the jobs of this slice (RequestFailedError: a 500 for those requests) and the engine serves on."""
        pieces = self._slice(active)
        try:
            vectors = self.encode([row for job, a, b in pieces for row in job.rows[a:b]])
        except Exception as exc:  # an allocation or a forward that failed for these inputs
            log.exception("an embedding forward failed")
            for job, _, _ in pieces:
                active.remove(job)
                self._settle(job.future, error=RequestFailedError([], exc))
            return
        at = 0
        for job, a, b in pieces:
            if job.out is None:
                job.out = torch.empty(len(job.rows), self.dimensions)
            job.out[a:b] = vectors[at : at + b - a]
            at, job.done = at + b - a, b
            if job.done == len(job.rows):
                active.remove(job)
                self._settle(job.future, job.out)
        if active and active[0] is pieces[0][0]:
            active.rotate(-1)  # unfinished: the other jobs take the next slice first

    def batches(self, rows: list[list[int]]) -> list[list[int]]:
        """Row indices grouped for one forward each: sorted by length (equal lengths become one attention run),
        as many rows as fit `batch_tokens` (a longer row alone). Packed, so nothing is padded."""
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        groups: list[list[int]] = []
        tokens = 0
        for i in order:
            n = len(rows[i])
            if groups and tokens + n <= self.batch_tokens:
                groups[-1].append(i)
                tokens += n
            else:
                groups.append([i])
                tokens = n
        return groups

    @torch.inference_mode()
    def encode(self, rows: list[list[int]]) -> torch.Tensor:
        """Embeddings of token lists, in the given order."""
        from turbofan.model.architectures.bert import Packed

        out = torch.empty(len(rows), self.dimensions)
        for group in self.batches(rows):
            packed = Packed.build([rows[i] for i in group])
            out[torch.tensor(group)] = self.pooling(self.model(packed), packed.lengths)
            self.batches_total += 1
        self.texts_total += len(rows)
        return out
