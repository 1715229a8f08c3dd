"""What both APIs share: the served model's names, starting a request, and accounting for it when it ends.

A `Generation` is started (and its first delta awaited) before any response is sent, so a bad prompt or a
full queue answers with its proper status instead of an error in the middle of a 200 stream. It yields the
engine's deltas as they come (each token and text piece once) and folds them into the cumulative answer for
whoever needs it whole (a non-streaming response, the metrics, the request log). When the request ends —
finished, failed, or abandoned by a client that went away — it is counted in the metrics and logged as one JSON
line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request

from turbofan.engine import (
    EngineDeadError,
    OutputBuilder,
    QueueFullError,
    RequestDelta,
    RequestOutput,
    SamplingParams,
)
from turbofan.engine.errors import RequestFailedError
from turbofan.server.errors import APIError
from turbofan.server.manager import ModelManager
from turbofan.server.metrics import ServerMetrics
from turbofan.server.settings import ServerSettings
from turbofan.server.state import EngineState

request_log = logging.getLogger("turbofan.requests")
T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


@dataclass
class ServerContext:
    manager: ModelManager
    settings: ServerSettings
    metrics: ServerMetrics = field(init=False)
    started_at: float = field(default_factory=time.time)
    _store: Any = None
    _served_info: Any = None  # the store's description of the served model (ollama_api.served_info)
    draining: bool = False  # SIGTERM arrived: new requests get 503 while running ones finish (guard.py)
    active_requests: int = 0  # requests the guard let through and that have not ended

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(self.manager, lambda: self.model_name)

    def tool_parser(self, tokenizer, template: str | None, native: bool):
        """The parser of tool calls in a model's output: --tool-call-parser, else the chat template's format."""
        from turbofan.server.tools import select_parser

        return select_parser(template, native, self.settings.tool_call_parser, tokenizer.hf)

    @property
    def reasoning_parser(self):
        """The parser of a reasoning model's thinking (--reasoning-parser), or None."""
        from turbofan.server.reasoning import ReasoningParser

        return ReasoningParser.named(self.settings.reasoning_parser)

    # -- names ------------------------------------------------------------------------------------------------
    @property
    def state(self) -> EngineState:
        """The primary model's engine state (the model named on the command line)."""
        return self.manager.primary.state

    @property
    def client(self):
        """The primary model's EngineClient, or None while it loads (or after it was unloaded)."""
        return self.manager.primary.client if self.manager.find(None) is not None else None

    @property
    def served_names(self) -> list[str]:
        if self.settings.served_model_names:
            return list(self.settings.served_model_names)
        if self.state.client is not None:
            return [self.state.client.info.name]
        return ["unknown"]

    @property
    def model_name(self) -> str:
        return self.served_names[0]

    def accepts(self, name: str | None) -> bool:
        """Whether `name` is the primary model (Ollama's default-tag spellings included)."""
        return self.manager.is_primary_name(name)

    async def require_model(self, name: str | None, keep_alive: Any = None, need: str | None = "completion"):
        """The EngineClient serving `name` (loaded on demand, held by this request until its response is sent);
        404 (the same for every kind of absent) for a model that is neither loaded nor in the store: a request
        never pulls; 400 for a model without `need`."""
        return (await self.manager.acquire(name, keep_alive, need)).client

    def current_model(self) -> tuple[str, Any]:
        """(name, EngineClient) of the model this request acquired: what its generations run on."""
        slot = self.manager.current()
        if slot is None:
            raise APIError(500, "no model was acquired for this request")
        return slot.key, slot.client

    @property
    def store(self):
        if self._store is None:
            from turbofan.store import ModelStore

            self._store = ModelStore(self.settings.models_dir)
        return self._store


# -- requests -----------------------------------------------------------------------------------------------------
def make_params(**kwargs: Any) -> SamplingParams:
    """SamplingParams from request fields; its own validation messages become 400s."""
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as exc:  # its messages start with the field's name: that is OpenAI's `param`
        name = str(exc).split(" ", 1)[0]
        raise APIError(400, str(exc), param=name if name in SamplingParams.__dataclass_fields__ else None) from None


def request_failed(exc: RequestFailedError) -> APIError:
    """The engine ended this request after an error while serving it (the server and other requests go on)."""
    return APIError(500, f"the request failed while it was being served: {exc}", code="request_failed")


class Generation:
    """One engine request as an async stream of deltas, folded into its cumulative output on the way."""

    def __init__(
        self, ctx: ServerContext, agen: AsyncIterator[RequestDelta], request_id: str, api: str, model: str = ""
    ):
        self.ctx = ctx
        self.model = model or ctx.model_name
        self.agen = agen
        self.request_id = request_id
        self.api = api
        self.first: RequestDelta | None = None
        self.builder = OutputBuilder()
        self.started = time.time()
        self._recorded = False
        self._last_time = self.started
        self._seen_tokens = False

    @property
    def num_tokens(self) -> int:
        """Tokens generated so far, over all sequences."""
        return self.builder.num_tokens

    @property
    def finished(self) -> bool:
        return self.builder.finished

    def output(self) -> RequestOutput:
        """Everything so far, cumulative (vLLM's RequestOutput)."""
        return self.builder.output()

    async def _prime(self) -> None:
        try:
            self.first = await self.agen.__anext__()
        except StopAsyncIteration:
            raise APIError(500, "the engine ended the request without output") from None
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        except QueueFullError as exc:
            self.ctx.metrics.rejected.labels(self.model, "queue_full").inc()
            raise APIError(503, str(exc), code="queue_full", headers={"Retry-After": "1"}) from None
        except EngineDeadError as exc:
            raise APIError(503, str(exc), code="engine_dead") from None
        except RequestFailedError as exc:
            raise request_failed(exc) from None
        self._observe(self.first)

    def _observe(self, delta: RequestDelta) -> None:
        self.builder.add(delta)
        new = delta.num_new_tokens
        if new:
            now = time.time()
            if self._seen_tokens:  # the first token is TTFT, not ITL
                self.ctx.metrics.observe_itl(now - self._last_time, new, self.model)
            elif new > 1 and delta.metrics.first_token_time:  # later tokens came merged with the first (a reader
                # that fell behind, a fast engine): they are ITL samples too, spread since the first token
                self.ctx.metrics.observe_itl(now - delta.metrics.first_token_time, new - 1, self.model)
            self._last_time, self._seen_tokens = now, True
        if delta.finished:
            self._record()

    async def __aiter__(self) -> AsyncIterator[RequestDelta]:
        try:
            if self.first is not None:
                yield self.first
                if self.first.finished:
                    return
            async for delta in self.agen:
                self._observe(delta)
                yield delta
        except EngineDeadError as exc:
            raise APIError(503, str(exc), code="engine_dead") from None
        except RequestFailedError as exc:
            raise request_failed(exc) from None
        finally:
            await self.close()

    async def close(self) -> None:
        """Abort the request if it is still running (the engine frees its KV blocks) and account for it."""
        with contextlib.suppress(Exception):
            await self.agen.aclose()
        self._record()

    def _record(self) -> None:
        if self._recorded or self.builder.last is None:
            return
        self._recorded = True
        out = self.builder.output()
        if not out.finished:  # abandoned: count it as aborted, as the engine does
            out.metrics.finished_time = out.metrics.finished_time or time.time()
            for c in out.outputs:
                c.finish_reason = c.finish_reason or "abort"
        self.ctx.metrics.observe_finished(out, self.model)
        log_request(out, self.api, self.model)


def log_request(out: RequestOutput, api: str, model: str) -> None:
    m = out.metrics
    end = m.finished_time or time.time()
    generated = sum(len(c.token_ids) for c in out.outputs)
    e2e = end - m.arrival_time
    decode = end - m.first_token_time if m.first_token_time else None
    reasons = sorted({c.finish_reason or "abort" for c in out.outputs})

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 4)

    request_log.info(
        "request finished",
        extra={
            "request_id": out.request_id,
            "api": api,
            "model": model,
            "prompt_tokens": len(out.prompt_token_ids),
            "cached_tokens": out.num_cached_tokens,
            "output_tokens": generated,
            "n": len(out.outputs),
            "queue_time": r(m.queue_time),
            "ttft": r(m.time_to_first_token),
            "e2e": r(e2e),
            "tokens_per_s": round(generated / e2e, 2) if e2e > 0 else None,
            "decode_tokens_per_s": round((generated - len(out.outputs)) / decode, 2) if decode else None,
            "finish_reason": reasons[0] if len(reasons) == 1 else reasons,
        },
    )


async def start_generation(
    ctx: ServerContext, prompt_ids: list[int], params: SamplingParams, request_id: str, api: str
) -> Generation:
    """Submit and wait for the first output, so errors surface before a response status is chosen."""
    model, client = ctx.current_model()
    start = client.beam_search if params.use_beam_search else client.generate
    gen = Generation(ctx, start(prompt_ids, params, request_id), request_id, api, model)
    try:
        await gen._prime()
    except BaseException:
        await gen.close()
        raise
    return gen


async def start_all(
    ctx: ServerContext, prompts: list[list[int]], make: Callable[[int], SamplingParams], base_id: str, api: str
) -> list[Generation]:
    """Several prompts (a completions batch) start together; if one fails, the others are aborted."""
    ids = [base_id if len(prompts) == 1 else f"{base_id}-{i}" for i in range(len(prompts))]
    tasks = [asyncio.ensure_future(start_generation(ctx, p, make(i), ids[i], api)) for i, p in enumerate(prompts)]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                gen = await t
                await gen.close()
        raise


async def collect(gen: Generation) -> RequestOutput:
    """Read a generation to its end; the whole answer, cumulative."""
    async for _ in gen:
        pass
    return gen.output()


async def merge(gens: list[Generation]) -> AsyncIterator[tuple[int, RequestDelta]]:
    """Interleave several generations' deltas as they come: (prompt index, delta)."""
    if len(gens) == 1:
        async for out in gens[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, gen: Generation) -> None:
        try:
            async for out in gen:
                await queue.put((i, out))
        except BaseException as exc:  # noqa: BLE001 — handed to the consumer
            await queue.put((i, exc))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for g in gens:
            await g.close()


# -- client disconnects --------------------------------------------------------------------------------------------
async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client disconnects first (which aborts its engine requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # we were cancelled ourselves
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise ClientDisconnected()
    return task.result()
