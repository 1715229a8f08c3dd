"""An honest `/openapi.json`: the statuses the server really answers, with each API's error schema.

FastAPI documents 200 and 422 only, but validation errors are 400 here and every route may also answer 401 (a
key is set), 403 (a Host or Origin refused by the browser boundary), 404, 408 (a body that stalls), 413 (a body
over the limit), 500 (a request that failed while being served) and 503 (loading, queue full, shutting down).
Streams are documented with their media types, `/metrics` as Prometheus text, `/health` with its 503. Generated
schemathesis cases check all of it (tests/test_openapi.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from turbofan.server.errors import is_ollama_path

OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
OLLAMA_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
HEALTH = {
    "type": "object",
    "required": ["status"],
    "properties": {"status": {"type": "string"}, "error": {"type": "string"}},
}
ERRORS = {
    "400": "Invalid request: a field, the JSON or the text encoding",
    "401": "Missing or wrong API key",
    "403": "A Host or Origin this server does not serve (the browser boundary: docs/api.md)",
    "404": "Unknown model or route",
    "408": "The request body did not arrive in time",
    "413": "The request body is larger than the limit",
    "500": "The request failed while it was being served",
    "503": "Loading, too busy (Retry-After) or shutting down",
}
STREAMS = {  # routes whose 200 may be a stream, and its media type
    "/v1/chat/completions": "text/event-stream",
    "/v1/completions": "text/event-stream",
    "/api/generate": "application/x-ndjson",
    "/api/chat": "application/x-ndjson",
    "/api/pull": "application/x-ndjson",
}


def _error_responses(path: str) -> dict[str, Any]:
    ref = {"$ref": "#/components/schemas/" + ("OllamaError" if is_ollama_path(path) else "OpenAIError")}
    return {code: {"description": text, "content": {"application/json": {"schema": ref}}} for code, text in
            ERRORS.items()}  # fmt: skip


def build_openapi(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas["OpenAIError"] = OPENAI_ERROR
    schemas["OllamaError"] = OLLAMA_ERROR
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            responses.update(_error_responses(path))
            ok = responses.setdefault("200", {"description": "Successful Response"})
            content = ok.setdefault("content", {})
            if path in STREAMS:
                content[STREAMS[path]] = {"schema": {"type": "string"}}
            if path == "/metrics":
                ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
            elif path == "/health":
                content["application/json"] = {"schema": HEALTH}
                responses["503"] = {"description": "Loading, failed or draining",
                                    "content": {"application/json": {"schema": HEALTH}}}  # fmt: skip
            elif path == "/api/delete":
                ok.pop("content", None)  # an empty 200, as Ollama answers
    return schema


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
