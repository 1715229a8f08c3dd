"""Several models in one server (turbofan/server/manager.py) on tiny random models: load on demand, keep_alive,
eviction under a small memory budget (never of a model with a request in flight), refusals that name the numbers,
and /api/copy + /api/create. A real `turbofan serve` subprocess, driven by the real `openai` and `ollama` clients.

The real models (a second chat model beside the first, all-minilm embeddings against sentence-transformers) are
in test_models_real.py.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_server import install_copy, launch

from turbofan.model.footprint import estimate

A, B, C = "tiny-a:1m", "tiny-b:1m", "tiny-c:1m"


# -- keep_alive and the footprint, without a server ---------------------------------------------------------------
@pytest.mark.parametrize(
    "value, seconds",
    [(None, None), (0, 0.0), ("0", 0.0), ("0s", 0.0), (300, 300.0), ("300", 300.0), ("5m", 300.0),
     ("1h30m", 5400.0), ("1.5s", 1.5), ("250ms", 0.25), (-1, math.inf), ("-1", math.inf), ("-5m", math.inf)],
)  # fmt: skip
def test_keep_alive_follows_ollama(value, seconds):
    from turbofan.server.manager import parse_keep_alive

    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", "1x", True, [1]])
def test_bad_keep_alive_is_a_400(value):
    from turbofan.server.errors import APIError
    from turbofan.server.manager import parse_keep_alive

    with pytest.raises(APIError) as e:
        parse_keep_alive(value)
    assert e.value.status == 400 and "keep_alive" in e.value.message


def test_footprint_counts_weights_kv_and_runtime(tiny_models):
    from turbofan.config import EngineConfig

    small = estimate(tiny_models["llama"], EngineConfig(num_kv_blocks=10, max_num_seqs=4, max_num_batched_tokens=64))
    big = estimate(tiny_models["llama"], EngineConfig(num_kv_blocks=1000, max_num_seqs=4, max_num_batched_tokens=64))
    # 3 layers x K,V x 16 tokens x 2 KV heads x 16 dims x 4 bytes per block (+1 trash block)
    assert small.kv_cache == 3 * 2 * 16 * 2 * 16 * 4 * 11 and big.kv_cache > small.kv_cache
    assert small.weights == big.weights > 0 and small.runtime > 0
    assert "KV cache" in small.describe() and small.total == small.weights + small.kv_cache + small.runtime


# -- a server with three tiny models and a budget for two ---------------------------------------------------------
FLAGS = ("--enable-debug-endpoints", "--num-kv-blocks", "32", "--max-model-len", "512",
         "--max-num-batched-tokens", "64", "--max-num-seqs", "4")  # fmt: skip


@pytest.fixture(scope="module")
def budget_server(tmp_path_factory, tiny_models):
    from turbofan.config import EngineConfig

    root = tmp_path_factory.mktemp("budget")
    store = root / "models"
    for name, arch in ((A, "llama"), (B, "qwen2"), (C, "qwen3")):
        install_copy(store, tiny_models[arch], name)
    config = EngineConfig(num_kv_blocks=32, max_num_seqs=4, max_num_batched_tokens=64)
    one = max(estimate(tiny_models[a], config).total for a in ("llama", "qwen2", "qwen3"))
    budget = int(2.5 * one)  # two tiny models fit, a third needs an eviction
    srv = launch(A, root / "server.log", *FLAGS, "--memory-budget", f"{budget / (1 << 20):.1f}MiB",
                 "--keep-alive", "5m", "--stats-interval", "0", store=store)  # fmt: skip
    srv.budget, srv.one = budget, one
    yield srv
    srv.stop()


def ps(server) -> dict[str, dict]:
    return {m["name"]: m for m in server.get("/api/ps").json()["models"]}


def wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def ollama(server):
    import ollama as ollama_sdk

    return ollama_sdk.Client(host=server.url)


def test_models_load_on_demand_and_list(budget_server):
    srv = budget_server
    from openai import OpenAI

    oai = OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    assert {A, B, C} <= {m.id for m in oai.models.list().data}  # every local model, loaded or not
    assert set(ps(srv)) == {A}
    r = oai.completions.create(model=B, prompt="hello", max_tokens=3, temperature=0)
    assert r.model == B and r.usage.completion_tokens == 3
    loaded = ps(srv)
    assert set(loaded) == {A, B}  # the second loaded beside the first
    assert all(m["size"] > 0 and m["context_length"] == 512 for m in loaded.values())
    for m in loaded.values():  # what `size` is made of: weights by format, KV cache, runtime
        mem = m["memory"]
        assert mem["kv_cache"] > 0 and mem["runtime"] >= 0 and sum(mem["weights"].values()) > 0
        assert m["size"] == sum(mem["weights"].values()) + mem["kv_cache"] + mem["runtime"]
    assert loaded[A]["expires_at"].startswith("9999")  # the primary stays
    expires = loaded[B]["expires_at"]  # --keep-alive 5m after its last request
    assert expires[:4] != "9999"
    text = srv.get("/metrics").text
    assert f'turbofan:model_loaded{{model_name="{B}"}} 1.0' in text
    assert f'vllm:request_success_total{{finished_reason="length",model_name="{B}"}}' in text


def test_concurrent_requests_to_two_models(budget_server):
    client = ollama(budget_server)
    results: dict = {}

    def ask(model: str) -> None:
        results[model] = client.generate(model=model, prompt="hi", options={"num_predict": 8, "temperature": 0})

    threads = [threading.Thread(target=ask, args=(m,)) for m in (A, B) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert {m: r.eval_count for m, r in results.items()} == {A: 8, B: 8}


def test_keep_alive_zero_unloads_and_a_later_request_reloads(budget_server):
    srv, client = budget_server, ollama(budget_server)
    r = client.generate(model=C, prompt="", keep_alive="10m")  # an empty prompt only loads
    assert r.done_reason == "load" and C in ps(srv)
    r = client.generate(model=C, prompt="hi", options={"num_predict": 2}, keep_alive=0)
    assert r.eval_count == 2
    assert wait_for(lambda: C not in ps(srv)), ps(srv)
    r = client.chat(model=C, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 2})
    assert r.eval_count == 2 and C in ps(srv)
    r = client.generate(model=C, prompt="", keep_alive=0)
    assert r.done_reason == "unload" and wait_for(lambda: C not in ps(srv))


def test_eviction_takes_the_idle_model_never_a_busy_one(budget_server):
    """A (least recently used) streams while B sits idle: C's load must evict B, never A with its request in
    flight. The stream is big (n=4, 20 logprobs a token) and unread meanwhile, so it stays in flight."""
    srv, client = budget_server, ollama(budget_server)
    client.generate(model=A, prompt="")  # earlier tests may have evicted A (the primary is no exception)
    client.generate(model=B, prompt="", keep_alive="10m")
    assert set(ps(srv)) == {A, B}
    body = {"model": A, "prompt": "hi", "max_tokens": 480, "n": 4, "logprobs": 20, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=120) as stream:
        lines = stream.iter_lines()
        first = next(lines)  # A is generating now
        client.generate(model=B, prompt="", keep_alive="10m")  # B is used after A: A is the LRU model
        r = client.generate(model=C, prompt="hi", options={"num_predict": 2})
        assert r.eval_count == 2
        assert srv.get("/debug/engine").json()["in_flight"] == 1  # A's request was in flight throughout
        assert set(ps(srv)) == {A, C}  # B, the idle one, made room
        rest = [x for x in lines if x]
    assert first.startswith("data: ") and rest[-1] == "data: [DONE]"
    assert srv.get("/health").json() == {"status": "ok"}


def test_a_model_bigger_than_the_budget_is_refused_with_numbers(budget_server, tiny_models, tmp_path):
    """A model whose KV cache alone exceeds the budget: 507 naming need and budget; the server keeps serving."""
    import ollama as ollama_sdk

    srv = budget_server
    r = srv.post("/api/generate", {"model": A, "prompt": "hi", "stream": False, "options": {"num_ctx": 2}})
    assert r.status_code == 400 and "num_ctx is 2" in r.json()["error"] and "tokens long" in r.json()["error"]
    r = srv.post("/api/chat", {"model": A, "messages": [{"role": "user", "content": "hi"}], "stream": False,
                               "options": {"num_ctx": 100000}})  # fmt: skip
    assert r.status_code == 400 and "100000" in r.json()["error"] and "512" in r.json()["error"]
    big = tmp_path / "big"
    import shutil

    shutil.copytree(tiny_models["llama"], big)
    cfg = (big / "config.json").read_text().replace('"intermediate_size": 128', '"intermediate_size": 4000000')
    (big / "config.json").write_text(cfg)  # the runtime estimate grows past the budget; the weights stay tiny
    store = Path(srv.log_path).parent / "models"
    install_copy(store, big, "huge:1m")
    with pytest.raises(ollama_sdk.ResponseError) as e:
        ollama(srv).generate(model="huge:1m", prompt="hi")
    assert e.value.status_code == 507
    message = e.value.error
    assert "huge:1m needs" in message and "memory budget is" in message and "smaller" in message, message
    assert ollama(srv).generate(model=A, prompt="hi", options={"num_predict": 2}).eval_count == 2


def test_unknown_model_is_still_a_404(budget_server):
    r = budget_server.post("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and "gpt-4" in r.json()["error"]["message"]
    r = budget_server.post("/api/generate", {"model": "llama3:8b", "prompt": "x"})
    assert r.status_code == 404 and "llama3:8b" in r.json()["error"]


def test_copy_and_create_variants(budget_server, tmp_path):
    """cp and create through the ollama client and the CLI; a variant's PARAMETERs and SYSTEM are defaults that the
    request's own options override."""
    import ollama as ollama_sdk
    from test_cli import turbofan

    srv, client = budget_server, ollama(budget_server)
    store = Path(srv.log_path).parent / "models"
    client.copy(A, "tiny-copy:1m")
    assert "tiny-copy:1m" in {m.model for m in client.list().models}
    assert client.generate(model="tiny-copy:1m", prompt="hi", options={"num_predict": 2}).eval_count == 2
    client.create(model="tiny-terse:1m", from_=A, system="Be terse.", parameters={"num_predict": 3, "stop": ["zzz"]})
    assert client.generate(model="tiny-terse:1m", prompt="hi").eval_count == 3
    r = client.chat(model="tiny-terse:1m", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 5})
    assert r.eval_count == 5 and r.prompt_eval_count > client.chat(
        model="tiny-copy:1m", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 1}
    ).prompt_eval_count  # the variant's SYSTEM message is in its prompt
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(f'# a variant\nFROM {A}\nPARAMETER num_predict 4\nPARAMETER temperature 0\n'
                         'SYSTEM """You answer\nin two lines."""\n')  # fmt: skip
    out = turbofan("create", "tiny-cli:1m", "-f", str(modelfile), TURBOFAN_MODELS=str(store))
    assert out.returncode == 0, out.stderr
    assert turbofan("cp", "tiny-cli:1m", "tiny-cli2:1m", TURBOFAN_MODELS=str(store)).returncode == 0
    assert client.generate(model="tiny-cli2:1m", prompt="hi").eval_count == 4
    for body in ({"model": "x:1", "from": "nope:1m"}, {"model": "x:1", "modelfile": "PARAMETER top_k 3"},
                 {"model": "x:1", "from": A, "parameters": {"mirostat": 1}}):  # fmt: skip
        r = srv.post("/api/create", {**body, "stream": False})
        assert r.status_code in (400, 404) and r.json()["error"], r.text
    with pytest.raises(ollama_sdk.ResponseError):
        client.copy("not-there:1m", "y:1m")
