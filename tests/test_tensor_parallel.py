"""Tensor parallelism (turbofan/distributed): 2 processes against 1 on the float32 exact path — prompt logprobs
within 1e-3 and the same greedy tokens, offline and over HTTP; how heads are split; clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_server import launch
from tp_probe import PROMPTS, probe

from turbofan.distributed.tensor_parallel import partition
from turbofan.model.args import ModelArgs

REPO = Path(__file__).resolve().parents[1]
ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]


def args(heads: int, kv: int, vocab: int = 49152, inter: int = 1536) -> ModelArgs:
    return ModelArgs("LlamaForCausalLM", vocab, 576, inter, 2, heads, kv, 64, 2048)


def test_heads_split_by_kv_groups_and_vocab_by_rows():
    a = args(9, 3)  # SmolLM2-135M: 3 KV heads over 2 ranks go 1 + 2, each with its 3 query heads
    p0, p1 = partition(a, 0, 2), partition(a, 1, 2)
    assert (p0.kv_heads, p1.kv_heads) == (range(0, 1), range(1, 3))
    assert (p0.q_heads, p1.q_heads) == (range(0, 3), range(3, 9))
    assert (p0.intermediate, p1.intermediate) == (range(0, 768), range(768, 1536))
    assert (p0.vocab, p1.vocab, p0.vocab_width) == (range(0, 24576), range(24576, 49152), 24576)
    odd = partition(args(4, 2, vocab=401), 1, 2)
    assert odd.vocab == range(200, 401) and odd.vocab_width == 201


def test_fewer_kv_heads_than_ranks_replicates_them():
    a = args(4, 1)  # Gemma 3 270M
    parts = [partition(a, r, 2) for r in range(2)]
    assert [p.kv_heads for p in parts] == [range(0, 1), range(0, 1)]
    assert [p.q_heads for p in parts] == [range(0, 2), range(2, 4)]
    with pytest.raises(ValueError, match="tensor_parallel_size 3 does not fit"):
        partition(args(4, 2), 0, 3)


def test_bad_sizes_are_clear_errors(make_llm):
    with pytest.raises(Exception, match="tensor_parallel_size 3 does not fit this model's heads"):
        make_llm("llama", tensor_parallel_size=3, quantization="none")
    with pytest.raises(ValueError, match="tiering"):
        make_llm("llama", tensor_parallel_size=2, tiering="on")
    with pytest.raises(ValueError, match="at least 1"):
        make_llm("llama", tensor_parallel_size=0)


def run_probe(tp: int, *models: str) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, str(REPO / "tests" / "tp_probe.py"), str(tp), *models],
                         capture_output=True, text=True, timeout=600, env=env, cwd=REPO)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def assert_same(single: dict, split: dict) -> None:
    """Same greedy tokens (or their text, over HTTP); prompt logprobs within 1e-3."""
    for key in ("tokens", "texts"):
        if key in split:
            assert split[key] == single[key]
    for a, b in zip(single["prompt_logprobs"], split["prompt_logprobs"]):
        assert a[0] is None and b[0] is None and len(a) == len(b)
        assert max(abs(x - y) for x, y in zip(a[1:], b[1:])) < 1e-3


def test_two_ranks_match_one_offline(tiny_models, make_llm):
    split = run_probe(2, *(str(tiny_models[a]) for a in ARCHS))
    for arch in ARCHS:
        single = probe(make_llm(arch, quantization="none"))
        assert_same(single, split[str(tiny_models[arch])])


def http_probe(server) -> dict:
    """The same prompts over /v1/completions: echo + logprobs gives the prompt's logprobs, then greedy tokens."""
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    name = client.models.list().data[0].id
    result: dict = {"texts": [], "prompt_logprobs": []}
    for prompt in PROMPTS:
        r = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0, echo=True,
                                      logprobs=0, extra_body={"ignore_eos": True})  # fmt: skip
        choice = r.choices[0]
        assert r.usage.completion_tokens == 12 and choice.text.startswith(prompt)
        result["prompt_logprobs"].append(choice.logprobs.token_logprobs[: r.usage.prompt_tokens])
        result["texts"].append(choice.text[len(prompt) :])
    return result


def test_two_ranks_match_one_over_http_and_a_dead_rank_ends_the_server(tiny_models, make_llm, tmp_path):
    single = probe(make_llm("llama", quantization="none"))
    server = launch(tiny_models["llama"], tmp_path / "tp.log", "--tensor-parallel-size", "2", "--quantization",
                    "none", "--num-kv-blocks", "128")  # fmt: skip
    try:
        assert_same(single, http_probe(server))
        workers = subprocess.run(["pgrep", "-P", str(server.proc.pid), "-f", "turbofan.distributed.tp_runner"],
                                 capture_output=True, text=True).stdout.split()  # fmt: skip
        assert len(workers) == 1
        os.kill(int(workers[0]), signal.SIGKILL)
        assert server.proc.wait(30) == 1  # the engine cannot go on without a rank: it exits for a supervisor
        assert "tensor-parallel worker" in server.log_path.read_text()
    finally:
        server.stop()


@pytest.mark.slow
def test_smollm2_two_ranks_match_one_offline_and_over_http(tmp_path):
    pytest.importorskip("turbofan.store")
    from turbofan.store import ModelStore

    try:
        path = ModelStore(os.environ.get("TURBOFAN_MODELS")).resolve("smollm2:135m").path
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"smollm2:135m is not in the model store: {e}")
    single, split = run_probe(1, str(path))[str(path)], run_probe(2, str(path))[str(path)]
    assert_same(single, split)
    start = time.time()
    server = launch(path, tmp_path / "tp.log", "--tensor-parallel-size", "2", "--quantization", "none")
    try:
        assert_same(single, http_probe(server))
    finally:
        server.stop()
    assert time.time() - start < 600
