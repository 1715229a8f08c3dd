"""Embedding routes: OpenAI's `/v1/embeddings` and Ollama's `/api/embed` and legacy `/api/embeddings`.

All three tokenize on the event loop and hand token lists to the model's EmbeddingEngine, which batches whatever
is pending. The vectors are the model's own (pooling and normalisation as its sentence-transformers files say);
`/api/embed` always returns unit vectors (Ollama does); `dimensions` keeps the first d components and normalises
again (OpenAI's and Ollama's Matryoshka truncation). `encoding_format: base64` is little-endian float32 — what the
`openai` SDK asks for by default and decodes with numpy.

The vectors leave the engine as numpy arrays: what the routes compute on them (normalising, shortening) must not
run torch ops on the event loop's thread, where an op big enough to go parallel would give that thread an OpenMP
team of its own for good, and a second team makes libgomp stop spin-waiting for every engine (engine/embedding.py).
"""

from __future__ import annotations

import base64
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, field_validator

from turbofan.engine import EngineDeadError
from turbofan.server import limits
from turbofan.server.errors import APIError, bad_request
from turbofan.server.serving import ServerContext, unless_disconnected

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
    if not batch:
        return np.zeros((0, 0), dtype=np.float32)
    try:
        return (await unless_disconnected(request, client.embed(batch))).numpy()
    except ValueError as exc:
        raise bad_request(str(exc), "input") from None
    except EngineDeadError as exc:
        raise APIError(503, str(exc), code="engine_dead") from None


def _tokenize(client, texts: list[str], truncate: bool) -> list[list[int]]:
    try:
        return client.tokenize(texts, truncate)
    except ValueError as exc:
        raise bad_request(str(exc), "input") from None


def _shorten(vectors: np.ndarray, dimensions: int | None, width: int) -> np.ndarray:
    if dimensions is None:
        return vectors
    if not 1 <= dimensions <= width:
        raise bad_request(
            f"dimensions must be between 1 and {width} for this model, got {dimensions}", "dimensions"
        )
    return _normalize(vectors[:, :dimensions])


async def _model(ctx: ServerContext, name: str | None, keep_alive: Any = None):
    """The embedding model's client; an absent one is the 404 every route gives (server/manager.py)."""
    if not name:
        raise bad_request("model is required", "model")
    return await ctx.require_model(name, keep_alive, need="embedding")


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> dict:
    ctx = ctx_of(request)
    if body.encoding_format not in ("float", "base64"):
        raise bad_request(
            f"encoding_format must be float or base64, got {body.encoding_format!r}", "encoding_format"
        )
    inputs = body.input
    if isinstance(inputs, str) or (inputs and all(isinstance(x, str) for x in inputs)):
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        if any(not t for t in texts):
            raise bad_request("input must not contain an empty string", "input")
        client = await _model(ctx, body.model)
        batch = _tokenize(client, texts, body.truncate)
    elif inputs and all(isinstance(x, int) for x in inputs):
        client, batch = await _model(ctx, body.model), [list(inputs)]
    elif inputs and all(isinstance(x, list) for x in inputs):
        client, batch = await _model(ctx, body.model), [list(x) for x in inputs]
    else:
        raise bad_request(
            "input must be a non-empty string, list of strings, or list of token id lists", "input"
        )
    vectors = _shorten(await _embed(request, client, batch), body.dimensions, client.dimensions)
    if body.encoding_format == "base64":
        values = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    else:
        values = vectors.tolist()
    tokens = sum(len(row) for row in batch)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(values)],
        "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


@router.post("/api/embed")
async def ollama_embed(body: OllamaEmbedRequest, request: Request) -> dict:
    started = time.time()
    ctx = ctx_of(request)
    client = await _model(ctx, body.model, body.keep_alive)
    loaded = time.time()
    texts = [body.input] if isinstance(body.input, str) else list(body.input or [])
    batch = _tokenize(client, texts, body.truncate) if texts else []
    vectors = await _embed(request, client, batch)
    if texts:
        vectors = _shorten(_normalize(vectors), body.dimensions, client.dimensions)
    return {
        "model": body.model,
        "embeddings": vectors.tolist() if texts else [],
        "total_duration": int((time.time() - started) * 1e9),
        "load_duration": int((loaded - started) * 1e9),
        "prompt_eval_count": sum(len(row) for row in batch),
    }


@router.post("/api/embeddings")
async def ollama_embeddings(body: OllamaEmbeddingsRequest, request: Request) -> dict:
    """The legacy route: one prompt, one vector, as the model computes it; an empty prompt only loads."""
    ctx = ctx_of(request)
    client = await _model(ctx, body.model, body.keep_alive)
    if not body.prompt:
        return {"embedding": []}
    vectors = await _embed(request, client, _tokenize(client, [body.prompt], True))
    return {"embedding": vectors[0].tolist()}
