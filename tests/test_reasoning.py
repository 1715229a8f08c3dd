"""Reasoning models (`--reasoning-parser`): the thinking goes to reasoning_content / Ollama's thinking, and a
structured-output constraint applies only after `</think>`.

None of the bundled models thinks, so the server runs a tiny random-weight Qwen3 whose tokenizer has `<think>` and
`</think>` tokens and whose template opens the think block (Qwen3's shape). The model writes random tokens; a
logit_bias on `</think>` makes it end its reasoning after a few of them. A JSON constraint applied from the first
token would make the first token `{` (no reasoning at all); one never started would leave the answer unparsable:
both fail these tests.
"""

from __future__ import annotations

import json

import httpx
import pytest
from test_server import launch
from tiny_models import build_tiny_model

from turbofan.server.reasoning import ReasoningParser

ANSWER = {
    "type": "object",
    "properties": {"pet": {"enum": ["cat", "dog", "parrot"]}, "age": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["pet", "age"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}
ASK = [{"role": "user", "content": "Which pet, and how old?"}]
SEEDS = range(8)


def test_stream_split_one_character_at_a_time_equals_whole_split():
    parser = ReasoningParser.named("deepseek_r1")
    for text in ["<think>\nhmm, a cat</think>\n\n{\"pet\": 1}", "plain thought</think>answer", "cut in thought</thi",
                 "</think>", "a<b</think>c</think>d"]:  # fmt: skip
        whole = parser.split(text)
        stream = parser.stream()
        parts = [stream.feed(ch) for ch in text] + [stream.finish()]
        assert ("".join(p[0] for p in parts), "".join(p[1] for p in parts)) == whole, text
    assert parser.split("<think>\nhmm</think>\n\nyes") == ("\nhmm", "yes")
    assert parser.split("still thinking</thi") == ("still thinking</thi", "")
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        ReasoningParser.named("nope")


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    root = tmp_path_factory.mktemp("reasoning")
    model = build_tiny_model(root / "qwen3-think", "qwen3", think=True)
    srv = launch(model, root / "server.log", "--reasoning-parser", "deepseek_r1", "--max-model-len", "512",
                 "--served-model-name", "m")  # fmt: skip
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    yield srv, tok.convert_tokens_to_ids("</think>"), tok.eos_token_id
    srv.stop()


def _bias(end: int, eos: int) -> dict:
    return {str(end): 4, str(eos): -100}  # end the thinking after a few tokens; never stop before answering


def test_openai_json_schema_applies_after_the_reasoning(thinker):
    from openai import OpenAI

    srv, end, eos = thinker
    client = OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    thought = 0
    for seed in SEEDS:
        kwargs = dict(model="m", messages=ASK, response_format=FORMAT, temperature=1.0, seed=seed, max_tokens=120,
                      logit_bias=_bias(end, eos))  # fmt: skip
        r = client.chat.completions.create(**kwargs)
        msg = r.choices[0].message
        reasoning = (msg.model_extra or {}).get("reasoning_content")
        answer = json.loads(msg.content)  # the answer after </think> follows the schema
        assert answer["pet"] in ("cat", "dog", "parrot") and 0 <= answer["age"] <= 99, msg.content
        assert r.choices[0].finish_reason == "stop"
        assert "</think>" not in (reasoning or "") and "</think>" not in msg.content
        thought += bool(reasoning)
    assert thought >= len(SEEDS) // 2, "the constraint was applied before the reasoning ended"


@pytest.mark.xfail(
    strict=False,
    reason="known bug, open: on the AVX2 path with one engine thread, a streamed constrained answer sometimes ends "
    "without its last forced token ('}') and without a finish chunk, while the same seed unstreamed is complete "
    "(seen in 2 of 3 CI runs of test-avx2; not reproduced outside pytest yet)",
)
def test_openai_streamed_reasoning_and_answer_equal_the_unstreamed_ones(thinker):
    """Streamed: reasoning_content deltas, then content deltas; the same seed gives the same answer."""
    from openai import OpenAI

    srv, end, eos = thinker
    client = OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    for seed in SEEDS:
        kwargs = dict(model="m", messages=ASK, response_format=FORMAT, temperature=1.0, seed=seed, max_tokens=120,
                      logit_bias=_bias(end, eos))  # fmt: skip
        msg = client.chat.completions.create(**kwargs).choices[0].message
        reasoning = (msg.model_extra or {}).get("reasoning_content")
        chunks = list(client.chat.completions.create(**kwargs, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        streamed_reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
        streamed_content = "".join(d.content or "" for d in deltas)
        assert (streamed_reasoning or None, streamed_content) == (reasoning, msg.content)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_thinking_turned_off_constrains_from_the_first_token(thinker):
    from openai import OpenAI

    srv, end, eos = thinker
    client = OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    r = client.chat.completions.create(model="m", messages=ASK, response_format=FORMAT, temperature=1.0, seed=1,
                                       max_tokens=60, extra_body={"chat_template_kwargs": {"enable_thinking": False}})  # fmt: skip
    msg = r.choices[0].message
    assert json.loads(msg.content)["pet"] in ("cat", "dog", "parrot")
    assert (msg.model_extra or {}).get("reasoning_content") is None


def test_ollama_think_goes_to_thinking(thinker):
    import ollama

    srv, _, _ = thinker
    client = ollama.Client(host=srv.url)
    # no logit_bias in Ollama: the random model rarely ends its thinking, so a short answer is all thinking
    r = client.chat(model="m", messages=ASK, think=True, options={"num_predict": 12, "seed": 3})
    assert r.message.thinking and not r.message.content and "<think>" not in r.message.thinking
    streamed = list(client.chat(model="m", messages=ASK, think=True, options={"num_predict": 12, "seed": 3},
                                stream=True))  # fmt: skip
    assert "".join(p.message.thinking or "" for p in streamed) == r.message.thinking
    g = client.generate(model="m", prompt="Which pet?", think=True, options={"num_predict": 12, "seed": 3})
    assert g.thinking and not g.response
    off = client.chat(model="m", messages=ASK, think=False, format=ANSWER, options={"num_predict": 60, "seed": 3})
    assert not off.message.thinking and json.loads(off.message.content)["pet"] in ("cat", "dog", "parrot")
    bad = httpx.post(srv.url + "/api/chat", json={"model": "m", "messages": ASK, "think": "loud"}, timeout=30)
    assert bad.status_code == 400 and "think must be true or false" in bad.json()["error"]
