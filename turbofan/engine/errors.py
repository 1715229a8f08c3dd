"""Errors that end some requests but never the engine loop."""

from __future__ import annotations


class RequestFailedError(RuntimeError):
    """Serving these requests raised; they are aborted (their KV blocks freed) and the engine goes on."""

    def __init__(self, request_ids: list[str], cause: BaseException, deltas: list | None = None):
        """`deltas`: the step's output for the other requests (a failure after the forward ends only these)."""
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.request_ids = list(request_ids)
        self.cause = cause
        self.deltas = list(deltas or [])
