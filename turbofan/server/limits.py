"""The bounds every request model checks before any work (docs/api.md, "Limits"): one client's request must never
cost the server more than a fixed multiple of an ordinary one.

Each list a request carries is scanned per token (stop strings), turned into one engine request each (completion
prompts), embedded (inputs) or rendered into the prompt (tools), so each is bounded; values the engine indexes
with (stop token ids) or turns into a timestamp (keep_alive) are range-checked. The checks raise
PydanticCustomError, which the request models turn into a 400 in the calling API's format (server/errors.py).
"""

from __future__ import annotations

from typing import Any

from pydantic_core import PydanticCustomError

MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 1024  # per stop string, UTF-8
MAX_STOP_TOKEN_IDS = 64
MAX_PROMPTS = 2048  # a completions request's prompt list
MAX_EMBEDDING_INPUTS = 2048
MAX_EMBEDDING_TOKENS = 65536  # per request, all inputs together, as embedded (after truncation)
MAX_TOOLS = 128
MAX_TOOL_CALLS = 128  # per message
MAX_KEEP_ALIVE_SECONDS = 10 * 365.25 * 86400  # ten years, either sign


def _refuse(message: str) -> PydanticCustomError:
    return PydanticCustomError("limit", message)


def check_stop(stop: Any) -> Any:
    """At most MAX_STOP_STRINGS stop strings of at most MAX_STOP_BYTES each: each one is searched for in every
    new piece of text of every sequence."""
    if stop is None:
        return stop
    strings = [stop] if isinstance(stop, str) else stop
    if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
        raise _refuse("stop must be a string or a list of strings")
    if len(strings) > MAX_STOP_STRINGS:
        raise _refuse(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(strings)}")
    for s in strings:
        size = len(s.encode("utf-8", "surrogatepass"))
        if size > MAX_STOP_BYTES:
            raise _refuse(f"a stop string may be at most {MAX_STOP_BYTES} bytes, got one of {size}")
    return stop


def check_stop_token_ids(ids: list[int] | None) -> list[int] | None:
    """Non-negative and few; the upper bound (the vocabulary) is checked once the model is known
    (check_vocab_ids)."""
    if ids is None:
        return ids
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise _refuse(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed, got {len(ids)}")
    if any(i < 0 for i in ids):
        raise _refuse(f"stop_token_ids must be token ids (>= 0), got {min(ids)}")
    return ids


def vocab_error(ids: list[int] | None, vocab_size: int) -> str | None:
    """Why these token ids are not in [0, vocab_size), or None: an id past the vocabulary would fail inside the
    engine step, and with it every request of that step."""
    bad = [i for i in ids or [] if not 0 <= i < vocab_size]
    if not bad:
        return None
    return f"stop_token_ids {bad[:5]} are outside the vocabulary [0, {vocab_size})"


def check_count(items: Any, limit: int, what: str) -> Any:
    """A list of at most `limit` items (anything else passes through to the type checks)."""
    if isinstance(items, list) and len(items) > limit:
        raise _refuse(f"at most {limit} {what} are allowed in one request, got {len(items)}")
    return items


def check_prompt_count(prompt: Any) -> Any:
    """A completions prompt list (of strings or of token lists) holds at most MAX_PROMPTS prompts; a flat token
    list is one prompt (its length is bounded by the context)."""
    if isinstance(prompt, list) and prompt and not all(isinstance(p, int) for p in prompt):
        check_count(prompt, MAX_PROMPTS, "prompts")
    return prompt


def check_embedding_inputs(inputs: Any) -> Any:
    """At most MAX_EMBEDDING_INPUTS inputs (a flat token list is one input); token lists given as such are
    counted against MAX_EMBEDDING_TOKENS here already, before the model loads (texts once tokenized)."""
    if not isinstance(inputs, list) or not inputs:
        return inputs
    if all(isinstance(x, int) for x in inputs):
        tokens = len(inputs)
    else:
        check_count(inputs, MAX_EMBEDDING_INPUTS, "embedding inputs")
        tokens = sum(len(x) for x in inputs if isinstance(x, list))
    error = embedding_tokens_error(tokens)
    if error is not None:
        raise _refuse(error)
    return inputs


def embedding_tokens_error(tokens: int) -> str | None:
    """Why an embedding request of `tokens` tokens in all is refused, or None: the engine embeds a request in
    slices, but its vectors, its answer and the time it holds the model all grow with its tokens."""
    if tokens <= MAX_EMBEDDING_TOKENS:
        return None
    return (f"an embedding request may hold at most {MAX_EMBEDDING_TOKENS} tokens in all, got {tokens}: "
            "send the inputs in several requests")  # fmt: skip


def check_tool_calls(calls: Any) -> None:
    """An earlier assistant turn's calls: a list of objects whose `function` (where given) is an object with a
    string `name`; the templates and parsers index into them."""
    if calls is None:
        return
    if not isinstance(calls, list):
        raise _refuse("tool_calls must be a list of objects")
    check_count(calls, MAX_TOOL_CALLS, "tool_calls")
    for i, call in enumerate(calls):
        if not isinstance(call, dict):
            raise _refuse(f"tool_calls[{i}] must be an object, got {type(call).__name__}")
        function = call.get("function", call)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _refuse(f'tool_calls[{i}] must hold a "function" object with a string "name"')
        arguments = function.get("arguments")
        if arguments is not None and not isinstance(arguments, str | dict):
            raise _refuse(f"tool_calls[{i}].function.arguments must be an object or a JSON string")


def check_keep_alive(value: Any) -> Any:
    """Ollama's keep_alive, parsed now (a bad one is a 400 before the model loads) and within ten years either
    way: a larger one overflows the expiry timestamp /api/ps reports."""
    from turbofan.server.errors import APIError
    from turbofan.server.manager import parse_keep_alive

    try:
        parse_keep_alive(value)
    except APIError as exc:
        raise _refuse(exc.message) from None
    return value
