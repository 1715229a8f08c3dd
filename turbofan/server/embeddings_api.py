"""Embedding routes: OpenAI's `/v1/embeddings` and Ollama's `/api/embed` and legacy `/api/embeddings`.

All three tokenize on a worker thread (never the event loop), refuse a request over `limits.MAX_EMBEDDING_TOKENS`
tokens in all with a 400 before the engine sees it, and hand token lists to the model's engine, which embeds them
in bounded slices between other work and drops the remaining slices of a client that disconnected
(engine/embedding.py, engine/hidden_states.py). The vectors are the model's own (pooling and normalisation as its sentence-transformers files say);
`/api/embed` always returns unit vectors (Ollama does); `dimensions` keeps the first d components and normalises
again (OpenAI's and Ollama's Matryoshka truncation). `encoding_format: base64` is little-endian float32 — what the
`openai` SDK asks for by default and decodes with numpy. The answer's JSON is written by numpy in bulk
(server/vectors.py), off the event loop: no Python float per number.

The vectors leave the engine as numpy arrays: what the routes compute on them (normalising, shortening) must not
run torch ops on the event loop's thread, where an op big enough to go parallel would give that thread an OpenMP
team of its own for good, and a second team makes libgomp stop spin-waiting for every engine (engine/embedding.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, field_validator

from turbofan.engine import EngineDeadError
from turbofan.engine.errors import RequestFailedError
from turbofan.server import limits
from turbofan.server.errors import APIError, bad_request
from turbofan.server.serving import ServerContext, request_failed, unless_disconnected
from turbofan.server.vectors import base64_rows, json_rows

router = APIRouter()


class EmbeddingRequest(BaseModel):
    """OpenAI's body; `truncate` is turbofan's (and Ollama's) choice for inputs longer than the model takes."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate: bool = False

    _inputs = field_validator("input", mode="before")(limits.check_embedding_inputs)


class OllamaEmbedRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: str | list[str] | None = None
    truncate: bool = True
    dimensions: int | None = None
    options: dict[str, Any] | None = None
    keep_alive: Any = None

    _inputs = field_validator("input", mode="before")(limits.check_embedding_inputs)
    _keep_alive = field_validator("keep_alive")(limits.check_keep_alive)


class OllamaEmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | None = None
    options: dict[str, Any] | None = None
    keep_alive: Any = None

    _keep_alive = field_validator("keep_alive")(limits.check_keep_alive)


def ctx_of(request: Request) -> ServerContext:
    return request.app.state.ctx


def _normalize(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


async def _embed(request: Request, client, batch: list[list[int]]) -> np.ndarray:
    """The engine's vectors for `batch` (cancelled, with its remaining slices, if the client leaves)."""
    if not batch:
        return np.zeros((0, 0), dtype=np.float32)
    try:
        return (await unless_disconnected(request, client.embed(batch))).numpy()
    except ValueError as exc:
        raise bad_request(str(exc), "input") from None
    except RequestFailedError as exc:  # this request's slice failed; the engine serves on
        raise request_failed(exc) from None
    except EngineDeadError as exc:
        raise APIError(503, str(exc), code="engine_dead") from None


def _tokenize_now(client, texts: list[str], truncate: bool) -> list[list[int]]:
    try:
        return client.tokenize(texts, truncate)
    except ValueError as exc:
        raise bad_request(str(exc), "input") from None


async def _tokenize(client, texts: list[str], truncate: bool) -> list[list[int]]:
    """Token lists on a worker thread (a long input must not stall the event loop), then the total-token cap."""
    batch = await asyncio.to_thread(_tokenize_now, client, texts, truncate)
    _check_tokens(batch)
    return batch


def _check_tokens(batch: list[list[int]]) -> None:
    """At most limits.MAX_EMBEDDING_TOKENS tokens in all, as the engine would embed them: a 400 before it does."""
    error = limits.embedding_tokens_error(sum(len(row) for row in batch))
    if error is not None:
        raise bad_request(error, "input")


def _check_dimensions(dimensions: int | None, width: int) -> None:
    """Matryoshka truncation within the model's width, checked before any work."""
    if dimensions is not None and not 1 <= dimensions <= width:
        raise bad_request(
            f"dimensions must be between 1 and {width} for this model, got {dimensions}", "dimensions"
        )


def _shorten(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    return vectors if dimensions is None else _normalize(vectors[:, :dimensions])


async def _rows(render, vectors: np.ndarray, dimensions: int | None, normalize: bool = False) -> list[bytes]:
    """Each vector's JSON text (normalised and shortened as asked), on a worker thread: an answer can be tens
    of MB."""

    def work() -> list[bytes]:
        return render(_shorten(_normalize(vectors) if normalize else vectors, dimensions))

    try:
        return await asyncio.to_thread(work)
    except ValueError as exc:
        raise APIError(500, f"the embeddings could not be encoded: {exc}", code="request_failed") from None


def _json(*parts: bytes) -> Response:
    return Response(b"".join(parts), media_type="application/json")


def _rest(fields: dict) -> bytes:
    """`fields` as the remainder of a JSON object whose first member was written already: `,"k":v,...}`."""
    return b"," + json.dumps(fields, ensure_ascii=False, separators=(",", ":"))[1:].encode()


async def _model(ctx: ServerContext, name: str | None, keep_alive: Any = None):
    """The embedding model's client; an absent one is the 404 every route gives (server/manager.py)."""
    if not name:
        raise bad_request("model is required", "model")
    return await ctx.require_model(name, keep_alive, need="embedding")


def _openai_inputs(inputs: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    """OpenAI's `input` as (texts, None) or (None, token lists); anything else is a 400."""
    if isinstance(inputs, str) or (inputs and all(isinstance(x, str) for x in inputs)):
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        if any(not t for t in texts):
            raise bad_request("input must not contain an empty string", "input")
        return texts, None
    if inputs and all(isinstance(x, int) for x in inputs):
        return None, [list(inputs)]
    if inputs and all(isinstance(x, list) for x in inputs):
        return None, [list(x) for x in inputs]
    raise bad_request("input must be a non-empty string, list of strings, or list of token id lists", "input")


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> dict:
    ctx = ctx_of(request)
    if body.encoding_format not in ("float", "base64"):
        raise bad_request(
            f"encoding_format must be float or base64, got {body.encoding_format!r}", "encoding_format"
        )
    texts, batch = _openai_inputs(body.input)
    client = await _model(ctx, body.model)
    _check_dimensions(body.dimensions, client.dimensions)
    if texts is not None:
        batch = await _tokenize(client, texts, body.truncate)
    else:
        _check_tokens(batch)
    vectors = await _embed(request, client, batch)
    render = base64_rows if body.encoding_format == "base64" else json_rows
    rows = await _rows(render, vectors, body.dimensions)
    tokens = sum(len(row) for row in batch)
    data = b",".join(b'{"object":"embedding","index":%d,"embedding":%s}' % (i, row) for i, row in enumerate(rows))
    rest = {"model": body.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return _json(b'{"object":"list","data":[', data, b"]", _rest(rest))


@router.post("/api/embed")
async def ollama_embed(body: OllamaEmbedRequest, request: Request) -> dict:
    started = time.time()
    ctx = ctx_of(request)
    client = await _model(ctx, body.model, body.keep_alive)
    loaded = time.time()
    texts = [body.input] if isinstance(body.input, str) else list(body.input or [])
    if texts:
        _check_dimensions(body.dimensions, client.dimensions)
    batch = await _tokenize(client, texts, body.truncate) if texts else []
    vectors = await _embed(request, client, batch)
    rows = await _rows(json_rows, vectors, body.dimensions, normalize=True) if texts else []
    rest = {
        "total_duration": int((time.time() - started) * 1e9),
        "load_duration": int((loaded - started) * 1e9),
        "prompt_eval_count": sum(len(row) for row in batch),
    }
    model = json.dumps(body.model, ensure_ascii=False).encode()
    return _json(b'{"model":', model, b',"embeddings":[', b",".join(rows), b"]", _rest(rest))


@router.post("/api/embeddings")
async def ollama_embeddings(body: OllamaEmbeddingsRequest, request: Request) -> dict:
    """The legacy route: one prompt, one vector, as the model computes it; an empty prompt only loads."""
    ctx = ctx_of(request)
    client = await _model(ctx, body.model, body.keep_alive)
    if not body.prompt:
        return {"embedding": []}
    vectors = await _embed(request, client, await _tokenize(client, [body.prompt], True))
    return _json(b'{"embedding":', (await _rows(json_rows, vectors, None))[0], b"}")
