"""What each API calls structured output, as one engine StructuredOutput (a grammar the sampler enforces).

- OpenAI: `response_format` {"type": "text" | "json_object" | "json_schema", "json_schema": {"schema", "strict"}}.
  A json_schema is enforced whether or not `strict` is set (vLLM does the same: the grammar costs nothing extra).
- vLLM: `structured_outputs` {"json" | "regex" | "choice" | "grammar": ...} in the body (`extra_body` for the
  OpenAI SDK), and its older spellings `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.
- Ollama: `format` "json" (any JSON object) or a JSON schema object.
Only one constraint per request: asking for two is a 400, as is a malformed one. Whether a schema or grammar is
valid is decided by the engine when it compiles it (also a 400, with the library's message).
"""

from __future__ import annotations

import json
from typing import Any

from turbofan.engine.constraints import StructuredOutput
from turbofan.server.errors import bad_request

VLLM_KEYS = ("json", "regex", "choice", "grammar")


def _make(kind: str, value: Any, param: str) -> StructuredOutput:
    try:
        if kind == "json":
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError as exc:
                    raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
            if not isinstance(value, dict):
                raise ValueError("the JSON schema must be an object")
            return StructuredOutput.json_schema(value)
        if kind == "choice":
            return StructuredOutput.choice(value if isinstance(value, list) else [])
        if not isinstance(value, str):
            raise ValueError(f"{kind} must be a string")
        return StructuredOutput(kind, value)
    except ValueError as exc:
        raise bad_request(str(exc), param) from None


def _response_format(fmt: Any) -> StructuredOutput | None:
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or "type" not in fmt:
        raise bad_request("response_format must be an object with a type", "response_format")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput.json_schema(None)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request("response_format json_schema needs a json_schema object", "response_format")
        schema = spec.get("schema", spec.get("json_schema"))
        if schema is None:
            return StructuredOutput.json_schema(None)
        return _make("json", schema, "response_format")
    raise bad_request(
        f"response_format type must be text, json_object or json_schema, got {kind!r}", "response_format"
    )


def openai_structured(body: Any) -> StructuredOutput | None:
    """The one constraint an OpenAI-style request asks for (None: free text)."""
    extra = body.model_extra or {}
    found: list[StructuredOutput] = []
    if (fmt := _response_format(extra.get("response_format"))) is not None:
        found.append(fmt)
    so = extra.get("structured_outputs") or extra.get("guided_decoding")
    if so is not None:
        if not isinstance(so, dict):
            raise bad_request("structured_outputs must be an object", "structured_outputs")
        keys = [k for k in VLLM_KEYS if so.get(k) is not None]
        if so.get("json_object"):
            found.append(StructuredOutput.json_schema(None))
        found += [_make(k, so[k], "structured_outputs") for k in keys]
    found += [_make(k, extra[f"guided_{k}"], f"guided_{k}") for k in VLLM_KEYS if extra.get(f"guided_{k}") is not None]
    if len(found) > 1:
        raise bad_request("ask for one kind of structured output at a time", "structured_outputs")
    return found[0] if found else None


def ollama_structured(fmt: Any) -> StructuredOutput | None:
    """Ollama's `format`: "json" or a JSON schema (or a StructuredOutput the server built, for tools)."""
    if fmt in (None, "") or isinstance(fmt, StructuredOutput):
        return fmt or None
    if fmt == "json":
        return StructuredOutput.json_schema(None)
    if isinstance(fmt, dict):
        return _make("json", fmt, "format")
    raise bad_request(f'format must be "json" or a JSON schema object, got {json.dumps(fmt)}')
