"""Tool calls through the real `openai` client against `turbofan serve` of a tiny random-weight model whose
tokenizer has `<tool_call>` / `</tool_call>` tokens and whose template renders tools (Qwen2.5's shape).

- `strict: true` under tool_choice "auto": a logit_bias on `<tool_call>` makes the random model start calls at
  temperature 1.0; every call it finishes must match the tool's schema. The same requests without `strict` are
  the control: the model then writes garbage after the tag, so no call validates (the check can fail).
- The parser follows the chat template (a Llama-3 template in the request gives llama3_json calls, seen in the
  raw tokens of logprobs); `--tool-call-parser` overrides it; an unknown name stops `turbofan serve` at startup.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest
from test_server import REPO, launch
from test_tool_parsers import ARGS  # the weather tool's arguments: one definition
from tiny_models import build_tiny_model

ASK = [{"role": "user", "content": "Weather in Paris?"}]
SEEDS = range(10)
LLAMA3 = (
    "{% if tools %}<|start_header_id|>system<|end_header_id|>\nTools: {% for t in tools %}{{ t.function.name }}{% endfor %}<|eot_id|>{% endif %}"
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n{% endif %}"
)


def _tool(strict: bool) -> dict:
    return {"type": "function", "function": {"name": "get_weather", "strict": strict, "parameters": ARGS}}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tools") / "qwen2-tools", "qwen2", tools=True)


@pytest.fixture(scope="module")
def server(model):
    srv = launch(model, model.parent / "server.log", "--max-model-len", "512", "--served-model-name", "m",
                 "--trust-request-chat-template")  # one test sends its own template (refused by default)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def bias(model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    return {str(tok.convert_tokens_to_ids("<tool_call>")): 6}


def _client(srv):
    from openai import OpenAI

    return OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)


def _finished_calls(choice) -> list:
    """The calls the model completed: an answer cut by max_tokens may end inside its last one."""
    calls = list(choice.message.tool_calls or [])
    return calls[:-1] if choice.finish_reason == "length" else calls


def _sample(srv, bias: dict, strict: bool, **kw):
    return _client(srv).chat.completions.create(model="m", messages=ASK, tools=[_tool(strict)], tool_choice="auto",
                                                temperature=1.0, max_tokens=160, logit_bias=bias, **kw)  # fmt: skip


def test_strict_tool_under_auto_makes_every_call_follow_the_schema(server, bias):
    valid = 0
    for seed in SEEDS:
        choice = _sample(server, bias, True, seed=seed).choices[0]
        for call in _finished_calls(choice):
            assert call.function.name == "get_weather"
            jsonschema.validate(json.loads(call.function.arguments), ARGS)
            valid += 1
        unparsed = (choice.message.content or "").count("<tool_call>")  # a tag only at a cut-off end
        assert unparsed <= (choice.finish_reason == "length"), f"a call was started but not enforced: {choice}"
    assert valid >= len(SEEDS), f"only {valid} finished calls over {len(SEEDS)} seeds: the bias did not start calls"


def test_without_strict_the_same_calls_are_garbage(server, bias):
    """The control: the bias starts calls just the same, and nothing makes them valid."""
    started = valid = 0
    for seed in SEEDS:
        choice = _sample(server, bias, False, seed=seed).choices[0]
        started += (choice.message.content or "").count("<tool_call>") + len(choice.message.tool_calls or [])
        for call in choice.message.tool_calls or []:
            try:
                jsonschema.validate(json.loads(call.function.arguments), ARGS)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
    assert started >= len(SEEDS) and valid == 0, (started, valid)


def test_strict_auto_streamed_equals_whole(server, bias):
    whole = _sample(server, bias, True, seed=3).choices[0]
    chunks = list(_sample(server, bias, True, seed=3, stream=True))
    calls: dict[int, dict] = {}
    for c in chunks:
        for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            entry = calls.setdefault(tc.index, {"name": None, "arguments": ""})
            if tc.function.name:
                assert entry["name"] is None, "the name comes once, in the call's first delta"
                entry["name"] = tc.function.name
            entry["arguments"] += tc.function.arguments or ""
    assert [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []] == [
        (calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)]  # fmt: skip
    assert whole.message.tool_calls


def _raw(response) -> str:
    return "".join(t.token for t in response.choices[0].logprobs.content)


def test_parser_follows_the_template_and_the_override(server, model, tmp_path):
    required = dict(model="m", messages=ASK, tools=[_tool(False)], tool_choice="required", temperature=1.0, seed=0,
                    max_tokens=200, logprobs=True)  # fmt: skip
    hermes = _client(server).chat.completions.create(**required)
    assert _raw(hermes).startswith('<tool_call>\n{"name": "get_weather", "arguments": {')
    llama = _client(server).chat.completions.create(**required, extra_body={"chat_template": LLAMA3})
    assert _raw(llama).startswith('{"name": "get_weather", "parameters": {')
    for r in (hermes, llama):
        (call,) = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), ARGS)
    srv = launch(model, tmp_path / "mistral.log", "--max-model-len", "512", "--served-model-name", "m",
                 "--tool-call-parser", "mistral")  # fmt: skip
    try:
        r = _client(srv).chat.completions.create(**required)
        assert _raw(r).startswith('[TOOL_CALLS][{"name": "get_weather", "arguments": {')
        (call,) = r.choices[0].message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), ARGS)
    finally:
        srv.stop()


def test_unknown_parser_is_refused_at_startup(model):
    done = subprocess.run([sys.executable, "-m", "turbofan.cli", "serve", str(model), "--tool-call-parser", "nope"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert "unknown tool-call parser 'nope'; known: hermes, llama3_json, mistral" in done.stderr


def test_strict_auto_with_a_response_format_is_a_400(server):
    import openai

    with pytest.raises(openai.BadRequestError, match="one constraint per request"):
        _client(server).chat.completions.create(model="m", messages=ASK, tools=[_tool(True)], max_tokens=5,
                                                response_format={"type": "json_object"})  # fmt: skip
