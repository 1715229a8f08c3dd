"""The engine replica's side of `--replicas N`: one request, already read by the ingress, run through a whole
turbofan app, its ASGI messages yielded as they are sent (a Ray streaming call carries them back).

When the caller goes away (the client disconnected, so Ray cancels this generator) the app sees `http.disconnect`
and is cancelled, so the engine aborts the request as it does for a client of the single-process server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

_END = object()


async def relay(
    app, scope: dict, body: bytes, extra_headers: list[tuple[bytes, bytes]] = ()
) -> AsyncIterator[dict]:
    """Run `app` on one request; yield each message it sends (`extra_headers` added to the response head)."""
    queue: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start" and extra_headers:
            message = {**message, "headers": [*message.get("headers", []), *extra_headers]}
        await queue.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            queue.put_nowait(_END)

    task = asyncio.create_task(run())
    try:
        while (message := await queue.get()) is not _END:
            yield message
        await task  # an exception the app let out reaches the caller (the ingress answers it)
    finally:
        gone.set()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
