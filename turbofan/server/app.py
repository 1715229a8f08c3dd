"""The app factory: one FastAPI app serving the OpenAI and Ollama APIs over one engine.

`create_app` returns at once; the engine loads in the background once the server starts (see state.py), so the
port answers `/health` with "loading" while the weights are read.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import os
import tempfile
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

import turbofan
from turbofan.server import embeddings_api, ollama_api, openai_api, variants
from turbofan.server.boundary import BrowserBoundary
from turbofan.server.errors import (
    APIError,
    CatchAllMiddleware,
    error_body,
    hide_path,
    install_error_handlers,
    redact,
)
from turbofan.server.guard import RequestGuard
from turbofan.server.manager import EngineFactory, LeaseMiddleware, ModelManager
from turbofan.server.openapi import install_openapi
from turbofan.server.pages import SecurityHeaders, install_pages, is_open_path
from turbofan.server.serving import ClientDisconnected, ServerContext
from turbofan.server.settings import ServerSettings
from turbofan.server.state import EngineSource


class APIKeyMiddleware:
    """Bearer key on every route but /health and the pages (CORS preflights pass: browsers send no key with them)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or is_open_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        token = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        if token and hmac.compare_digest(token, self.key):
            await self.app(scope, receive, send)
            return
        message = "Incorrect API key provided." if token else "Missing API key: send 'Authorization: Bearer <key>'."
        body = json.dumps(error_body(scope["path"], 401, message, code="invalid_api_key")).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def hide_private_paths(settings: ServerSettings) -> None:
    """Error messages name models, never where the store or the user's home lives (errors.redact)."""
    from pathlib import Path

    from turbofan.store.store import default_root

    hide_path(Path(settings.models_dir).expanduser() if settings.models_dir else default_root(), "<model store>")
    hide_path(Path.home(), "~")


def create_app(
    engine_source: EngineSource, settings: ServerSettings | None = None, factory: EngineFactory | None = None
) -> FastAPI:
    """`engine_source`: the primary model, as an EngineClient (an AsyncEngine), an Engine, or a zero-argument
    callable that builds one (it runs on the engine's thread after the server starts listening). `factory` builds
    any other model of the store on demand (server/manager.py); without one, only the primary is served."""
    settings = settings or ServerSettings()
    hide_private_paths(settings)
    manager = ModelManager(engine_source, settings, factory, store_factory=lambda: ctx.store)
    ctx = ServerContext(manager, settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await manager.start()
        try:
            yield
        finally:
            await manager.stop()

    app = FastAPI(title="turbofan", version=turbofan.__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ctx = ctx
    install_error_handlers(app)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_request: Request, _exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody is listening; nginx's code for "client closed request"

    @app.get("/health")
    async def health() -> JSONResponse:
        state = ctx.state
        if state.ready or manager.find(None) is None:  # the primary is loaded, or was unloaded on purpose
            dead = state.client.dead if state.client is not None else None  # the engine loop stopped after an error
            if dead is not None:
                return JSONResponse({"status": "error", "error": redact(f"engine stopped: {dead}")}, status_code=503)
            return JSONResponse({"status": "ok"})
        if state.error is not None:
            return JSONResponse({"status": "error", "error": redact(str(state.error))}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = ctx.metrics.render()
        return Response(body, media_type=content_type)

    if settings.debug_endpoints:

        @app.get("/debug/engine")
        async def debug_engine() -> dict:
            """Queues and KV blocks right now: what the disconnect tests and an operator look at."""
            client = await ctx.require_model(None, need=None)
            stats = dataclasses.asdict(client.stats())
            stats["in_flight"] = client.num_in_flight
            return stats

        @app.get("/debug/tiers")
        async def debug_tiers() -> dict:
            """The tiering table: key, calls, tier, compile time, eager vs compiled ms per step."""
            return (await ctx.require_model(None, need=None)).tiers()

        @app.get("/debug/profile")
        async def debug_profile() -> JSONResponse:
            """Calls and time per component method (needs `--profile`)."""
            table = (await ctx.require_model(None, need=None)).profile_table()
            if table is None:
                return JSONResponse({"error": "profiling is off: start the server with --profile"}, status_code=404)
            return JSONResponse({"methods": table})

        @app.post("/debug/profile/torch")
        async def debug_profile_torch(steps: int = 8, timeout: float = 10.0) -> JSONResponse:
            """Record the next `steps` engine steps with torch.profiler (or those within `timeout` seconds): top ops
            by self time, and a Chrome trace."""
            if not 1 <= steps <= 1000:
                raise APIError(400, f"steps must be between 1 and 1000, got {steps}", param="steps")
            if not 0 < timeout <= 300:
                raise APIError(400, f"timeout must be in (0, 300] seconds, got {timeout}", param="timeout")
            client = await ctx.require_model(None, need=None)
            # a private folder (0700, unpredictable name): a fixed /tmp name could be pre-created or linked by
            # another local user to make the server write elsewhere
            trace = os.path.join(tempfile.mkdtemp(prefix="turbofan-trace-"), f"trace-{int(time.time())}.json")
            return JSONResponse(await client.profile_torch(steps, trace, timeout))

    install_pages(app)
    app.include_router(openai_api.router)
    app.include_router(ollama_api.router)
    app.include_router(embeddings_api.router)
    app.include_router(variants.router)
    install_openapi(app)

    app.add_middleware(RequestGuard, ctx=ctx, max_body_bytes=settings.max_request_bytes,
                       body_timeout=settings.body_timeout)  # fmt: skip
    if settings.api_key:  # outside the guard: a caller without the key never gets a body read
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(LeaseMiddleware, manager_of=lambda: manager)
    app.add_middleware(CatchAllMiddleware)
    app.add_middleware(CORSMiddleware, **settings.cors_options())
    app.add_middleware(BrowserBoundary, settings=settings)  # a refused Host or Origin reaches nothing
    app.add_middleware(SecurityHeaders)  # on every response, the boundary's refusals included
    return app
