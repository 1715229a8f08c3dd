"""EmbeddingEngine: the EngineClient of an embedding model — an encoder on its own thread, requests batched.

Requests queue up while a batch runs; the thread then takes every pending text at once, sorts them by length
(so a batch pads little), runs as many per forward as fit a token budget and hands each request its rows back on the event loop
with one `call_soon_threadsafe`. Like AsyncEngine it builds the model on that thread, which then does all the
torch work (see async_engine.py on OpenMP thread teams). Generation requests are refused: it has no LM head.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import sys
import threading
import time
from pathlib import Path

import torch

from turbofan.engine.async_engine import SWITCH_INTERVAL, EngineDeadError
from turbofan.engine.client import EngineClient, ModelInfo
from turbofan.engine.engine import EngineStats

log = logging.getLogger("turbofan.engine")


class EmbeddingEngine(EngineClient):
    def __init__(self, path: str | Path, name: str, batch_tokens: int = 8192, device: str = "cpu"):
        self.path = Path(path)
        self.name = name
        self.batch_tokens = batch_tokens
        self.device = device
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
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
        self._thread = threading.Thread(target=self._run, name=f"turbofan-embed-{self.name}", daemon=True)
        self._thread.start()
        await self._ready

    async def stop(self) -> None:
        self._queue.put(None)
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)
        self.model = None

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
        self.load_seconds = time.perf_counter() - t0

    @property
    def dead(self) -> BaseException | None:
        return self._dead

    @property
    def num_in_flight(self) -> int:
        return self._in_flight

    def stats(self) -> EngineStats:
        return EngineStats(self._in_flight, 0, 0.0, 0, 0, 0.0, 0, 0, 0, self.texts_total, 0, self.batches_total)

    # -- requests -------------------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str], truncate: bool) -> list[list[int]]:
        """Token ids with the model's special tokens; longer than the context: cut (truncate) or a ValueError."""
        ids = self.tokenizer.hf(texts, add_special_tokens=True, truncation=False)["input_ids"]
        out = []
        for i, row in enumerate(ids):
            if len(row) > self.max_length:
                if not truncate:
                    raise ValueError(
                        f"input {i} is {len(row)} tokens long but {self.name} takes at most {self.max_length}; "
                        "shorten it or ask for truncation"
                    )
                row = row[: self.max_length - 1] + row[-1:]  # keep the closing [SEP]
            out.append(row)
        return out

    async def embed(self, batch: list[list[int]]) -> torch.Tensor:
        """One pooled (and, as configured, normalised) float32 row per token list."""
        if self._dead is not None:
            raise EngineDeadError(f"the embedding engine stopped after an error: {self._dead}")
        for i, row in enumerate(batch):
            if not row:
                raise ValueError(f"input {i} is empty")
            if len(row) > self.max_length:
                raise ValueError(f"input {i} is {len(row)} tokens long but {self.name} takes at most {self.max_length}")
            bad = [t for t in row if not 0 <= t < self.info.vocab_size]
            if bad:
                raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.info.vocab_size})")
        future = self._loop.create_future()
        self._in_flight += 1
        try:
            self._queue.put((batch, future))
            return await future
        finally:
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

    def _run(self) -> None:
        try:
            self.load()
        except BaseException as exc:  # noqa: BLE001 — handed to start()'s caller
            self._settle(self._ready, error=exc)
            return
        self._settle(self._ready)
        while True:
            pending = [self._queue.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    pending.append(self._queue.get_nowait())
            stop = None in pending
            jobs = [p for p in pending if p is not None]
            if jobs:
                self._serve(jobs)
            if stop:
                return

    def _serve(self, jobs: list) -> None:
        rows = [row for batch, _ in jobs for row in batch]
        try:
            out = self.encode(rows)
        except BaseException as exc:  # noqa: BLE001 — every waiter learns why, and the engine is marked dead
            log.exception("embedding failed")
            self._dead = exc
            for _, future in jobs:
                self._settle(future, error=EngineDeadError(f"the embedding engine stopped after an error: {exc}"))
            return
        start = 0
        for batch, future in jobs:
            self._settle(future, out[start : start + len(batch)])
            start += len(batch)

    def batches(self, rows: list[list[int]]) -> list[list[int]]:
        """Row indices grouped for one forward each: sorted by length, as many rows as fit `batch_tokens` padded
        while padding stays under 1/8 of the real tokens (padding is computed like real tokens: one group of 256
        short texts padded to the longest ran 0.7x sentence-transformers' speed, groups of similar lengths 1x+)."""
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        groups: list[list[int]] = []
        real = 0
        for i in order:
            n = len(rows[i])
            padded = (len(groups[-1]) + 1) * n if groups else 0
            if groups and padded <= self.batch_tokens and padded * 8 <= (real + n) * 9:
                groups[-1].append(i)
                real += n
            else:
                groups.append([i])
                real = n
        return groups

    @torch.inference_mode()
    def encode(self, rows: list[list[int]]) -> torch.Tensor:
        """Embeddings of token lists, in the given order."""
        out = torch.empty(len(rows), self.dimensions)
        for chunk in self.batches(rows):
            width = len(rows[chunk[-1]])
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for j, i in enumerate(chunk):
                ids[j, : len(rows[i])] = torch.tensor(rows[i])
                mask[j, : len(rows[i])] = 1
            out[torch.tensor(chunk)] = self.pooling(self.model(ids, mask), mask).float()
            self.batches_total += 1
        self.texts_total += len(rows)
        return out
