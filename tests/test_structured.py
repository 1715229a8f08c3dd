"""Structured output and tool calls, enforced by constrained decoding, through the real `openai` and `ollama`
clients against a `turbofan serve` of SmolLM2-135M-Instruct (from the model store, TURBOFAN_MODELS).

A 135M model does not follow a schema by itself: at temperature 1.0 it writes prose. Every assertion that the
output parses, matches an enum, stays inside integer bounds, or is a tool call with valid arguments therefore
tests the grammar mask in the sampler, not the model. The parsers are also checked without a server: a call fed
one character at a time assembles into the same call as the whole text.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Literal

import httpx
import pytest
from conftest import model_in_store
from pydantic import BaseModel, ConfigDict, Field
from test_server import launch

from turbofan.server.tools import HermesParser, openai_deltas

MODEL = "smollm2:135m"
STORE = os.environ.get("TURBOFAN_MODELS")


class Pet(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a closed object, as OpenAI's strict mode requires: no rambling keys

    species: Literal["cat", "dog", "parrot"]
    age: int = Field(ge=1, le=15)
    name: str = Field(max_length=12)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"offset_hours": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["offset_hours"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What's the weather like in Paris today?"}]


needs_model = pytest.mark.skipif(not model_in_store(MODEL), reason=f"{MODEL} is not in the model store (TURBOFAN_MODELS)")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    srv = launch(MODEL, tmp_path_factory.mktemp("structured") / "server.log", "--max-model-len", "2048",
                 "--served-model-name", MODEL, store=Path(STORE))  # fmt: skip
    yield srv
    srv.stop()


@pytest.fixture
def oai(smol):
    from openai import OpenAI

    return OpenAI(base_url=smol.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture
def ol(smol):
    import ollama

    return ollama.Client(host=smol.url)


# == parsers, no server ==========================================================================================
CALL_TEXT = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa}ris", "unit": "celsius"}}\n</tool_call>'


def test_hermes_stream_one_character_at_a_time_equals_whole_parse():
    parser = HermesParser()
    content, calls = parser.parse(CALL_TEXT + "\n" + CALL_TEXT.replace("Sure.\n", ""))
    assert content.strip() == "Sure."
    assert [c.name for c in calls] == ["get_weather", "get_weather"]
    assert json.loads(calls[0].arguments) == {"city": "Pa}ris", "unit": "celsius"}
    stream = parser.stream()
    events = [e for ch in CALL_TEXT for e in stream.feed(ch)] + stream.finish()
    deltas = openai_deltas(events, stream.calls)
    head = [d for d in deltas if "tool_calls" in d and "id" in d["tool_calls"][0]]
    assert len(head) == 1 and head[0]["tool_calls"][0]["function"]["name"] == "get_weather"
    args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas if "tool_calls" in d)
    assert json.loads(args) == {"city": "Pa}ris", "unit": "celsius"}
    assert sum("tool_calls" in d for d in deltas) > 10  # the arguments went out as they came
    assert "".join(d.get("content", "") for d in deltas).strip() == "Sure."


def test_hermes_text_without_calls_and_broken_calls_stay_content():
    parser = HermesParser()
    assert parser.parse("a < b and <tool") == ("a < b and <tool", [])
    broken = "<tool_call>not json</tool_call>"
    content, calls = parser.parse(broken)
    assert calls == [] and content == broken


def test_hermes_bare_call_without_tags_is_a_call_only_when_whole():
    """Qwen2.5-Coder-0.5B answers `auto` with the call object alone, no <tool_call> tags: held, then parsed."""
    parser = HermesParser()
    bare = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
    content, calls = parser.parse(bare)
    assert content == "" and [(c.name, json.loads(c.arguments)["city"]) for c in calls] == [("get_weather", "Paris")]
    stream = parser.stream()
    events = [e for ch in bare for e in stream.feed(ch)]
    assert events == []  # nothing goes out while it may still be a call
    assert [e.kind for e in stream.finish()] == ["call", "arguments"]
    assert parser.parse('{"city": "Paris"}') == ('{"city": "Paris"}', [])  # JSON, but not a call
    assert parser.parse('{"name": "x", "arguments": {}} and more')[1] == []


def test_engine_forks_reject_and_free_without_leaks(make_llm):
    """Offline, tiny random model: n > 1 forks each follow the grammar, a bad spec fails alone, no KV leak."""
    from turbofan import SamplingParams
    from turbofan.engine.constraints import StructuredOutput

    llm = make_llm("llama")
    regex = StructuredOutput("regex", r"(ab|cd){2,4}")
    outs = llm.generate(["hello"], SamplingParams(n=6, temperature=1.0, seed=1, max_tokens=12, structured=regex))
    texts = [c.text for c in outs[0].outputs]
    assert len(texts) == 6 and all(re.fullmatch(r"(ab|cd){2,4}", t) for t in texts), texts
    with pytest.raises(ValueError, match="invalid JSON schema"):
        llm.generate(["hello"], SamplingParams(structured=StructuredOutput("json", '{"type": "nope"}')))
    assert llm.engine.grammars.compiled_total == 1  # compiled once for six sequences


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "pet": {"enum": ["cat", "dog", "parrot"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "pet", "age"],
    "additionalProperties": False,
}
JUMP_CONFIGS = {
    "default": {},
    "budget_cuts_drafts": {"max_num_batched_tokens": 5},  # forced runs dropped or cut: matchers roll back
    "preemption": {"num_kv_blocks": 24, "block_size": 4},
    "with_ngram_speculation": {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3,
                                                      "prompt_lookup_max": 2, "adaptive": False}},
}  # fmt: skip


@pytest.mark.parametrize("name", list(JUMP_CONFIGS))
def test_jump_forward_emits_forced_runs_in_one_step_with_unchanged_output(name, make_llm):
    """Offline, tiny random model: a grammar's forced tokens (keys, punctuation, the rest of an enum value) are
    scored as drafts of one step. Greedy output is token for token the one-token-a-step output (so the forced
    rows' KV and the mask of the row after a run are right), in fewer steps; sampled forks stay valid."""
    from turbofan import SamplingParams
    from turbofan.engine.constraints import StructuredOutput

    llm = make_llm("llama", **JUMP_CONFIGS[name])
    engine = llm.engine
    spec = StructuredOutput.json_schema(PERSON)
    prompts = ["hello there", "a b c", "zzz", "the cat sat on the mat"]
    greedy = SamplingParams(temperature=0, max_tokens=40, structured=spec)
    runs = {}
    for max_forced in (0, 16):
        engine.jump_forward.max_forced = max_forced
        steps, forced = engine.steps_total, engine.jump_forward.num_forced_tokens
        outs = llm.generate(prompts, greedy, use_tqdm=False)
        runs[max_forced] = ([o.outputs[0].token_ids for o in outs], engine.steps_total - steps,
                            engine.jump_forward.num_forced_tokens - forced)  # fmt: skip
        for o in outs:
            if o.outputs[0].finish_reason == "stop":
                json.loads(o.outputs[0].text)
    (plain, plain_steps, plain_forced), (jumped, jumped_steps, jumped_forced) = runs[0], runs[16]
    assert plain_forced == 0 and jumped_forced > 20, runs
    assert jumped == plain
    room = 1.0 if name == "budget_cuts_drafts" else 0.8  # 5 tokens a step for 4 sequences: most runs are cut
    assert jumped_steps < plain_steps * room, (jumped_steps, plain_steps)
    sampled = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=60, structured=spec)
    for o in llm.generate(prompts[:2], sampled, use_tqdm=False):
        for c in o.outputs:
            if c.finish_reason == "stop":
                person = json.loads(c.text)
                assert person["pet"] in ("cat", "dog", "parrot") and 0 <= person["age"] <= 99, c.text
            else:  # cut by max_tokens: still a prefix the grammar allows
                assert c.text.startswith('{"name": "'), c.text


# == OpenAI: response_format and structured_outputs =============================================================
@needs_model
def test_parse_returns_a_pydantic_object(oai):
    done = oai.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Invent a pet."}],
        response_format=Pet,
        temperature=0,
        max_tokens=60,
    )
    choice = done.choices[0]
    assert choice.finish_reason == "stop", choice
    assert isinstance(choice.message.parsed, Pet)


@needs_model
def test_enum_and_integer_bounds_hold_at_temperature_one_over_many_seeds(oai):
    schema = {"name": "pet", "schema": Pet.model_json_schema(), "strict": True}
    r = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a poem."}], n=12, seed=7, temperature=1.0,
        max_tokens=60, response_format={"type": "json_schema", "json_schema": schema},
    )  # fmt: skip
    assert len(r.choices) == 12
    pets = [Pet.model_validate_json(c.message.content) for c in r.choices if c.finish_reason == "stop"]
    assert len(pets) >= 10, [c.message.content for c in r.choices]
    assert len({(p.species, p.age, p.name) for p in pets}) > 3  # sampled, not one forced answer


CLOSED_PET = {**Pet.model_json_schema(), "additionalProperties": False}  # else extra keys may run past max_tokens


@needs_model
def test_streamed_json_schema_concatenates_to_valid_json(oai):
    stream = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me about dogs."}], stream=True, temperature=1.0,
        seed=3, max_tokens=60, response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": CLOSED_PET}},
    )  # fmt: skip
    pieces, finish = [], None
    for chunk in stream:
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert finish == "stop"
    assert len([p for p in pieces if p]) > 3
    Pet.model_validate_json("".join(pieces))


@needs_model
def test_json_object_and_vllm_structured_outputs(oai):
    r = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=80,
        response_format={"type": "json_object"},
    )  # fmt: skip
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    cases = {
        "choice": (["positive", "negative"], lambda t: t in ("positive", "negative")),
        "regex": (r"[A-Z]{3}-\d{4}", lambda t: len(t) == 8 and t[:3].isupper() and t[4:].isdigit() and t[3] == "-"),
        "grammar": ('root ::= "yes" | "no" | "maybe"', lambda t: t in ("yes", "no", "maybe")),
    }
    for kind, (spec, ok) in cases.items():
        for stream in (False, True):
            kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Review: great film!"}], temperature=1.0,
                          seed=1, max_tokens=20, extra_body={"structured_outputs": {kind: spec}})  # fmt: skip
            if stream:
                text = "".join(c.choices[0].delta.content or "" for c in oai.chat.completions.create(stream=True, **kwargs)
                               if c.choices)  # fmt: skip
            else:
                text = oai.chat.completions.create(**kwargs).choices[0].message.content
            assert ok(text), (kind, stream, text)
    r = oai.completions.create(model=MODEL, prompt="The answer is", max_tokens=5, extra_body={"guided_choice": ["A", "B"]})
    assert r.choices[0].text in ("A", "B")


@needs_model
def test_constrained_answer_cut_by_max_tokens_says_length(oai):
    r = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Invent a pet."}], max_tokens=4,
        response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": Pet.model_json_schema()}},
    )  # fmt: skip
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}, "nope"),
        ({"response_format": {"type": "xml"}}, "response_format type"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "regex"),
        ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "grammar"),
        ({"structured_outputs": {"choice": []}}, "choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "launch_rockets"}}}, "launch_rockets"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "name"),
        ({"tool_choice": "required"}, "tool_choice needs tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}}}}],
          "tool_choice": "required"}, "strin"),
    ],
)  # fmt: skip
@needs_model
def test_bad_schemas_and_unknown_tools_are_400(smol, body, needle):
    r = httpx.post(smol.url + "/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 5, **body},
                   timeout=60)  # fmt: skip
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"], r.text


# == OpenAI: tools ================================================================================================
def _check_weather(args: dict) -> None:
    assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit") and isinstance(args["city"], str)


@needs_model
def test_tool_choice_required_and_named_give_valid_calls(oai):
    for seed in range(4):
        r = oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                        temperature=1.0, seed=seed, max_tokens=80)  # fmt: skip
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", c
        call = c.message.tool_calls[0]
        assert call.id and call.type == "function" and call.function.name in ("get_weather", "get_time")
        args = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            _check_weather(args)
        else:
            assert -12 <= args["offset_hours"] <= 14
    named = {"type": "function", "function": {"name": "get_time"}}
    r = oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=named,
                                    temperature=1.0, seed=5, max_tokens=80)  # fmt: skip
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_time" and r.choices[0].message.content is None
    assert -12 <= json.loads(call.function.arguments)["offset_hours"] <= 14


@needs_model
def test_streamed_tool_call_deltas_assemble_into_one_call(oai):
    stream = oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                         stream=True, temperature=0, max_tokens=80)  # fmt: skip
    calls: dict[int, dict] = {}
    heads, fragments, finish = 0, 0, None
    for chunk in stream:
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                if tc.id:
                    heads += 1
                    slot["id"], slot["name"] = tc.id, tc.function.name
                fragments += bool(tc.function and tc.function.arguments)
                slot["arguments"] += (tc.function.arguments or "") if tc.function else ""
    assert finish == "tool_calls" and heads == 1 and list(calls) == [0]
    assert fragments > 1  # the arguments arrive in pieces, as OpenAI streams them
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    _check_weather(json.loads(calls[0]["arguments"]))


@needs_model
def test_tool_result_round_trips(oai):
    first = oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                        temperature=0, max_tokens=80)  # fmt: skip
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})},
    ]
    r = oai.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], temperature=0, max_tokens=40)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r.choices[0].message.content or r.choices[0].message.tool_calls
    prompt = httpx.post(oai.base_url.join("/tokenize").__str__(), json={"model": MODEL, "messages": history}).json()
    assert prompt["count"] > 0


# == Ollama ======================================================================================================
@needs_model
def test_ollama_format_json_and_schema(ol):
    for api in ("chat", "generate"):
        for fmt in ("json", Pet.model_json_schema()):
            options = {"temperature": 1.0, "seed": 11, "num_predict": 80}
            if api == "chat":
                text = ol.chat(model=MODEL, messages=[{"role": "user", "content": "Write a haiku."}], format=fmt,
                               options=options).message.content  # fmt: skip
            else:
                text = ol.generate(model=MODEL, prompt="Write a haiku.", format=fmt, options=options).response
            value = json.loads(text)
            assert isinstance(value, dict), text
            if fmt != "json":
                Pet.model_validate(value)
    parts = [p.message.content for p in ol.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                format=Pet.model_json_schema(), stream=True, options={"seed": 2})]  # fmt: skip
    Pet.model_validate_json("".join(parts))


def get_weather(city: str, unit: str) -> str:
    """Current weather in a city.

    Args:
        city: the city
        unit: celsius or fahrenheit
    """
    return json.dumps({"city": city, "temperature": 21, "unit": unit})


@needs_model
def test_ollama_tools_with_a_python_function_and_tool_results(ol, smol):
    import ollama

    messages = [{"role": "user", "content": "Call get_weather for Paris in celsius."}]
    auto = ol.chat(model=MODEL, messages=messages, tools=[get_weather], options={"temperature": 0, "num_predict": 30})
    assert auto.done and (auto.message.content or auto.message.tool_calls)  # SmolLM2 decides (it tends to talk)
    # Ollama itself has no tool_choice; turbofan takes one in options (or at the top level), enforced by a grammar
    forced = {"temperature": 0, "num_predict": 80, "tool_choice": "required"}
    r = ol.chat(model=MODEL, messages=messages, tools=[get_weather], options=forced)
    calls = r.message.tool_calls or []
    assert calls, r.message
    assert calls[0].function.name == "get_weather" and isinstance(calls[0].function.arguments, dict)
    result = get_weather(**calls[0].function.arguments)
    messages += [r.message, {"role": "tool", "content": result, "tool_name": "get_weather"}]
    r2 = ol.chat(model=MODEL, messages=messages, tools=[get_weather], options={"temperature": 0, "num_predict": 30})
    assert r2.done
    streamed = [p for p in ol.chat(model=MODEL, messages=messages[:1], tools=[get_weather], stream=True,
                                   options=forced) if p.message.tool_calls]  # fmt: skip
    assert len(streamed) == 1 and streamed[0].message.tool_calls[0].function.name == "get_weather"
    bad = httpx.post(smol.url + "/api/chat", json={"model": MODEL, "messages": messages[:1], "format": {"type": "nope"},
                                                   "stream": False}, timeout=60)  # fmt: skip
    assert bad.status_code == 400 and "nope" in bad.json()["error"]
    bad = httpx.post(smol.url + "/api/generate", json={"model": MODEL, "prompt": "hi", "format": "xml"}, timeout=60)
    assert bad.status_code == 400 and "format" in bad.json()["error"]
    with pytest.raises(ollama.ResponseError):  # an unknown tool_choice name, through the client
        ol.chat(model=MODEL, messages=messages[:1], tools=[get_weather], options={"tool_choice": "nope"})
    show = ol.show(MODEL)
    assert "tools" not in (show.capabilities or [])  # SmolLM2's template has no tools; the fallback is ours


@needs_model
def test_ollama_think_is_refused_without_a_reasoning_parser(smol):
    r = httpx.post(smol.url + "/api/chat", json={"model": MODEL, "messages": ASK, "think": True}, timeout=60)
    assert r.status_code == 400 and "does not support thinking" in r.json()["error"], r.text
    r = httpx.post(smol.url + "/api/generate", json={"model": MODEL, "prompt": "hi", "think": True}, timeout=60)
    assert r.status_code == 400 and "--reasoning-parser" in r.json()["error"], r.text
