"""OpenAI-compatible routes (as vLLM serves them): models, chat and text completions, tokenize, version.

Streaming is Server-Sent Events ending in `data: [DONE]`. The engine hands over deltas (each new token and text
piece once), so a chunk is a delta formatted; non-streaming answers read the generation's folded output.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

import turbofan
from turbofan.engine import CompletionDelta, CompletionOutput, Logprob, RequestOutput, SamplingParams
from turbofan.server import limits
from turbofan.server.errors import APIError, bad_request, model_not_found, openai_error_body
from turbofan.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    SamplingFields,
    TokenizeRequest,
    random_id,
)
from turbofan.server.reasoning import ReasoningParser, end_token_for, split_delta
from turbofan.server.serving import (
    Generation,
    ServerContext,
    collect,
    make_params,
    merge,
    start_all,
    start_generation,
    unless_disconnected,
)
from turbofan.server.structured import openai_structured
from turbofan.server.tools import (
    ToolParser,
    ToolRequest,
    chat_template_source,
    openai_calls,
    openai_deltas,
    prepare_messages,
    template_supports_tools,
    tool_constraint,
)

router = APIRouter()
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def ctx_of(request: Request) -> ServerContext:
    return request.app.state.ctx


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def finite(x: float) -> float:
    """JSON has no -inf: vLLM reports impossible tokens as -9999."""
    return max(x, -9999.0) if not math.isnan(x) else -9999.0


# -- request → SamplingParams -------------------------------------------------------------------------------------
def logit_bias(bias: dict[str, float], vocab_size: int) -> dict[int, float]:
    """OpenAI's logit_bias (token id strings -> bias) checked against the vocabulary; the engine applies it to
    the whole batch in one op (SamplingParams.logit_bias), clamped to [-100, 100]."""
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
        if not 0 <= token < vocab_size:
            raise bad_request(f"logit_bias token id {token} is outside the vocabulary [0, {vocab_size})", "logit_bias")
        out[token] = float(value)
    return out


def check_vocab(body: SamplingFields, client) -> None:
    """stop_token_ids inside the model's vocabulary, checked as soon as the model is known: an id past it would
    fail inside the engine step, ending every request of that step."""
    vocab = min(client.tokenizer.vocab_size, client.info.vocab_size or client.tokenizer.vocab_size)
    error = limits.vocab_error(body.stop_token_ids, vocab)
    if error is not None:
        raise bad_request(error, "stop_token_ids")


def sampling_params(
    body: SamplingFields, client, *, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None,
    structured=None, reasoning_end_token_id: int | None = None,
) -> SamplingParams:  # fmt: skip
    if body.best_of is not None and body.best_of != body.n and not body.use_beam_search:
        raise bad_request(
            f"best_of other than n needs use_beam_search (n={body.n}, best_of={body.best_of})", "best_of"
        )
    if body.n > 128:
        raise bad_request(f"n must be at most 128, got {body.n}", "n")
    bias = logit_bias(body.logit_bias, client.tokenizer.vocab_size) if body.logit_bias else None
    kwargs: dict[str, Any] = dict(
        n=body.n,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=-1 if body.top_k is None else body.top_k,
        min_p=body.min_p or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        seed=body.seed,
        stop=body.stop,
        stop_token_ids=body.stop_token_ids,
        include_stop_str_in_output=body.include_stop_str_in_output,
        ignore_eos=body.ignore_eos,
        max_tokens=max_tokens,
        min_tokens=body.min_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=body.skip_special_tokens,
        length_penalty=body.length_penalty,
        use_beam_search=body.use_beam_search,
        best_of=body.best_of,
        logit_bias=bias,
        structured=structured if structured is not None else openai_structured(body),
        reasoning_end_token_id=reasoning_end_token_id,
    )
    if body.repeat_last_n is not None:
        kwargs["repeat_last_n"] = body.repeat_last_n
    return make_params(**kwargs)


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached} if cached else None,
    }


# -- logprobs in OpenAI's two shapes ------------------------------------------------------------------------------
def _token_text(token: int, lp: Logprob, tokenizer) -> str:
    return lp.decoded_token if lp.decoded_token is not None else tokenizer.decode_token(token)


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], k: int, tokenizer) -> list[dict]:
    """Chat shape: per token {token, logprob, bytes, top_logprobs: the k most likely}."""
    content = []
    for token, entry in zip(token_ids, entries):
        chosen = entry.get(token)
        text = _token_text(token, chosen, tokenizer) if chosen else tokenizer.decode_token(token)
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
        top = []
        for tid, lp in ranked:
            if len(top) >= k:
                break
            if lp.rank is not None and lp.rank > k:
                continue
            t = _token_text(tid, lp, tokenizer)
            top.append({"token": t, "logprob": finite(lp.logprob), "bytes": list(t.encode("utf-8"))})
        content.append(
            {
                "token": text,
                "logprob": finite(chosen.logprob) if chosen else -9999.0,
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": top,
            }
        )
    return content


def completion_logprobs(
    token_ids: list[int], entries: list[dict[int, Logprob] | None], tokenizer, offset: int
) -> dict:
    """Completions shape: parallel lists; each top_logprobs dict holds the top-k plus the sampled token."""
    out: dict[str, list] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for token, entry in zip(token_ids, entries):
        chosen = entry.get(token) if entry else None
        text = _token_text(token, chosen, tokenizer) if chosen else tokenizer.decode_token(token)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(finite(chosen.logprob) if chosen else None)
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
        out["top_logprobs"].append({_token_text(t, lp, tokenizer): finite(lp.logprob) for t, lp in ranked})
    return out


# -- routes -------------------------------------------------------------------------------------------------------
@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    """The served model under its served names, then every other local model (Ollama's OpenAI compatibility)."""
    return ModelList(data=await model_cards(ctx_of(request)))


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> ModelCard:
    """A card from what the server already knows (its models and the store's list): a GET never loads, pulls or
    reads a path; anything else is the same 404 as on every route."""
    ctx = ctx_of(request)
    spellings = ctx.manager.spellings(model_id)
    for card in await model_cards(ctx):
        if card.id in spellings or (ctx.accepts(model_id) and card.id == ctx.model_name):
            return card.model_copy(update={"id": model_id})
    slot = ctx.manager.find(model_id)  # an alias a request already loaded a model under
    if slot is not None and slot.client is not None:
        return ModelCard(id=model_id, root=slot.key, max_model_len=slot.client.info.max_model_len)
    raise model_not_found(model_id)


async def model_cards(ctx: ServerContext) -> list[ModelCard]:
    info = (await ctx.require_model(None, need=None)).info if ctx.manager.find(None) is not None else None
    cards = [ModelCard(id=n, root=info.root if info else n, max_model_len=info.max_model_len if info else None)
             for n in ctx.served_names]  # fmt: skip
    seen = set(ctx.served_names) | ({info.name, info.root} if info else set())
    with contextlib.suppress(Exception):  # a store that cannot be read lists nothing more
        for entry in await asyncio.to_thread(ctx.store.list):
            if entry.name not in seen:
                cards.append(ModelCard(id=entry.name, root=entry.source, max_model_len=entry.context_length))
    return cards


@router.get("/version")
@router.get("/v1/version")
async def version() -> dict:
    return {"version": turbofan.__version__}


def _message_dicts(messages: list[ChatMessage]) -> list[dict]:
    out = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type not in ("text", "input_text"):
                    raise bad_request(f"content parts of type {part.type!r} are not supported (text only)", "messages")
                texts.append(part.text or "")
            content = "\n".join(texts)
        d: dict[str, Any] = {"role": m.role, "content": content or ""}
        extra = m.model_extra or {}
        for key in ("tool_calls", "tool_call_id"):
            if key in extra:
                d[key] = extra[key]
        if m.name:
            d["name"] = m.name
        out.append(d)
    return out


def render_chat(client, messages: list[dict], template: str | None, **kwargs) -> str:
    try:
        return client.tokenizer.apply_chat_template(messages, chat_template=template, **kwargs)
    except ValueError as exc:
        raise bad_request(str(exc), "messages") from None
    except Exception as exc:  # jinja errors: the template rejected these messages
        raise bad_request(f"the chat template could not render these messages: {exc}", "messages") from None


def check_request_template(body: ChatCompletionRequest, trusted: bool) -> None:
    """A request's own Jinja template is code the server runs: refused unless the server trusts its clients
    (--trust-request-chat-template, vLLM's flag), because the sandbox bounds what a template reaches, not how long
    it runs. `chat_template_kwargs` may not smuggle one in either."""
    if "chat_template" in (body.chat_template_kwargs or {}):
        raise bad_request("chat_template_kwargs may not hold a chat_template", "chat_template_kwargs")
    if body.chat_template is not None and not trusted:
        raise bad_request(
            "this server does not render a request's own chat_template (start it with --trust-request-chat-template "
            "to allow that, or --chat-template to set one for every request)",
            "chat_template",
        )


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    ctx = ctx_of(request)
    check_request_template(body, ctx.settings.trust_request_chat_template)
    client = await ctx.require_model(body.model)
    check_vocab(body, client)
    if not body.messages:
        raise bad_request("messages must contain at least one message", "messages")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
        raise bad_request(f"top_logprobs must be between 0 and 20, got {body.top_logprobs}", "top_logprobs")
    extra = body.model_extra or {}
    tools = ToolRequest.parse(extra.get("tools"), extra.get("tool_choice"))
    template = chat_template_source(client.tokenizer, body.chat_template or ctx.settings.chat_template)
    native = template_supports_tools(template)
    messages, template_kwargs = prepare_messages(_message_dicts(body.messages), tools, native)
    template_kwargs.update(body.chat_template_kwargs or {})
    if body.continue_final_message:
        template_kwargs["continue_final_message"] = True

    def tokenize_messages() -> list[int]:  # off the event loop: a long prompt must not stall other requests
        prompt = render_chat(
            client,
            messages,
            body.chat_template or ctx.settings.chat_template,
            add_generation_prompt=body.add_generation_prompt and not body.continue_final_message,
            **template_kwargs,
        )
        return client.tokenizer.encode(prompt, add_special_tokens=body.add_special_tokens)

    prompt_ids = await asyncio.to_thread(tokenize_messages)
    k = (body.top_logprobs or 0) if body.logprobs else None
    parser = ctx.tool_parser(client.tokenizer, template, native) if tools is not None else None
    # a reasoning model thinks unless the request turns it off (vLLM's chat_template_kwargs.enable_thinking)
    reasoning = ctx.reasoning_parser if template_kwargs.get("enable_thinking", True) is not False else None
    # required or named: a grammar makes the model call; auto with a strict tool: a started call follows the schema
    forced = tool_constraint(tools, parser, openai_structured(body) is not None) if parser is not None else None
    params = sampling_params(
        body,
        client,
        max_tokens=body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens,
        logprobs=k,
        prompt_logprobs=body.prompt_logprobs,
        structured=forced,
        reasoning_end_token_id=end_token_for(reasoning, True, client.tokenizer),
    )
    echo = messages[-1]["content"] if body.echo and messages[-1]["role"] == "assistant" else ""
    request_id = random_id("chatcmpl")
    gen = await unless_disconnected(request, start_generation(ctx, prompt_ids, params, request_id, "openai.chat"))
    name = body.model or ctx.model_name
    if body.stream:
        stream = chat_stream(gen, name, request_id, body, client.tokenizer, echo, parser, reasoning)
        return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)
    final = await unless_disconnected(request, collect(gen))
    return JSONResponse(chat_response(final, name, request_id, k, client.tokenizer, echo, parser, reasoning))


def chat_response(
    final: RequestOutput, model: str, request_id: str, k: int | None, tokenizer, echo: str,
    parser: ToolParser | None = None, reasoning: ReasoningParser | None = None,
) -> dict:  # fmt: skip
    choices = []
    for c in final.outputs:
        logprobs = None
        if k is not None and c.logprobs is not None:
            logprobs = {"content": chat_logprobs(c.token_ids, c.logprobs, k, tokenizer), "refusal": None}
        thought, text = reasoning.split(c.text) if reasoning is not None else ("", c.text)
        message = {"role": "assistant", "content": echo + text, "refusal": None, "tool_calls": []}
        if reasoning is not None:
            message["reasoning_content"] = thought or None
        finish = c.finish_reason
        if parser is not None:
            content, calls = parser.parse(text)
            if calls:
                message.update(content=(echo + content) if content.strip() else None, tool_calls=openai_calls(calls))
                finish = "tool_calls" if finish == "stop" else finish
        choices.append(
            {
                "index": c.index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": finish,
                "stop_reason": c.stop_reason,
            }
        )
    completion = sum(len(c.token_ids) for c in final.outputs)
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(final.metrics.arrival_time),
        "model": model,
        "choices": choices,
        "usage": usage(len(final.prompt_token_ids), completion, final.num_cached_tokens),
        "system_fingerprint": None,
        "prompt_logprobs": _prompt_logprobs_json(final.prompt_logprobs),
    }


def _prompt_logprobs_json(prompt_logprobs) -> list | None:
    if prompt_logprobs is None:
        return None
    return [
        None
        if entry is None
        else {
            str(t): {"logprob": finite(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
            for t, lp in entry.items()
        }
        for entry in prompt_logprobs
    ]


async def chat_stream(
    gen: Generation, model: str, request_id: str, body: ChatCompletionRequest, tokenizer, echo: str,
    parser: ToolParser | None = None, reasoning: ReasoningParser | None = None,
) -> AsyncIterator[str]:  # fmt: skip
    created = int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    continuous = include_usage and bool(body.stream_options and body.stream_options.continuous_usage_stats)
    k = (body.top_logprobs or 0) if body.logprobs else None
    head = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model}

    def chunk(choices: list[dict], usage_: dict | None = None) -> str:
        payload = {**head, "choices": choices}
        if include_usage:
            payload["usage"] = usage_
        return sse(payload)

    parsers: dict = {}  # choice index -> its ToolStream
    thoughts: dict = {}  # choice index -> its ReasoningStream
    try:
        for i in range(body.n):
            role = {"index": i, "delta": {"role": "assistant", "content": echo}, "logprobs": None, "finish_reason": None}
            yield chunk([role])
        async for delta in gen:
            prompt_tokens = len(delta.prompt_token_ids)
            outputs = delta.outputs
            if reasoning is not None:  # the thinking goes out as reasoning_content deltas, the rest as before
                outputs = []
                for c in delta.outputs:
                    thought, c = split_delta(thoughts, reasoning, c)
                    if thought:
                        yield chunk([{"index": c.index, "delta": {"reasoning_content": thought}, "logprobs": None,
                                      "finish_reason": None}])  # fmt: skip
                    outputs.append(c)
            if parser is not None:  # one chunk per content piece, call head or argument fragment
                for choice in _tool_choices(outputs, parsers, parser, k, tokenizer):
                    yield chunk([choice], usage(prompt_tokens, gen.num_tokens) if continuous else None)
            elif choices := [choice for c in outputs if (choice := _chat_choice(c, k, tokenizer)) is not None]:
                yield chunk(choices, usage(prompt_tokens, gen.num_tokens) if continuous else None)
            if delta.finished and include_usage:
                yield chunk([], usage(prompt_tokens, gen.num_tokens, delta.num_cached_tokens))
    except APIError as exc:
        yield sse(openai_error_body(exc.status, exc.message, exc.param, exc.code))
    yield "data: [DONE]\n\n"


def _tool_choices(outputs: list[CompletionDelta], streams: dict, parser: ToolParser, k: int | None, tokenizer):
    """Stream choices for a request with tools: text is parsed as it comes, calls go out as tool_calls deltas."""
    for c in outputs:
        stream = streams.setdefault(c.index, parser.stream())
        events = stream.feed(c.text) + (stream.finish() if c.finished else [])
        parts = openai_deltas(events, stream.calls)
        logprobs = None
        if k is not None and c.logprobs:
            logprobs = {"content": chat_logprobs(c.token_ids, c.logprobs, k, tokenizer), "refusal": None}
        if logprobs is not None and not parts:
            parts = [{}]
        for i, part in enumerate(parts):
            yield {"index": c.index, "delta": part, "logprobs": logprobs if i == 0 else None, "finish_reason": None}
        if c.finished:
            finish = "tool_calls" if stream.calls and c.finish_reason == "stop" else c.finish_reason
            yield {"index": c.index, "delta": {}, "logprobs": None, "finish_reason": finish,
                   "stop_reason": c.stop_reason}  # fmt: skip


def _chat_choice(c: CompletionDelta, k: int | None, tokenizer) -> dict | None:
    logprobs = None
    if k is not None and c.logprobs:
        logprobs = {"content": chat_logprobs(c.token_ids, c.logprobs, k, tokenizer), "refusal": None}
    if not c.text and logprobs is None and not c.finished:
        return None
    return {
        "index": c.index,
        "delta": {"content": c.text} if c.text or not c.finished else {},
        "logprobs": logprobs,
        "finish_reason": c.finish_reason,
        "stop_reason": c.stop_reason,
    }


# -- completions --------------------------------------------------------------------------------------------------
def completion_prompts(body: CompletionRequest, tokenizer) -> tuple[list[list[int]], list[str | None]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        texts: list[str | None] = [prompt]
    elif not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    elif all(isinstance(p, int) for p in prompt):
        return [list(prompt)], [None]
    elif all(isinstance(p, str) for p in prompt):
        texts = list(prompt)
    else:
        for p in prompt:
            if not p:
                raise bad_request("prompt must not contain an empty token list", "prompt")
        return [list(p) for p in prompt], [None] * len(prompt)
    return [tokenizer.encode(t, add_special_tokens=body.add_special_tokens) for t in texts], texts


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    ctx = ctx_of(request)
    client = await ctx.require_model(body.model)
    check_vocab(body, client)
    if body.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if body.logprobs is not None and not 0 <= body.logprobs <= 20:
        raise bad_request(f"logprobs must be between 0 and 20, got {body.logprobs}", "logprobs")
    prompts, texts = await asyncio.to_thread(completion_prompts, body, client.tokenizer)
    echo_only = body.echo and body.max_tokens == 0  # lm-eval's loglikelihood: prompt logprobs, no generation
    max_tokens = 1 if echo_only else body.max_tokens
    want_prompt_lp = body.logprobs if body.echo and body.logprobs is not None else body.prompt_logprobs
    params = sampling_params(
        body, client, max_tokens=max_tokens, logprobs=body.logprobs, prompt_logprobs=want_prompt_lp
    )

    def make(i: int) -> SamplingParams:  # the engine fills in max_tokens per prompt, so each gets its own copy
        return params if i == 0 else dataclasses.replace(params)

    request_id = random_id("cmpl")
    gens = await unless_disconnected(request, start_all(ctx, prompts, make, request_id, "openai.completions"))
    name = body.model or ctx.model_name
    shaper = CompletionShaper(body, client.tokenizer, prompts, texts, echo_only)
    if body.stream:
        stream = completion_stream(gens, name, request_id, body, shaper)
        return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)

    async def gather_all() -> list[RequestOutput]:
        return list(await asyncio.gather(*(collect(g) for g in gens)))

    finals = await unless_disconnected(request, gather_all())
    choices, prompt_tokens, completion_tokens, cached = [], 0, 0, 0
    for p, final in enumerate(finals):
        prompt_tokens += len(final.prompt_token_ids)
        cached += final.num_cached_tokens
        for c in final.outputs:
            choices.append(shaper.full_choice(p, c, final))
            completion_tokens += 0 if echo_only else len(c.token_ids)
    return JSONResponse(
        {
            "id": request_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": name,
            "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens, cached),
            "system_fingerprint": None,
        }
    )


class CompletionShaper:
    """Builds completion choices (text, echo, logprobs) for whole responses and for stream deltas."""

    def __init__(self, body: CompletionRequest, tokenizer, prompts, texts, echo_only: bool):
        self.body = body
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.texts = [t if t is not None else tokenizer.decode(ids, skip_special_tokens=False) for ids, t in
                      zip(prompts, texts)]  # fmt: skip
        self.echo_only = echo_only

    def _prompt_part(self, p: int, prompt_logprobs) -> tuple[str, dict | None]:
        text = self.texts[p]
        if self.body.logprobs is None:
            return text, None
        entries = prompt_logprobs or [None] * len(self.prompts[p])
        return text, completion_logprobs(self.prompts[p], entries, self.tokenizer, 0)

    def full_choice(self, p: int, c: CompletionOutput, final: RequestOutput) -> dict:
        text, logprobs = "", None
        if self.body.echo:
            text, logprobs = self._prompt_part(p, final.prompt_logprobs)
        offset = len(text)
        if not self.echo_only:
            text += c.text
            if self.body.logprobs is not None and c.logprobs is not None:
                gen_lp = completion_logprobs(c.token_ids, c.logprobs, self.tokenizer, offset)
                logprobs = gen_lp if logprobs is None else {k: logprobs[k] + gen_lp[k] for k in logprobs}
        return {
            "index": p * self.body.n + c.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
            "prompt_logprobs": _prompt_logprobs_json(final.prompt_logprobs) if self.body.prompt_logprobs else None,
        }


async def completion_stream(
    gens: list[Generation], model: str, request_id: str, body: CompletionRequest, shaper: CompletionShaper
) -> AsyncIterator[str]:
    created = int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    head = {"id": request_id, "object": "text_completion", "created": created, "model": model}
    n = body.n
    offsets = [0] * (len(gens) * n)  # characters sent per choice: logprobs' text_offset continues from there
    echoed = [False] * (len(gens) * n)

    def chunk(choices: list[dict], usage_: dict | None = None) -> str:
        payload = {**head, "choices": choices}
        if include_usage:
            payload["usage"] = usage_
        return sse(payload)

    try:
        async for p, delta in merge(gens):
            choices = []
            for c in delta.outputs:
                i = p * n + c.index
                text, logprobs = "", None
                if body.echo and not echoed[i]:
                    echoed[i] = True
                    text, logprobs = shaper._prompt_part(p, delta.prompt_logprobs)
                    offsets[i] = len(text)
                if not shaper.echo_only:
                    if body.logprobs is not None and c.logprobs:
                        lp = completion_logprobs(c.token_ids, c.logprobs, shaper.tokenizer, offsets[i])
                        logprobs = lp if logprobs is None else {k: logprobs[k] + lp[k] for k in logprobs}
                    offsets[i] += len(c.text)
                    text += c.text
                if not text and logprobs is None and not c.finished:
                    continue
                choices.append(
                    {
                        "index": i,
                        "text": text,
                        "logprobs": logprobs,
                        "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason,
                    }
                )
            if choices:
                yield chunk(choices)
        if include_usage:
            prompt_tokens = sum(len(g.builder.last.prompt_token_ids) for g in gens if g.builder.last is not None)
            completion_tokens = 0 if shaper.echo_only else sum(g.num_tokens for g in gens)
            yield chunk([], usage(prompt_tokens, completion_tokens))
    except APIError as exc:
        yield sse(openai_error_body(exc.status, exc.message, exc.param, exc.code))
    yield "data: [DONE]\n\n"


# -- tokenizer endpoints ------------------------------------------------------------------------------------------
@router.post("/tokenize")
@router.post("/v1/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    ctx = ctx_of(request)
    client = await ctx.require_model(body.model, need=None)
    tokenizer = client.tokenizer
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give exactly one of prompt or messages", "prompt")

    def encode() -> list[int]:
        if body.messages is not None:
            text = render_chat(
                client,
                _message_dicts(body.messages),
                ctx.settings.chat_template,
                add_generation_prompt=body.add_generation_prompt,
            )
            return tokenizer.encode(text, add_special_tokens=False)
        return tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)

    tokens = await asyncio.to_thread(encode)
    strs = [tokenizer.decode_token(t) for t in tokens] if body.return_token_strs else None
    return {"count": len(tokens), "max_model_len": client.info.max_model_len, "tokens": tokens, "token_strs": strs}


@router.post("/detokenize")
@router.post("/v1/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    ctx = ctx_of(request)
    tokenizer = (await ctx.require_model(body.model, need=None)).tokenizer
    vocab = tokenizer.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", "tokens")
    return {"prompt": tokenizer.decode(body.tokens, skip_special_tokens=False)}
