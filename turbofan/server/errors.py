"""Errors in the shape each API's clients parse: OpenAI `{"error": {...}}`, Ollama `{"error": "..."}`.

The shape is chosen by path: `/api/*` is Ollama's, everything else OpenAI's. Validation errors become 400
(clients written against OpenAI never expect 422), and nothing ever answers with a stack trace. Nor with the
server's private paths: the model store's absolute path and the home directory (which names the user) are
replaced in every error message (`redact`); the logs keep them for the operator.
"""

from __future__ import annotations

import json
import logging
import os

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("turbofan.server")

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error a handler raises on purpose; rendered in the calling API's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        verbatim: bool = False,
    ):
        """`verbatim`: the message only repeats the client's own words, so it is sent unredacted (redacting it
        would tell the client which of its words are the server's private paths)."""
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers
        self.verbatim = verbatim


# (absolute path, what an error message says instead), longest first so a store inside the home directory wins.
_PRIVATE_PATHS: list[tuple[str, str]] = []


def hide_path(path: str | os.PathLike, label: str) -> None:
    """Never show `path` (as given and resolved) in an error message; `label` stands in for it."""
    for variant in {os.fspath(path), os.path.realpath(path)}:
        if len(variant) > 1 and (variant, label) not in _PRIVATE_PATHS:
            _PRIVATE_PATHS.append((variant, label))
    _PRIVATE_PATHS.sort(key=lambda pair: -len(pair[0]))


def redact(message: str) -> str:
    """`message` without the paths hide_path registered (a client learns nothing about the server's disk)."""
    for path, label in _PRIVATE_PATHS:
        if path in message:
            message = message.replace(path, label)
    return message


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def model_not_found(name: str) -> APIError:
    """Ollama's answer for a model this server does not have, the same for every kind of absent (an unknown
    name, a name not pulled yet, a path that exists, one that does not): nothing in it depends on the disk."""
    return APIError(404, f"model '{name}' not found, try pulling it first", param="model", code="model_not_found",
                    verbatim=True)  # fmt: skip


def is_ollama_path(path: str) -> bool:
    return path == "/api" or path.startswith("/api/")


def openai_error_body(
    status: int, message: str, param: str | None = None, code: str | None = None, verbatim: bool = False
) -> dict:
    return {
        "error": {
            "message": message if verbatim else redact(message),
            "type": _OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
            "param": param,
            "code": code if code is not None else str(status),
        }
    }


def error_body(
    path: str, status: int, message: str, param: str | None = None, code: str | None = None, verbatim: bool = False
) -> dict:
    if is_ollama_path(path):
        return {"error": message if verbatim else redact(message)}
    return openai_error_body(status, message, param, code, verbatim)


def error_response(
    request: Request,
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    verbatim: bool = False,
) -> JSONResponse:
    body = error_body(request.url.path, status, message, param, code, verbatim)
    return JSONResponse(body, status, headers=headers)


def describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable sentence per problem, and the first offending field as OpenAI's `param`."""
    parts, param = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        where = ".".join(loc)
        if err.get("type") == "json_invalid":
            parts.append(f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
            continue
        if param is None and where:
            param = where
        msg = err.get("msg", "invalid value")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid request", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request, exc.status, exc.message, exc.param, exc.code, exc.headers, exc.verbatim)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_error(exc)
        return error_response(request, 400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route for {request.method} {request.url.path}"
        elif exc.status_code == 405:
            detail = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(request, exc.status_code, detail, headers=getattr(exc, "headers", None))


class CatchAllMiddleware:
    """Any exception a handler did not expect: log it, answer 500 in the right shape, never a stack trace.

    A pure ASGI middleware rather than an `Exception` handler, because Starlette re-raises after calling
    that handler (and the server logs the trace a second time, outside our JSON log).
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            path = scope.get("path", "")
            log.exception("unhandled error on %s %s", scope.get("method"), path)
            if started:
                return  # headers are out: all we can do is end the stream
            body = json.dumps(error_body(path, 500, f"internal server error ({type(exc).__name__})")).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})
