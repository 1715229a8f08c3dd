"""EngineState: the engine as the server sees it — loading, ready, or failed — and a way to wait for it.

The server listens before the model has loaded (like V8 answering before every page is parsed): `/health`
says "loading", and API requests that arrive meanwhile wait here instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from turbofan.server.errors import APIError

log = logging.getLogger("turbofan.server")

# What create_app accepts: a ready AsyncEngine or Engine, or a zero-argument callable that builds an Engine.
EngineSource = Any


class EngineState:
    def __init__(self, source: EngineSource, max_waiting: int = 256, stats_interval: float = 10.0):
        self.source = source
        self.max_waiting = max_waiting
        self.stats_interval = stats_interval
        self.engine = None  # turbofan.engine.Engine once ready
        self.async_engine = None  # turbofan.engine.AsyncEngine once ready
        self.error: BaseException | None = None
        self.load_started = time.time()
        self.load_seconds: float | None = None
        self.ready_at: float | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return self.async_engine is not None

    @property
    def status(self) -> str:
        return "ok" if self.ready else "error" if self.error is not None else "loading"

    async def start(self) -> None:
        """Begin loading in the background; returns at once so the server can start listening."""
        self._ready = asyncio.Event()
        self._task = asyncio.create_task(self._load(), name="turbofan-engine-load")

    async def _load(self) -> None:
        from turbofan.engine import AsyncEngine, Engine

        self.load_started = time.time()
        try:
            source = self.source
            if isinstance(source, AsyncEngine):
                async_engine = source
            else:
                if not isinstance(source, Engine):
                    if not callable(source):
                        raise TypeError(f"engine source must be an Engine, AsyncEngine or callable, got {source!r}")
                    loader: Callable[[], Engine] = source
                    source = await asyncio.to_thread(loader)
                async_engine = AsyncEngine(source, max_waiting=self.max_waiting, log_stats_interval=self.stats_interval)
            await async_engine.start()
            self.engine = async_engine.engine
            self.async_engine = async_engine
            self.ready_at = time.time()
            self.load_seconds = self.ready_at - self.load_started
            log.info("server ready", extra={"model": self.engine.model_name, "load_seconds": round(self.load_seconds, 2)})
        except BaseException as exc:  # noqa: BLE001 — surfaced through /health and every API call
            self.error = exc
            log.error("engine failed to load: %s", exc, exc_info=not isinstance(exc, asyncio.CancelledError))
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self._ready.set()

    async def wait(self):
        """The AsyncEngine, once loaded; raises a 503 APIError if loading failed."""
        if self.async_engine is None:
            await self._ready.wait()
        if self.async_engine is None:
            raise APIError(503, f"the model failed to load: {self.error}", code="model_load_failed")
        return self.async_engine

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):  # shutting down
                await self._task
        if self.async_engine is not None:
            await self.async_engine.stop()
