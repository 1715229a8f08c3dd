"""What the server checks on every request before any route sees it: nothing a client sends can stall it.

`RequestGuard` (pure ASGI, so it runs before FastAPI buffers anything):
- while the server drains for a shutdown, new requests get 503 with Retry-After (and /health says "draining");
- a body larger than the limit is refused with 413 — at once when Content-Length says so, otherwise as soon as
  the bytes read pass it — so a 50 MB body is never buffered, parsed or tokenized;
- a body must arrive within a deadline (a client that sends headers and then stalls is answered 408);
- a body is JSON whatever its Content-Type (curl `-d` sends a form type; Ollama's own examples rely on that);
- a body that is not valid UTF-8, or holds a lone surrogate escape (`"\\ud800"`), is a 400: no string the
  tokenizer cannot encode ever reaches it.

`header_timeout_protocol` closes connections that open but never finish sending a request head (slowloris);
uvicorn itself only times out idle keep-alive connections.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

from turbofan.server.errors import error_body

BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# A \uD800-\uDFFF escape preceded by an even number of backslashes (so it is an escape, not escaped text).
_SURROGATE_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class RequestRejected(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


async def send_error(send, path: str, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(path, status, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if status in (408, 413):
        raw.append((b"connection", b"close"))  # the rest of the body will never be read
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _has_lone_surrogate(value) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def check_text(body: bytes) -> None:
    """400 unless the body is valid UTF-8 without lone surrogate escapes (checked by parsing only when one of
    the escapes appears, which valid text almost never has)."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestRejected(400, f"the request body is not valid UTF-8 (byte {exc.start})") from None
    if _SURROGATE_ESCAPE.search(body) is None:
        return
    try:
        parsed = json.loads(body)
    except ValueError:
        return  # not JSON: the route's parser answers that
    if _has_lone_surrogate(parsed):
        raise RequestRejected(400, "the request body holds a lone surrogate (\\ud800-\\udfff): not valid Unicode")


class RequestGuard:
    def __init__(self, app, ctx, max_body_bytes: int, body_timeout: float):
        self.app = app
        self.ctx = ctx  # ServerContext: `draining` and the count of requests let through
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self.ctx.draining:
            if path == "/health":
                payload = json.dumps({"status": "draining"}).encode()
                headers = [(b"content-type", b"application/json"), (b"retry-after", b"5")]
                await send({"type": "http.response.start", "status": 503, "headers": headers})
                await send({"type": "http.response.body", "body": payload})
                return
            await send_error(send, path, 503, "the server is shutting down; retry on another instance",
                             {"Retry-After": "5"})  # fmt: skip
            return
        self.ctx.active_requests += 1
        try:
            if scope["method"] in BODY_METHODS:
                try:
                    scope, receive = await self._read_body(scope, receive)
                except RequestRejected as exc:
                    await send_error(send, path, exc.status, exc.message, exc.headers)
                    return
            await self.app(scope, receive, send)
        finally:
            self.ctx.active_requests -= 1

    async def _read_body(self, scope, receive):
        scope, body, pending = await read_body(scope, receive, self.max_body_bytes, self.body_timeout)
        sent = False

        async def replay():
            nonlocal sent
            if pending:
                return pending.pop(0)
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return scope, replay


async def read_body(scope, receive, limit: int, timeout: float) -> tuple[dict, bytes, list[dict]]:
    """The whole request body within `limit` bytes and `timeout` seconds, checked as text (RequestRejected
    otherwise); returns the scope (its Content-Type made JSON), the body, and any non-body message seen while
    reading (a disconnect), for the caller to replay. Shared by RequestGuard and the replicas' ingress."""
    headers = dict(scope.get("headers") or [])
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestRejected(413, f"the request body is {int(declared)} bytes; the limit is {limit} bytes "
                                   "(--max-request-bytes)")  # fmt: skip
    chunks: list[bytes] = []
    size = 0
    deadline = time.monotonic() + timeout
    pending: list[dict] = []
    while True:
        left = deadline - time.monotonic()
        try:
            message = await asyncio.wait_for(receive(), timeout=max(left, 0.001))
        except asyncio.TimeoutError:
            raise RequestRejected(408, f"the request body did not arrive within {timeout:g} s") from None
        if message["type"] != "http.request":
            pending.append(message)
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestRejected(413, f"the request body exceeds the limit of {limit} bytes (--max-request-bytes)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    if body:
        check_text(body)
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if not (content_type == b"application/json" or content_type.endswith(b"+json")):
            raw = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
            scope = {**scope, "headers": [*raw, (b"content-type", b"application/json")]}
    return scope, body, pending


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing connections whose request head does not arrive within `seconds`."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(seconds, self._header_timed_out)

        def data_received(self, data: bytes) -> None:
            awaiting_head = self.cycle is None or self.cycle.response_complete
            if awaiting_head and self._header_timer is None:
                self._header_timer = self.loop.call_later(seconds, self._header_timed_out)
            super().data_received(data)
            if self._header_timer is not None and self.cycle is not None and not self.cycle.response_complete:
                self._header_timer.cancel()  # the head is in: the body has its own deadline (RequestGuard)
                self._header_timer = None

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

        def _header_timed_out(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol
