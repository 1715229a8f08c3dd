"""Tool-call parsers (hermes, llama3_json, mistral) and their grammars, without a server.

- Each format's text, whole or streamed in random chunkings, gives the same content and calls; random calls whose
  arguments hold the formats' own delimiters (`}`, `]`, `;`, `,`, the tags) come back exactly.
- The parser is chosen from the chat template's source; `--tool-call-parser` overrides; an unknown name fails.
- Each grammar is walked at random over a tiny tokenizer (llguidance's mask decides what may come next, a random
  pick decides what does, now and then writing a format's opener): whatever the walk writes, the parser reads
  calls whose arguments follow the strict tool's schema, and a forced grammar always gives exactly one call.
"""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
from tiny_models import write_tokenizer

from turbofan.server.tool_parsers import parser_name_for
from turbofan.server.tools import (
    TOOL_PARSERS,
    ToolRequest,
    openai_deltas,
    select_parser,
    tool_parser,
)

ARGS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
STRICT = {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": ARGS}}
NOTE = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 8}}, "required": ["text"],
        "additionalProperties": False}  # fmt: skip
LOOSE = {"type": "function", "function": {"name": "note", "parameters": NOTE}}  # not strict: enforced when forced
NASTY = ['}', ']', ';', ',', '"', '\\', '<tool_call>', '</tool_call>', '[TOOL_CALLS]', '{"name": "x"}', 'é', '\n']


def _write(name: str, calls: list[tuple[str, dict]], before: str, after: str, tag: bool) -> str:
    """Calls as each format writes them (the ground truth the parsers must recover)."""
    dumped = [json.dumps({"name": n, ("parameters" if name == "llama3_json" else "arguments"): a}) for n, a in calls]
    if name == "hermes":
        return before + "".join(f"<tool_call>\n{d}\n</tool_call>\n" for d in dumped) + after
    if name == "llama3_json":  # the whole answer, maybe after the python tag
        return ("<|python_tag|>" if tag else "") + "; ".join(dumped)
    return before + ("[TOOL_CALLS]" if tag or before else "") + "[" + ", ".join(dumped) + "]" + after


def _chunked(parser, text: str, rng: random.Random):
    stream = parser.stream()
    events, i = [], 0
    while i < len(text):
        n = rng.randint(1, 9)
        events += stream.feed(text[i : i + n])
        i += n
    events += stream.finish()
    return stream, events


@pytest.mark.parametrize("name", sorted(TOOL_PARSERS))
def test_random_calls_come_back_exactly_whole_and_streamed(name):
    rng = random.Random(name)
    parser = tool_parser(name)
    for _ in range(60):
        calls = [(rng.choice(["get_weather", "note", "a.b-c"]),
                  {rng.choice(["city", "q", "x y"]): "".join(rng.choices(NASTY + ["a", "b", " "], k=rng.randint(0, 8))),
                   "n": rng.randint(-5, 5), "nested": [{"k": rng.choice(NASTY)}]})
                 for _ in range(rng.randint(1, 3))]  # fmt: skip
        before, after = rng.choice(["", "Sure. ", "a < b; [1] {x} "]), rng.choice(["", " done."])
        text = _write(name, calls, before, after, rng.random() < 0.5)
        content, parsed = parser.parse(text)
        assert [(c.name, json.loads(c.arguments)) for c in parsed] == calls, text
        if name != "llama3_json":  # the text around the calls is the content
            assert content.split() == (before + after).split(), text
        else:
            assert content == "", text
        for _ in range(5):  # random chunkings: the same calls; name first, then argument fragments
            stream, events = _chunked(parser, text, rng)
            assert (stream.content, [(c.name, c.arguments) for c in stream.calls]) == (
                content, [(c.name, c.arguments) for c in parsed]), text  # fmt: skip
            deltas = openai_deltas(events, stream.calls)
            for i, (call_name, args) in enumerate(calls):
                mine = [d["tool_calls"][0] for d in deltas if "tool_calls" in d and d["tool_calls"][0]["index"] == i]
                assert mine[0]["function"]["name"] == call_name and "id" in mine[0]
                assert all("name" not in d["function"] for d in mine[1:])
                assert json.loads("".join(d["function"]["arguments"] for d in mine)) == args


@pytest.mark.parametrize(
    "name, text",
    [
        ("hermes", "<tool_call>not json</tool_call>"),
        ("hermes", "a < b and <tool"),
        ("hermes", '{"name": "x", "arguments": {}} and more'),  # a bare call only when it is the whole answer
        ("llama3_json", 'Hello {"name": "f", "parameters": {}}'),  # a call only at the start
        ("llama3_json", '{"city": "Paris"}'),  # JSON, but not a call
        ("mistral", "[1] first, [2] second"),
        ("mistral", "[TOOL_CALLS]nope"),
        ("mistral", "[TOOL"),
    ],
)
def test_text_that_is_not_a_call_stays_content_as_written(name, text):
    parser = tool_parser(name)
    assert parser.parse(text) == (text, [])
    stream, _ = _chunked(parser, text, random.Random(1))
    assert (stream.content, stream.calls) == (text, [])


def test_llama3_and_mistral_calls_without_their_special_tags():
    """Decoding drops special tokens, so `<|python_tag|>` and `[TOOL_CALLS]` may be missing from the text."""
    content, calls = tool_parser("llama3_json").parse(' {"name": "f", "parameters": {"a": ";"}};{"name": "g", "arguments": {}}')
    assert content.strip() == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"a": ";"}), ("g", {})]
    content, calls = tool_parser("mistral").parse('[{"name": "f", "arguments": {"a": "]"}}]')
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("f", '{"a": "]"}')]


# == selection ===================================================================================================
QWEN = '{%- if tools %}<|im_start|>system\n# Tools\n<tools>{{ tool | tojson }}</tools>\n<tool_call>\n{"name": ...}\n</tool_call>'
HERMES3_LLAMA = "{% for tool in tools %}{{ tool }}{% endfor %}<|im_start|>... <tool_call> ... <|start_header_id|>"
LLAMA31 = "{%- if tools %}<|start_header_id|>ipython<|end_header_id|>{{- '<|python_tag|>' + tool_call.name }}<|eot_id|>"
LLAMA32 = '{%- if tools %}<|start_header_id|>user<|end_header_id|>{"name": function name, "parameters": ...}<|eot_id|>'
MISTRAL = "{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{{ '[TOOL_CALLS]' + calls }}"


@pytest.mark.parametrize(
    "template, native, expected",
    [
        (QWEN, True, "hermes"),
        (HERMES3_LLAMA, True, "hermes"),  # ChatML calls on a Llama base: the tag decides
        (LLAMA31, True, "llama3_json"),
        (LLAMA32, True, "llama3_json"),
        (MISTRAL, True, "mistral"),
        ("{% for t in tools %}{{ t }}{% endfor %}", True, "hermes"),  # an unknown format: the fallback
        (LLAMA31, False, "hermes"),  # the template does not render tools: our prompt asks for hermes calls
        (None, False, "hermes"),
    ],
)
def test_parser_is_chosen_from_the_template(template, native, expected):
    assert parser_name_for(template, native) == expected
    assert select_parser(template, native, None).name == expected
    assert select_parser(template, native, "mistral").name == "mistral"  # --tool-call-parser overrides


def test_unknown_parser_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown tool-call parser 'nope'; known: hermes, llama3_json, mistral"):
        tool_parser("nope")


def test_the_stored_qwen_template_selects_hermes():
    import os
    from pathlib import Path

    path = Path(os.environ.get("TURBOFAN_MODELS", "/nonexistent")) / "qwen2.5-coder-0.5b"
    configs = sorted(path.rglob("tokenizer_config.json"))
    if not configs:
        pytest.skip("qwen2.5-coder-0.5b is not in the model store")
    template = json.loads(configs[0].read_text())["chat_template"]
    assert parser_name_for(template, "tools" in template) == "hermes"


# == grammars: random walks ======================================================================================
@pytest.fixture(scope="module")
def lexicon(tmp_path_factory):
    """A tiny tokenizer (tool tags as tokens of their own, like Qwen2.5's) and a grammar compiler over it."""
    from transformers import AutoTokenizer

    from turbofan.engine.constraints import GrammarCompiler

    path = tmp_path_factory.mktemp("tok")
    write_tokenizer(path, tools=True)
    hf = AutoTokenizer.from_pretrained(path)
    return hf, GrammarCompiler(hf, len(hf), [hf.eos_token_id])


def _walk(compiler, hf, spec, openers: list[str], rng: random.Random, limit: int = 160) -> tuple[str, bool]:
    """A random "model": each step picks one token the grammar allows; sometimes it tries to write an opener.
    (text, whether it ended by itself rather than at `limit`)"""
    import numpy as np

    matcher = compiler.constraint(spec).matcher
    out: list[int] = []
    while len(out) < limit and not matcher.is_stopped():
        if openers and rng.random() < 0.08:
            ids = hf.encode(rng.choice(openers), add_special_tokens=False)
            n = matcher.try_consume_tokens(ids)
            if n == len(ids):
                out += ids
                continue
            matcher.rollback(n)
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = np.flatnonzero(bits[: len(hf)])
        token = int(rng.choice(allowed))
        if token == hf.eos_token_id:
            break
        assert matcher.consume_token(token), matcher.get_error()
        out.append(token)
    return hf.decode(out, skip_special_tokens=True), len(out) < limit


OPENERS = {"hermes": ["<tool_call>", "{"], "llama3_json": ["{", "<|python_tag|>"], "mistral": ["[TOOL_CALLS]", "["]}


@pytest.mark.parametrize("name", sorted(TOOL_PARSERS))
def test_auto_grammar_makes_every_started_call_follow_the_strict_schema(lexicon, name):
    hf, compiler = lexicon
    parser = tool_parser(name, hf)
    tools = ToolRequest.parse([STRICT, LOOSE], "auto")
    spec = parser.auto_grammar(tools)
    rng = random.Random(name)
    checked = 0
    for _ in range(40):
        text, ended = _walk(compiler, hf, spec, OPENERS[name], rng)
        _, calls = parser.parse(text)
        for call in calls if ended else calls[:-1]:  # a walk cut at its limit may be inside its last call
            assert call.name in ("get_weather", "note"), text
            args = json.loads(call.arguments)
            if call.name == "get_weather":
                jsonschema.validate(args, ARGS)
                checked += 1
            else:
                assert isinstance(args, dict), text
    assert checked >= 5, f"only {checked} complete strict calls in the walks"


@pytest.mark.parametrize("name", sorted(TOOL_PARSERS))
def test_forced_grammar_gives_exactly_one_valid_call(lexicon, name):
    hf, compiler = lexicon
    parser = tool_parser(name, hf)
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        tools = ToolRequest.parse([STRICT, LOOSE], choice)
        spec = parser.forced_grammar(tools)
        rng = random.Random(name)
        for _ in range(12):
            text, ended = _walk(compiler, hf, spec, [], rng, limit=400)
            content, calls = parser.parse(text)
            assert ended, text
            assert len(calls) == 1 and not content.strip(), text
            if calls[0].name == "get_weather":
                jsonschema.validate(json.loads(calls[0].arguments), ARGS)
            else:
                assert choice == "required"
                jsonschema.validate(json.loads(calls[0].arguments), NOTE)


def test_grammar_names_a_tag_token_as_a_token():
    """`[TOOL_CALLS]` is a token of Mistral's vocabulary: llguidance must see it as a token, not text."""
    parser = TOOL_PARSERS["mistral"]({"[TOOL_CALLS]": 5})
    tools = ToolRequest.parse([STRICT], "required")
    assert parser.forced_grammar(tools).spec.startswith('start: <[5]> "["')
    assert "seg0: (hd0 | FIRST <[5]>)" in parser.auto_grammar(ToolRequest.parse([STRICT], "auto")).spec
