"""Model variants over HTTP: Ollama's `/api/copy` and `/api/create`, and applying a variant's Modelfile settings.

`from` and `source` are names of models in the store, never paths (`turbofan create -f` and `turbofan cp` take
paths on the server's own command line). `/api/create` takes the current fields (`from`, `parameters`, `system`, `template`) or a legacy `modelfile`
string; the variant is a store entry whose files are hard links to its base (ModelStore.copy). When a request
names a variant, its SYSTEM, TEMPLATE and PARAMETERs are defaults the request's own fields override (Ollama's
order); the variant loads as a model of its own.
"""

from __future__ import annotations

import asyncio
import json
from functools import lru_cache
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from turbofan.server.errors import APIError, bad_request, model_not_found
from turbofan.store.manifest import read_manifest
from turbofan.store.modelfile import Modelfile, ModelfileError, coerce_parameters, parse_modelfile

router = APIRouter()


class CopyRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    source: str
    destination: str


class CreateRequest(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    model: str | None = None
    name: str | None = None  # older clients
    from_: str | None = Field(None, alias="from")
    modelfile: str | None = None
    parameters: dict[str, Any] | None = None
    system: str | None = None
    template: str | None = None
    stream: bool = True


async def _copy(store, source: str, destination: str, modelfile: dict | None = None) -> None:
    """store.copy for a request: `source` is a name of the store, never a path (an HF directory or a GGUF on the
    server's disk is a CLI source only), and an absent one is the inference routes' 404, the same for every kind
    of absent; a bad destination is a 400."""
    from turbofan.store.errors import ModelNotFoundError, StoreError
    from turbofan.store.names import is_name

    if not is_name(source.strip()):
        raise model_not_found(source)
    try:
        await asyncio.to_thread(store.copy, source.strip(), destination, modelfile, allow_paths=False)
    except ModelNotFoundError:
        raise model_not_found(source) from None
    except StoreError as exc:
        raise APIError(400, str(exc)) from None


@router.post("/api/copy")
async def copy(body: CopyRequest, request: Request) -> Response:
    await _copy(request.app.state.ctx.store, body.source, body.destination)
    return Response(status_code=200)


@router.post("/api/create")
async def create(body: CreateRequest, request: Request):
    name = body.model or body.name
    if not name:
        raise bad_request("model is required")
    try:
        mf = parse_modelfile(body.modelfile) if body.modelfile else Modelfile()
        mf.from_ = body.from_ or mf.from_
        mf.parameters = {**mf.parameters, **coerce_parameters(body.parameters or {})}
    except ModelfileError as exc:
        raise bad_request(str(exc)) from None
    mf.system = body.system if body.system is not None else mf.system
    mf.template = body.template if body.template is not None else mf.template
    if not mf.from_:
        raise bad_request('"from" is required: the local model this one is a variant of')
    await _copy(request.app.state.ctx.store, mf.from_, name, mf.to_dict())
    defaults_of.cache_clear()
    done = [{"status": "using existing layers"}, {"status": "writing manifest"}, {"status": "success"}]
    if not body.stream:
        return done[-1]
    return StreamingResponse((json.dumps(x) + "\n" for x in done), media_type="application/x-ndjson")


@lru_cache(maxsize=64)
def defaults_of(path: str) -> dict:
    """A variant's Modelfile settings ({} for a plain model), read once per model directory."""
    manifest = read_manifest(path) if path else None
    return dict(manifest.extra.get("modelfile") or {}) if manifest is not None else {}


def apply_variant(ctx, body) -> None:
    """Fill a generate/chat body's unset fields from the Modelfile of the model this request acquired."""
    slot = ctx.manager.current()
    settings = defaults_of(slot.path) if slot is not None else {}
    if not settings:
        return
    body.options = {**settings.get("parameters", {}), **(body.options or {})}
    system = settings.get("system")
    if hasattr(body, "messages"):
        if system and body.messages and not any(m.role == "system" for m in body.messages):
            body.messages = [type(body.messages[0])(role="system", content=system), *body.messages]
    else:
        body.system = body.system if body.system is not None else system
        body.template = body.template or settings.get("template")
