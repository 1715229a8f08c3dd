"""EngineState: the engine as the server sees it — loading, ready, or failed — and a way to wait for it.

The server listens before the model has loaded (like V8 answering before every page is parsed): `/health`
says "loading", and API requests that arrive meanwhile wait here instead of failing. Once ready, the server holds
an EngineClient (turbofan.engine.client), the only way it reaches the engine.
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

# What create_app accepts: a ready EngineClient (an AsyncEngine) or Engine, or a zero-argument callable that builds
# an Engine (it then runs on the engine's own thread: see AsyncEngine).
EngineSource = Any


class EngineState:
    def __init__(self, source: EngineSource, max_waiting: int = 256, stats_interval: float = 10.0):
        self.source = source
        self.max_waiting = max_waiting
        self.stats_interval = stats_interval
        self.client = None  # the turbofan.engine.EngineClient once ready
        self.error: BaseException | None = None
        self.load_started = time.time()
        self.load_seconds: float | None = None
        self.ready_at: float | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return self.client is not None

    @property
    def status(self) -> str:
        return "ok" if self.ready else "error" if self.error is not None else "loading"

    async def start(self) -> None:
        """Begin loading in the background; returns at once so the server can start listening."""
        self._ready = asyncio.Event()
        self._task = asyncio.create_task(self._load(), name="turbofan-engine-load")

    async def _load(self) -> None:
        from turbofan.engine import AsyncEngine, EngineClient

        self.load_started = time.time()
        try:
            source = self.source
            options = dict(max_waiting=self.max_waiting, log_stats_interval=self.stats_interval)
            if isinstance(source, EngineClient):
                client = source
            elif callable(source):  # built on the engine thread, which then does all the torch work
                loader: Callable[[], Any] = source
                client = AsyncEngine(loader=loader, **options)
            elif hasattr(source, "step") and hasattr(source, "add_request"):  # an Engine: run it on its own thread
                client = AsyncEngine(source, **options)
            else:
                raise TypeError(f"engine source must be an EngineClient, an Engine or a callable, got {source!r}")
            await client.start()
            self.client = client
            self.ready_at = time.time()
            self.load_seconds = self.ready_at - self.load_started
            log.info("server ready", extra={"model": client.info.name, "load_seconds": round(self.load_seconds, 2)})
        except BaseException as exc:  # noqa: BLE001 — surfaced through /health and every API call
            self.error = exc
            log.error("engine failed to load: %s", exc, exc_info=not isinstance(exc, asyncio.CancelledError))
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self._ready.set()

    async def wait(self):
        """The EngineClient, once loaded; raises a 503 APIError if loading failed."""
        if self.client is None:
            await self._ready.wait()
        if self.client is None:
            raise APIError(503, f"the model failed to load: {self.error}", code="model_load_failed")
        return self.client

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):  # shutting down
                await self._task
        if self.client is not None:
            await self.client.stop()
