"""The browser pages turbofan serves itself: the chat page at `/`, the live dashboard at `/dashboard`.

The assets are plain HTML/JS/CSS in the package (turbofan/server/ui, shipped as package data), found with
importlib.resources and served by Starlette's StaticFiles — nothing is fetched from the internet. The pages hold
no data, so they are open even with --api-key; the API calls and the dashboard's event feed they make need the key.
`/` answers a browser (Accept: text/html) with the chat page and anyone else with Ollama's plain "is running" line,
which scripts and Ollama clients probe.

Every response carries a Content-Security-Policy that lets a page load and call only this server, run only its
own script files (no inline script, no eval) and be framed by nobody (`frame-ancestors 'none'`, against
clickjacking), and `X-Content-Type-Options: nosniff`, so a JSON answer is never sniffed into a script or a page.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from turbofan.server.dashboard import event_stream

ASSETS_PREFIX = "/ui"
OPEN_PATHS = frozenset({"/health", "/", "/dashboard"})  # served without the API key, as is all under ASSETS_PREFIX
NO_CACHE = {"Cache-Control": "no-cache"}  # a new turbofan version must not run against a cached old script
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),  # frame-ancestors for browsers that predate CSP 2
    (b"referrer-policy", b"no-referrer"),
]


class SecurityHeaders:
    """Pure ASGI: adds SECURITY_HEADERS to every response that does not set them itself."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers") or []}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                message = {**message, "headers": [*(message.get("headers") or []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def ui_dir() -> Path:
    path = Path(str(files("turbofan.server").joinpath("ui")))
    if not (path / "index.html").is_file():
        raise RuntimeError(f"the web UI's files are missing from {path}: reinstall turbofan")
    return path


def is_open_path(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(ASSETS_PREFIX + "/")


def install_pages(app: FastAPI) -> None:
    root = ui_dir()
    app.mount(ASSETS_PREFIX, StaticFiles(directory=root), name="ui")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index(request: Request) -> Response:
        if "text/html" in request.headers.get("accept", ""):
            return FileResponse(root / "index.html", headers=NO_CACHE)
        return PlainTextResponse("turbofan is running")

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(root / "dashboard.html", headers=NO_CACHE)

    @app.get("/dashboard/events", include_in_schema=False)
    async def dashboard_events(request: Request) -> StreamingResponse:
        """One snapshot a second as Server-Sent Events (read with fetch: EventSource cannot send the API key)."""
        headers = {**NO_CACHE, "X-Accel-Buffering": "no"}
        return StreamingResponse(event_stream(request.app.state.ctx), media_type="text/event-stream", headers=headers)
