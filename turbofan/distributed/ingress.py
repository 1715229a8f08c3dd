"""The one HTTP front of `--replicas N`: reads each request, keys it for prefix affinity, relays it to an engine
replica, and turns a replica that dies mid-request into an error in the calling API's own format.

Ray Serve's proxy hands a request to a replica before the body is read, so it cannot route on the prompt; this
ASGI app, itself a Serve replica behind the proxy, reads the body (with the limits of server/guard.py), computes
the affinity key (affinity.py) and calls the engine deployment through a handle whose router picks the replica
(router.py). The engine replica runs the request through a whole turbofan app and streams back its ASGI messages.

When the engine replica dies (`kill -9`, out of memory, a lost node) the stream from it fails. Before any byte
of the answer was sent the client gets a 503 in its API's shape (OpenAI `{"error": {...}}`, Ollama
`{"error": "..."}`) saying the replica died and to retry; once a stream has started it ends with a final error
event (SSE `data: {"error": ...}` then `data: [DONE]`) or NDJSON line (`{"error": "..."}`), as the single-process
server ends a stream that fails. Ray restarts the replica meanwhile. Nothing is retried here: a generation may
already have been streamed in part, and only the client knows whether to ask again.

Pure ASGI and Ray-free (the engine call and the "is this a dead replica" test are passed in), so the tests drive
it with a fake engine.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

from turbofan.distributed.affinity import request_prefixes
from turbofan.server.errors import is_ollama_path, openai_error_body
from turbofan.server.guard import BODY_METHODS, RequestRejected, read_body, send_error
from turbofan.server.openai_api import sse

log = logging.getLogger("turbofan.replicas")

# What of the ASGI scope travels to the engine replica (the rest, such as Ray's or the server's state, stays).
FORWARDED = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string", "root_path",
             "headers", "client", "server")  # fmt: skip
DIED = "the replica serving this request died (Ray is restarting it); retry the request"

EngineCall = Callable[[dict, bytes, list[str]], AsyncIterator[dict]]


def stream_error(content_type: str, path: str, status: int, message: str) -> bytes:
    """The last bytes of a stream that failed after it started, in the stream's own format."""
    if content_type.startswith("text/event-stream"):
        return (sse(openai_error_body(status, message)) + "data: [DONE]\n\n").encode()
    if content_type.startswith("application/x-ndjson") or is_ollama_path(path):
        return (json.dumps({"error": message}) + "\n").encode()
    return b""  # a plain body cut short: nothing can be appended that a client would parse


class Ingress:
    """ASGI app: body → affinity key → engine replica (through `call`) → the client, errors shaped per API."""

    def __init__(self, call: EngineCall, is_replica_death: Callable[[BaseException], bool],
                 max_body_bytes: int, body_timeout: float):  # fmt: skip
        self.call, self.is_replica_death = call, is_replica_death
        self.max_body_bytes, self.body_timeout = max_body_bytes, body_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # no websockets
        path = scope["path"]
        body = b""
        if scope["method"] in BODY_METHODS:
            try:
                scope, body, _ = await read_body(scope, receive, self.max_body_bytes, self.body_timeout)
            except RequestRejected as exc:
                await send_error(send, path, exc.status, exc.message, exc.headers)
                return
        content_type, done = None, False
        try:
            async for message in self.call(
                {k: scope[k] for k in FORWARDED if k in scope}, body, request_prefixes(path, body)
            ):
                if message["type"] == "http.response.start":
                    headers = dict(message.get("headers") or [])
                    content_type = headers.get(b"content-type", b"").decode("latin-1")
                elif message["type"] == "http.response.body" and not message.get("more_body", False):
                    done = True
                await send(message)
        except Exception as exc:
            if done:
                return
            died = self.is_replica_death(exc)
            status, message = (503, DIED) if died else (500, f"internal server error ({type(exc).__name__})")
            if died:
                log.warning("replica died mid-request", extra={"path": path, "error": str(exc)[:200]})
            else:
                log.exception("error relaying %s %s", scope["method"], path)
            if content_type is None:
                await send_error(send, path, status, message, {"Retry-After": "5"} if died else None)
            else:
                await send(
                    {"type": "http.response.body", "body": stream_error(content_type, path, status, message)}
                )
            return
        if content_type is None:  # the replica's stream ended without an answer
            await send_error(send, path, 500, "internal server error (the replica sent no response)")
        elif not done:  # ... or without the body's last message
            await send({"type": "http.response.body", "body": b""})

    @staticmethod
    async def _lifespan(receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
