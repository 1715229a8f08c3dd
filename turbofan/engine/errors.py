"""Errors that end some requests but never the engine loop."""

from __future__ import annotations


class RequestFailedError(RuntimeError):
    """Serving these requests raised; they are aborted (their KV blocks freed) and the engine goes on."""

    def __init__(self, request_ids: list[str], cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.request_ids = list(request_ids)
        self.cause = cause
