"""Ollama-compatible routes: generate, chat, tags, show, ps, pull, delete, version, and `GET /`.

Streams are NDJSON and on by default (`"stream": false` for one object); durations are nanoseconds; errors are
`{"error": "..."}`. Sampling follows Ollama's defaults (temperature 0.8, top_k 40, top_p 0.9, repeat_penalty 1.1
over the last 64 tokens) unless `options` says otherwise.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

import turbofan
from turbofan.engine import RequestDelta, RequestOutput, SamplingParams
from turbofan.model.footprint import is_encoder
from turbofan.server import gotemplate, limits
from turbofan.server.errors import APIError, bad_request, model_not_found, redact
from turbofan.server.manager import parse_keep_alive
from turbofan.server.reasoning import ReasoningParser, end_token_for
from turbofan.server.serving import (
    Generation,
    ServerContext,
    collect,
    make_params,
    start_generation,
    unless_disconnected,
)
from turbofan.server.structured import ollama_structured
from turbofan.server.tools import (
    ToolRequest,
    chat_template_source,
    ollama_calls,
    prepare_messages,
    template_supports_tools,
    tool_constraint,
)
from turbofan.server.variants import apply_variant

router = APIRouter()
NEVER = "9999-12-31T23:59:59Z"
NDJSON = "application/x-ndjson"

# Ollama's defaults for the options it applies when a request leaves them out.
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.1, "repeat_last_n": 64}
IGNORED_OPTIONS = {
    "num_keep", "typical_p", "tfs_z", "mirostat", "mirostat_tau", "mirostat_eta", "penalize_newline", "numa",
    "num_batch", "num_gpu", "main_gpu", "low_vram", "vocab_only", "use_mmap", "use_mlock", "num_thread",
    "f16_kv", "logits_all", "embedding_only",
}  # fmt: skip


class OllamaModel(BaseModel):
    model_config = ConfigDict(extra="allow")


def check_options(options: dict[str, Any] | None) -> dict[str, Any] | None:
    """The bounded options (stop strings: docs/api.md, "Limits"), checked before the model loads."""
    if options:
        limits.check_stop(options.get("stop"))
    return options


class OllamaMessage(OllamaModel):
    role: str
    content: str | None = ""
    images: list[str] | None = None

    @model_validator(mode="after")
    def _calls_are_objects(self) -> OllamaMessage:
        """An earlier turn's tool_calls are indexed by the template: objects only (else a 400, not a 500)."""
        limits.check_tool_calls((self.model_extra or {}).get("tool_calls"))
        return self


class GenerateRequest(OllamaModel):
    model: str | None = None
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    stream: bool = True
    raw: bool = False
    format: Any = None
    images: list[str] | None = None
    options: dict[str, Any] | None = None
    keep_alive: Any = None
    think: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    _options = field_validator("options")(check_options)
    _keep_alive = field_validator("keep_alive")(limits.check_keep_alive)


class ChatRequest(OllamaModel):
    model: str | None = None
    messages: list[OllamaMessage] | None = None
    stream: bool = True
    format: Any = None
    options: dict[str, Any] | None = None
    keep_alive: Any = None
    tools: list[dict] | None = None
    think: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    _options = field_validator("options")(check_options)
    _keep_alive = field_validator("keep_alive")(limits.check_keep_alive)
    _tools = field_validator("tools", mode="before")(lambda v: limits.check_count(v, limits.MAX_TOOLS, "tools"))


class NameRequest(OllamaModel):
    model: str | None = None
    name: str | None = None  # older clients
    stream: bool = True
    insecure: bool | None = None

    @property
    def target(self) -> str:
        target = self.model or self.name
        if not target:
            raise bad_request("model is required")
        return target

    @property
    def model_name(self) -> str:
        """The target, which must be a model name (family[:tag] or org/name): never a path on the server's disk,
        whose existence the answer would otherwise reveal."""
        from turbofan.store.names import is_name

        target = self.target.strip()
        if not is_name(target):
            raise bad_request(f"invalid model name {target!r}: use family[:tag] or org/name")
        return target


def ctx_of(request: Request) -> ServerContext:
    return request.app.state.ctx


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def ns(seconds: float | None) -> int:
    return max(0, int((seconds or 0.0) * 1e9))


# -- options → SamplingParams -------------------------------------------------------------------------------------
def _number(options: dict, key: str, kind: type) -> Any:
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f'option "{key}" must be a number, got {json.dumps(value)}')
    if kind is int:
        if float(value) != int(value):
            raise bad_request(f'option "{key}" must be an integer, got {value}')
        return int(value)
    return float(value)


def sampling_from_options(
    options: dict[str, Any] | None, prompt_len: int, max_model_len: int, logprobs: int | None, format_: Any = None,
    reasoning_end_token_id: int | None = None,
) -> SamplingParams:  # fmt: skip
    opts = {**DEFAULTS, **{k: v for k, v in (options or {}).items() if v is not None}}
    ints = ("num_predict", "num_ctx", "top_k", "repeat_last_n", "seed")
    floats = ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty")
    values: dict[str, Any] = {}
    for key in ints:
        if key in opts:
            values[key] = _number(opts, key, int)
    for key in floats:
        if key in opts:
            values[key] = _number(opts, key, float)
    stop = opts.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise bad_request('option "stop" must be a string or a list of strings')
    context = check_num_ctx(values.get("num_ctx"), prompt_len, max_model_len)
    num_predict = values.get("num_predict", -1)
    max_tokens = None if num_predict < 0 else num_predict
    if context > prompt_len:
        room = context - prompt_len
        max_tokens = room if max_tokens is None else min(max_tokens, room)
    seed = values.get("seed")
    repeat_last_n = values.get("repeat_last_n", 64)
    return make_params(
        temperature=values.get("temperature", 0.8),
        top_k=values.get("top_k", -1),
        top_p=values.get("top_p", 1.0),
        min_p=values.get("min_p", 0.0),
        repetition_penalty=values.get("repeat_penalty", 1.0),
        repeat_last_n=-1 if repeat_last_n == -1 else repeat_last_n,
        presence_penalty=values.get("presence_penalty", 0.0),
        frequency_penalty=values.get("frequency_penalty", 0.0),
        seed=seed if seed is not None and seed >= 0 else None,
        stop=stop,
        max_tokens=max_tokens,
        logprobs=logprobs,
        structured=ollama_structured(format_),
        reasoning_end_token_id=reasoning_end_token_id,
    )


def check_num_ctx(num_ctx: int | None, prompt_len: int, max_model_len: int) -> int:
    """The request's context limit: num_ctx (at most the loaded context); a prompt that does not fit is a 400
    naming both lengths, never silently truncated."""
    if num_ctx is None:
        return max_model_len
    if num_ctx < 1:
        raise bad_request(f'option "num_ctx" must be at least 1, got {num_ctx}')
    if num_ctx > max_model_len:
        raise bad_request(
            f"num_ctx {num_ctx} is more than the {max_model_len} tokens of context this model was loaded with; "
            "ask for less, or restart the server with a larger --max-model-len"
        )
    if prompt_len >= num_ctx:
        raise bad_request(
            f"the prompt is {prompt_len} tokens long but num_ctx is {num_ctx}: it does not fit the context "
            "(turbofan never truncates a prompt); shorten it or raise num_ctx"
        )
    return num_ctx


def _logprobs_k(logprobs: bool | None, top: int | None) -> int | None:
    if not logprobs:
        return None
    if top is not None and not 0 <= top <= 20:
        raise bad_request(f"top_logprobs must be between 0 and 20, got {top}")
    return top or 0


def _unsupported(images: list | None) -> None:
    if images:
        raise bad_request("this model does not support images")


def _thinking(ctx: ServerContext, model: str | None, think: Any) -> ReasoningParser | None:
    """The reasoning parser when this request thinks: `think` true, or left out, on a server started with
    --reasoning-parser; false turns it off (the template renders with enable_thinking=False)."""
    if think not in (None, True, False):
        raise bad_request(f"think must be true or false, got {json.dumps(think)}")
    parser = ctx.reasoning_parser
    if think and parser is None:
        raise bad_request(f'"{model}" does not support thinking (start turbofan serve with --reasoning-parser)')
    return parser if think is not False else None


def _think_kwargs(ctx: ServerContext, think: Any) -> dict:
    """Chat template arguments: a reasoning model asked not to think renders with enable_thinking=False."""
    return {"enable_thinking": False} if think is False and ctx.reasoning_parser is not None else {}


# -- prompts ------------------------------------------------------------------------------------------------------
def generate_prompt(body: GenerateRequest, client, chat_template: str | None, **template_kwargs) -> list[int]:
    tok = client.tokenizer
    prompt = body.prompt or ""
    if body.raw:
        text, special = prompt, True
    elif body.template:
        try:
            text = gotemplate.render(body.template, {"System": body.system or "", "Prompt": prompt, "Response": ""})
        except gotemplate.TemplateError as exc:
            raise bad_request(f"template: {exc}") from None
        special = True
    elif chat_template or tok.has_chat_template:
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
            {"role": "user", "content": prompt}
        ]
        text, special = _render_chat(client, messages, chat_template, **template_kwargs), False
    else:  # a base model: Ollama's template is then just {{ .System }} {{ .Prompt }}
        text, special = (f"{body.system}\n\n{prompt}" if body.system else prompt), True
    ids = tok.encode(text, add_special_tokens=special)
    return list(body.context or []) + ids


def _render_chat(client, messages: list[dict], chat_template: str | None, **kwargs) -> str:
    try:
        return client.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, chat_template=chat_template, **kwargs
        )
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    except Exception as exc:  # jinja: the template refused these messages
        raise bad_request(f"the chat template could not render these messages: {exc}") from None


def _chat_message(m: OllamaMessage) -> dict:
    """An Ollama message for the chat template: earlier calls (arguments as objects) and tool results
    (`tool_name`) in the shape HF templates read."""
    d: dict[str, Any] = {"role": m.role, "content": m.content or ""}
    extra = m.model_extra or {}
    if extra.get("tool_calls"):
        d["tool_calls"] = [{"type": "function", "function": c.get("function", c)} for c in extra["tool_calls"]]
    if extra.get("tool_name"):
        d["name"] = extra["tool_name"]
    return d


# -- responses ----------------------------------------------------------------------------------------------------
def final_stats(out: RequestOutput, started: float, load_seconds: float) -> dict:
    m = out.metrics
    end = m.finished_time or time.time()
    first = m.first_token_time
    scheduled = m.first_scheduled_time or m.arrival_time
    c = out.outputs[0]
    return {
        "done_reason": c.finish_reason if c.finish_reason in ("stop", "length") else "stop",
        "total_duration": ns(time.time() - started),
        "load_duration": ns(load_seconds),
        "prompt_eval_count": len(out.prompt_token_ids),
        "prompt_eval_duration": ns((first or end) - scheduled),
        "eval_count": len(c.token_ids),
        "eval_duration": ns(end - first if first else 0.0),
    }


def ollama_logprobs(token_ids: list[int], entries, k: int, tokenizer) -> list[dict]:
    out = []
    for token, entry in zip(token_ids, entries):
        chosen = entry.get(token)

        def text(t, lp):
            return lp.decoded_token if lp is not None and lp.decoded_token is not None else tokenizer.decode_token(t)

        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
        top = [{"token": text(t, lp), "logprob": max(lp.logprob, -9999.0)} for t, lp in ranked if (lp.rank or 0) <= k]
        out.append(
            {
                "token": text(token, chosen),
                "logprob": max(chosen.logprob, -9999.0) if chosen else -9999.0,
                "top_logprobs": top[:k],
            }
        )
    return out


def _text_and_logprobs(delta: RequestDelta, k: int | None, tokenizer) -> tuple[str, list | None]:
    """The new text (and logprobs) of a delta's only sequence."""
    if not delta.outputs:
        return "", None
    c = delta.outputs[0]
    lps = None
    if k is not None and c.logprobs:
        lps = ollama_logprobs(c.token_ids, c.logprobs, k, tokenizer)
    return c.text, lps


def _whole(out: RequestOutput, k: int | None, tokenizer) -> tuple[str, list | None]:
    """A whole answer's text (and logprobs)."""
    c = out.outputs[0]
    lps = ollama_logprobs(c.token_ids, c.logprobs, k, tokenizer) if k is not None and c.logprobs is not None else None
    return c.text, lps


def _line(payload: dict) -> str:
    return json.dumps(payload, ensure_ascii=False) + "\n"


async def _ndjson(
    gen: Generation, shape, final, k: int | None, tokenizer, tools=None, reasoning: ReasoningParser | None = None
) -> AsyncIterator[str]:
    """Stream: one line per new piece of text (a tool call in one line once it is complete, as Ollama sends
    it; thinking in `thinking`), then the final line with the statistics."""
    thoughts = reasoning.stream() if reasoning is not None else None
    try:
        async for delta in gen:
            text, lps = _text_and_logprobs(delta, k, tokenizer)
            thinking = ""
            if thoughts is not None:
                thinking, text = thoughts.feed(text)
                if delta.finished:
                    more_thinking, more_text = thoughts.finish()
                    thinking, text = thinking + more_thinking, text + more_text
            calls = []
            if tools is not None:
                done = len(tools.calls) - (1 if tools.in_call else 0)
                events = tools.feed(text) + (tools.finish() if delta.finished else [])
                text = "".join(e.text for e in events if e.kind == "content")
                complete = len(tools.calls) - (1 if tools.in_call else 0)
                calls = ollama_calls(tools.calls)[done:complete]
            if text or lps or calls or thinking:
                line = shape(text, lps, False, None, thinking)
                if calls:
                    line["message"]["tool_calls"] = calls
                yield _line(line)
            if delta.finished:
                yield _line(final(gen.output()))
    except APIError as exc:
        yield _line({"error": redact(exc.message)})


def _load_response(model: str, keep_alive: Any, chat: bool) -> dict:
    unload = parse_keep_alive(keep_alive) == 0  # the manager unloads it once this response is sent
    body = {"model": model, "created_at": now_rfc3339(), "done": True, "done_reason": "unload" if unload else "load"}
    if chat:
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    return body


async def _engine_for(ctx: ServerContext, model: str | None, keep_alive: Any = None, need: str = "completion"):
    """The model's engine, loaded on demand; returns (its client, seconds waited for it to load)."""
    if not model:
        raise bad_request("model is required")
    t0 = time.time()
    client = await ctx.require_model(model, keep_alive, need)  # an absent model: Ollama's 404 (model_not_found)
    return client, time.time() - t0


# -- generate / chat ----------------------------------------------------------------------------------------------
@router.post("/api/generate")
async def generate(body: GenerateRequest, request: Request):
    started = time.time()
    ctx = ctx_of(request)
    client, waited = await _engine_for(ctx, body.model, body.keep_alive)
    apply_variant(ctx, body)
    _unsupported(body.images)
    reasoning = _thinking(ctx, body.model, body.think)
    if body.suffix:
        raise bad_request(f'"{body.model}" does not support insert')
    if not body.prompt and not body.context:
        return JSONResponse(_load_response(body.model, body.keep_alive, chat=False))
    k = _logprobs_k(body.logprobs, body.top_logprobs)
    template_kwargs = _think_kwargs(ctx, body.think)
    prompt_ids = await asyncio.to_thread(generate_prompt, body, client, ctx.settings.chat_template, **template_kwargs)
    params = sampling_from_options(body.options, len(prompt_ids), client.info.max_model_len, k, body.format,
                                   end_token_for(reasoning, True, client.tokenizer))  # fmt: skip
    request_id = f"ollama-gen-{int(started * 1e6):x}-{id(body):x}"
    gen = await unless_disconnected(request, start_generation(ctx, prompt_ids, params, request_id, "ollama.generate"))
    model = body.model

    def shape(text: str, lps, done: bool, extra: dict | None, thinking: str = "") -> dict:
        line = {"model": model, "created_at": now_rfc3339(), "response": text, "done": done}
        if thinking:
            line["thinking"] = thinking
        if lps is not None:
            line["logprobs"] = lps
        return {**line, **(extra or {})}

    def final(out: RequestOutput) -> dict:
        context = list(out.prompt_token_ids) + list(out.outputs[0].token_ids)
        return shape("", None, True, {**final_stats(out, started, waited), "context": context})

    if body.stream:
        lines = _ndjson(gen, shape, final, k, client.tokenizer, reasoning=reasoning)
        return StreamingResponse(lines, media_type=NDJSON)
    out = await unless_disconnected(request, collect(gen))
    text, lps = _whole(out, k, client.tokenizer)
    thinking, text = reasoning.split(text) if reasoning is not None else ("", text)
    reply = {**final(out), "response": text, **({"thinking": thinking} if thinking else {})}
    return JSONResponse({**reply, **({"logprobs": lps} if lps is not None else {})})


@router.post("/api/chat")
async def chat(body: ChatRequest, request: Request):
    started = time.time()
    ctx = ctx_of(request)
    client, waited = await _engine_for(ctx, body.model, body.keep_alive)
    apply_variant(ctx, body)
    images = [img for m in body.messages or [] for img in (m.images or [])]
    _unsupported(images)
    reasoning = _thinking(ctx, body.model, body.think)
    if not body.messages:
        return JSONResponse(_load_response(body.model, body.keep_alive, chat=True))
    k = _logprobs_k(body.logprobs, body.top_logprobs)
    # Ollama has no tool_choice (the model decides); turbofan takes one at the top level or in options
    choice = (body.model_extra or {}).get("tool_choice", (body.options or {}).get("tool_choice"))
    tools = ToolRequest.parse(body.tools, choice)
    template = chat_template_source(client.tokenizer, ctx.settings.chat_template)
    native = template_supports_tools(template)
    messages, kwargs = prepare_messages([_chat_message(m) for m in body.messages], tools, native)
    kwargs.update(_think_kwargs(ctx, body.think))

    def tokenize_messages() -> list[int]:  # off the event loop, like every tokenization
        text = _render_chat(client, messages, ctx.settings.chat_template, **kwargs)
        return client.tokenizer.encode(text, add_special_tokens=False)

    prompt_ids = await asyncio.to_thread(tokenize_messages)
    parser = ctx.tool_parser(client.tokenizer, template, native) if tools is not None else None
    fmt = body.format
    constraint = tool_constraint(tools, parser, fmt not in (None, "")) if parser is not None else None
    fmt = constraint if constraint is not None else fmt
    params = sampling_from_options(body.options, len(prompt_ids), client.info.max_model_len, k, fmt,
                                   end_token_for(reasoning, True, client.tokenizer))  # fmt: skip
    request_id = f"ollama-chat-{int(started * 1e6):x}-{id(body):x}"
    gen = await unless_disconnected(request, start_generation(ctx, prompt_ids, params, request_id, "ollama.chat"))
    model = body.model

    def shape(text: str, lps, done: bool, extra: dict | None, thinking: str = "") -> dict:
        line = {"model": model, "created_at": now_rfc3339(), "message": {"role": "assistant", "content": text}}
        if thinking:
            line["message"]["thinking"] = thinking
        line["done"] = done
        if lps is not None:
            line["logprobs"] = lps
        return {**line, **(extra or {})}

    def final(out: RequestOutput) -> dict:
        return shape("", None, True, final_stats(out, started, waited))

    if body.stream:
        lines = _ndjson(gen, shape, final, k, client.tokenizer, parser.stream() if parser else None, reasoning)
        return StreamingResponse(lines, media_type=NDJSON)
    out = await unless_disconnected(request, collect(gen))
    text, lps = _whole(out, k, client.tokenizer)
    thinking, text = reasoning.split(text) if reasoning is not None else ("", text)
    reply = final(out)
    if thinking:
        reply["message"]["thinking"] = thinking
    if parser is not None:
        text, calls = parser.parse(text)
        if calls:
            reply["message"]["tool_calls"] = ollama_calls(calls)
    reply["message"]["content"] = text
    if lps is not None:
        reply["logprobs"] = lps
    return JSONResponse(reply)


# -- the model store ----------------------------------------------------------------------------------------------
def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.isoformat().replace("+00:00", "Z")
    return str(value) if value else now_rfc3339()


def tag_entry(entry: Any, name: str | None = None) -> dict:
    """A store entry (turbofan.store.StoreEntry) in the shape of one `/api/tags` model."""
    name = name or entry.name
    family = entry.family or entry.model_type or ""
    return {
        "name": name,
        "model": name,
        "modified_at": _iso(entry.modified_at),
        "size": int(entry.size or 0),
        "digest": entry.digest or "",
        "details": {
            "parent_model": "",
            "format": entry.format or "safetensors",
            "family": family,
            "families": [family] if family else None,
            "parameter_size": entry.parameter_size or "",
            "quantization_level": entry.quantization or "",
        },
    }


async def _store_call(fn, *args, **kwargs):
    from turbofan.store.errors import ModelNotFoundError, StoreError

    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except ModelNotFoundError as exc:
        raise APIError(404, str(exc)) from None
    except StoreError as exc:
        raise APIError(400, str(exc)) from None


async def _installed_info(ctx: ServerContext, name: str):
    """The store's description of an installed model named by a request: names only, never a path (the same 404
    for every kind of absent, as on the inference routes)."""
    from turbofan.store.errors import StoreError
    from turbofan.store.names import is_name

    if not is_name(name.strip()):
        raise model_not_found(name)
    try:
        return await asyncio.to_thread(ctx.store.show, name.strip(), allow_paths=False)
    except StoreError:
        raise model_not_found(name) from None


async def served_info(ctx: ServerContext):
    """The store's description (turbofan.store.ModelInfo) of the model being served, computed once."""
    cached = ctx._served_info
    if cached is None:
        cached = await _store_call(ctx.store.show, ctx.client.info.path)
        ctx._served_info = cached
    return cached


@router.get("/api/tags")
async def tags(request: Request) -> dict:
    """The served model first (UIs pick models from this list), then everything else in the store."""
    ctx = ctx_of(request)
    models = []
    if ctx.client is not None:
        models.append(tag_entry((await served_info(ctx)).entry, ctx.model_name))
    seen = {m["name"] for m in models}
    models += [e for e in map(tag_entry, await _store_call(ctx.store.list)) if e["name"] not in seen]
    return {"models": models}


def memory_breakdown(info, runtime: int) -> dict:
    """Resident bytes by part: weights by format (q4, q8, float32 ...), the KV cache, and the runtime estimate
    (activations, logits, allocator slack; model/footprint.py)."""
    return {"weights": dict(info.weights_by_format) or {"total": info.weights_bytes},
            "kv_cache": info.kv_cache_bytes, "runtime": runtime}


@router.get("/api/ps")
async def ps(request: Request) -> dict:
    """Every loaded model: its measured size, when its keep_alive runs out, and its context length."""
    ctx = ctx_of(request)
    models = []
    for m in ctx.manager.resident():
        if m.status != "ready":
            continue
        primary = ctx.manager.primary.key == m.name
        try:
            info = await served_info(ctx) if primary else await _store_call(ctx.store.show, m.path)
            entry = tag_entry(info.entry, ctx.model_name if primary else m.name)
        except APIError:  # a model served from a directory the store does not know
            entry = {"name": m.name, "model": m.name, "digest": "", "details": {}}
        entry.pop("modified_at", None)
        slot = ctx.manager.find(m.name)
        on_gpu = slot is not None and slot.client is not None and slot.client.info.device.startswith("cuda")
        entry.update(
            size=m.size_bytes,
            size_vram=m.size_bytes if on_gpu else 0,
            expires_at=NEVER if m.expires_at is None else _iso(datetime.fromtimestamp(m.expires_at, timezone.utc)),
            context_length=m.context_length,
        )
        if slot is not None and slot.client is not None:  # turbofan's own field: what `size` is made of
            entry["memory"] = memory_breakdown(slot.client.info, slot.footprint.runtime)
        models.append(entry)
    return {"models": models}


@router.post("/api/show")
async def show(body: NameRequest, request: Request) -> dict:
    ctx = ctx_of(request)
    name = body.target
    serving = ctx.accepts(name) and ctx.client is not None
    info = await served_info(ctx) if serving else await _installed_info(ctx, name)
    entry = info.entry
    family = entry.family or entry.model_type or "unknown"
    template = info.chat_template or ""
    context = entry.context_length
    if serving:
        client = ctx.client
        template = ctx.settings.chat_template or client.tokenizer.hf.chat_template or template
        context = client.info.max_model_len
    config = info.config or {}
    model_info = {
        "general.architecture": family,
        "general.parameter_count": entry.parameters,
        f"{family}.context_length": context,
        f"{family}.embedding_length": config.get("hidden_size"),
        f"{family}.block_count": config.get("num_hidden_layers"),
        f"{family}.attention.head_count": config.get("num_attention_heads"),
        f"{family}.attention.head_count_kv": config.get("num_key_value_heads"),
        f"{family}.vocab_size": config.get("vocab_size"),
    }
    generation = info.generation_config or {}
    params = {**DEFAULTS, **{k: generation[k] for k in ("temperature", "top_k", "top_p") if k in generation}}
    memory = {}
    if serving:
        slot = ctx.manager.find(ctx.manager.primary.key)
        memory = {"memory": memory_breakdown(ctx.client.info, slot.footprint.runtime if slot else 0)}
    return {
        **memory,
        "license": info.license or "",
        "modelfile": f"# Modelfile generated by turbofan\nFROM {entry.source}\n",
        "parameters": "\n".join(f"{k:<16}{v}" for k, v in params.items()),
        "template": template,
        "details": tag_entry(entry)["details"],
        "model_info": {k: v for k, v in model_info.items() if v is not None},
        "capabilities": ["embedding"] if is_encoder(entry.path) else
        ["completion", "tools"] if template_supports_tools(template) else ["completion"],
        "modified_at": _iso(entry.modified_at),
    }


@router.post("/api/pull")
async def pull(body: NameRequest, request: Request):
    """Ollama's pull: NDJSON progress events ({"status", "completed", "total"}) straight from the store."""
    ctx = ctx_of(request)
    if not ctx.settings.allow_http_pull:
        raise APIError(403, "pulling models over HTTP is turned off on this server (--no-allow-http-pull): "
                            "run `turbofan pull NAME` where the server runs", code="pull_not_allowed")  # fmt: skip
    name = body.model_name
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[dict] = asyncio.Queue()

    def report(event: dict) -> None:  # called on the store's worker thread
        loop.call_soon_threadsafe(events.put_nowait, event)

    progress = report if body.stream else False
    task = asyncio.create_task(_store_call(ctx.store.pull, name, progress=progress, allow_paths=False))
    if not body.stream:
        resolved = await task
        return {"status": "success", "digest": getattr(resolved, "digest", "")}

    async def lines() -> AsyncIterator[str]:
        yield _line({"status": "pulling manifest"})
        try:
            while not (task.done() and events.empty()):
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, task}, timeout=5.0, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield _line(getter.result())
                else:
                    getter.cancel()
            resolved = task.result()
        except APIError as exc:
            yield _line({"error": redact(exc.message)})
            return
        except Exception as exc:  # noqa: BLE001 — reported on the stream
            yield _line({"error": redact(f"pull failed: {exc}")})
            return
        finally:
            if not task.done():
                task.cancel()
        digest = getattr(resolved, "digest", "")
        yield _line({"status": "verifying sha256 digest", "digest": digest})
        yield _line({"status": "writing manifest"})
        yield _line({"status": "success"})

    return StreamingResponse(lines(), media_type=NDJSON)


@router.delete("/api/delete")
async def delete(body: NameRequest, request: Request):
    ctx = ctx_of(request)
    await _store_call(ctx.store.remove, body.model_name)
    return Response(status_code=200)


@router.get("/api/version")
async def version() -> dict:
    return {"version": turbofan.__version__}
