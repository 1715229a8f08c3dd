"""How the server process ends: gracefully on SIGTERM, and with a non-zero status when the engine dies.

SIGTERM (or Ctrl+C) first *drains*: the listener stays open so that new requests get a 503 with Retry-After
(a load balancer then routes elsewhere) while the requests already running finish, for up to `shutdown_timeout`
seconds; then uvicorn's own shutdown closes the connections. The process exits 0.

If the engine loop stops on a broken invariant, in-flight requests have already been answered with an error and
`/health` says so; the server then shuts down and `turbofan serve` exits with status 1, so a supervisor (systemd
`Restart=on-failure`, compose `restart: unless-stopped`) starts a fresh one.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import uvicorn

log = logging.getLogger("turbofan.server")


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ctx, shutdown_timeout: float):
        super().__init__(config)
        self.ctx = ctx  # ServerContext: the draining flag, the requests in progress, the engine client
        self.shutdown_timeout = shutdown_timeout
        self.engine_died = False

    def handle_exit(self, sig: int, frame) -> None:
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if sig == signal.SIGTERM and captured and captured[-1] == sig:
            captured.pop()  # uvicorn would re-raise it after shutting down; a drained SIGTERM exits 0

    async def on_tick(self, counter: int) -> bool:
        client = self.ctx.client
        if not self.engine_died and client is not None and client.dead is not None:
            self.engine_died = True
            log.critical("the engine stopped after an internal error; shutting down so a supervisor can restart")
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets=None) -> None:
        if not self.engine_died:
            await self._drain()
        await super().shutdown(sockets)

    async def _drain(self) -> None:
        ctx = self.ctx
        ctx.draining = True
        started = time.monotonic()
        deadline = started + self.shutdown_timeout
        running = ctx.active_requests
        if running:
            log.info("draining: waiting for %d running request(s), at most %.0f s", running, self.shutdown_timeout)
        while ctx.active_requests and time.monotonic() < deadline and not self.force_exit:
            await asyncio.sleep(0.05)
        if ctx.active_requests:
            log.warning("shutdown timeout: %d request(s) still running are cut off", ctx.active_requests)
        self.config.timeout_graceful_shutdown = max(1, int(deadline - time.monotonic()))
        log.info("drained in %.2f s", time.monotonic() - started)
