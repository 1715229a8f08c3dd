"""The app factory in-process, without a model: failure modes that a live model makes hard to reach
(a load that fails, an unexpected exception in a handler), settings, per-app metrics, and the small helpers."""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient

from turbofan.server import ServerSettings, create_app
from turbofan.server.gotemplate import TemplateError, render
from turbofan.server.logs import JsonFormatter
from turbofan.server.settings import LOCAL_ORIGIN_REGEX


def failing_loader():
    raise RuntimeError("weights are corrupt")


def test_a_failed_load_is_reported_not_hidden():
    with TestClient(create_app(failing_loader, ServerSettings(served_model_names=["m"]))) as client:
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert "weights are corrupt" in health.json()["error"]
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503 and "weights are corrupt" in r.json()["error"]["message"]
        r = client.post("/api/generate", json={"model": "m", "prompt": "x"})
        assert r.status_code == 503 and "weights are corrupt" in r.json()["error"]
        assert client.get("/metrics").status_code == 200


def test_loading_state_and_waiting_requests():
    release = threading.Event()

    def slow_loader():
        release.wait(30)
        raise RuntimeError("stopped on purpose")

    with TestClient(create_app(slow_loader, ServerSettings(served_model_names=["m"]))) as client:
        assert client.get("/health").json() == {"status": "loading"}
        assert client.get("/health").status_code == 503
        result = {}

        def call():
            result["r"] = client.post("/api/chat", json={"model": "m", "messages": [{"role": "user", "content": "x"}]})

        waiter = threading.Thread(target=call)
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive()  # it waits for the engine instead of failing
        release.set()
        waiter.join(10)
        assert result["r"].status_code == 503


def test_unexpected_exceptions_become_500_in_each_api_shape():
    app = create_app(failing_loader, ServerSettings())

    @app.get("/v1/boom")
    async def boom():
        raise KeyError("secret internals")

    @app.get("/api/boom")
    async def boom_ollama():
        raise ZeroDivisionError

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/v1/boom")
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "secret internals" not in r.text and "Traceback" not in r.text
        r = client.get("/api/boom")
        assert r.status_code == 500 and isinstance(r.json()["error"], str)


def test_api_key_and_open_paths():
    app = create_app(failing_loader, ServerSettings(api_key="k"))
    with TestClient(app) as client:
        assert client.get("/").text == "turbofan is running"
        assert client.get("/health").status_code == 503  # open, but the load failed
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer k"}).status_code == 200
        assert client.get("/metrics", headers={"x-api-key": "k"}).status_code == 200
        r = client.get("/api/tags", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_each_app_has_its_own_metrics_registry():
    a, b = create_app(failing_loader, ServerSettings()), create_app(failing_loader, ServerSettings())
    assert a.state.ctx.metrics.registry is not b.state.ctx.metrics.registry


@pytest.mark.parametrize(
    ("origins", "expected"),
    [
        (None, {"allow_origins": [], "allow_origin_regex": LOCAL_ORIGIN_REGEX}),
        (["*"], {"allow_origins": ["*"]}),
        (["https://app.example", " "], {"allow_origins": ["https://app.example"]}),
    ],
)
def test_cors_settings(origins, expected):
    options = ServerSettings(allowed_origins=origins).cors_options()
    for key, value in expected.items():
        assert options[key] == value
    if origins is None:
        import re

        assert re.fullmatch(LOCAL_ORIGIN_REGEX, "http://localhost:3000")
        assert re.fullmatch(LOCAL_ORIGIN_REGEX, "https://127.0.0.1")
        assert not re.fullmatch(LOCAL_ORIGIN_REGEX, "http://localhost.evil.example")


def test_go_templates():
    tpl = "{{- if .System }}<sys>{{ .System }}</sys>\n{{ end -}}\n<user>{{ .Prompt }}</user>{{ .Response }}"
    assert render(tpl, {"System": "s", "Prompt": "p", "Response": ""}) == "<sys>s</sys>\n<user>p</user>"
    assert render(tpl, {"System": "", "Prompt": "p", "Response": ""}) == "<user>p</user>"
    assert render("{{ if .System }}A{{ else }}B{{ end }}", {"System": "", "Prompt": "", "Response": ""}) == "B"
    for bad in ("{{ .Nope }}", "{{ if .System }}x", "{{ end }}", "{{ range .Messages }}{{ end }}"):
        with pytest.raises(TemplateError):
            render(bad, {"System": "", "Prompt": "", "Response": ""})


def test_json_log_lines_carry_extra_fields():
    import json
    import logging

    record = logging.LogRecord("turbofan.requests", logging.INFO, __file__, 1, "request finished", None, None)
    record.request_id = "r1"
    record.output_tokens = 7
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "request finished" and line["request_id"] == "r1" and line["output_tokens"] == 7
    assert line["level"] == "info" and line["logger"] == "turbofan.requests" and "ts" in line


# -- the server reaches an engine only through EngineClient --------------------------------------------------------
class FakeClient:
    """A whole engine as the server sees it: deltas out, nothing else (no runner, scheduler or container)."""

    WORDS = ["Hello", ",", " world", "!"]

    def __init__(self, tokenizer):
        from turbofan.engine import ModelInfo

        self.tokenizer = tokenizer
        self.info = ModelInfo(
            name="fake", root="fake-root", path="/nowhere", max_model_len=64, vocab_size=tokenizer.vocab_size,
            eos_token_ids=(0,), device="cpu", dtype="float32", architecture="Fake", quantization="float32",
            weights_bytes=1000, kv_cache_bytes=24,
        )  # fmt: skip
        self.aborted: list[str] = []
        self.started = self.stopped = False

    async def start(self):
        self.started = True

    async def stop(self):
        self.stopped = True

    dead = None
    num_in_flight = 0

    async def generate(self, prompt, params, request_id):
        import time

        from turbofan.engine import CompletionDelta, RequestDelta, RequestMetrics

        metrics = RequestMetrics(arrival_time=time.time())
        try:
            for i, word in enumerate(self.WORDS):
                last = i == len(self.WORDS) - 1
                outputs = [CompletionDelta(0, word, [10 + i], finish_reason="stop" if last else None)]
                yield RequestDelta(request_id, outputs, last, None, list(prompt), metrics)
        except GeneratorExit:
            self.aborted.append(request_id)
            raise

    def beam_search(self, prompt, params, request_id):
        raise NotImplementedError

    async def abort(self, request_id):
        self.aborted.append(request_id)

    def stats(self):
        from turbofan.engine import EngineStats

        return EngineStats(0, 0, 0.0, 1, 1, 0.0, 0, 0, 0, 0, 0, 0)

    def tiers(self):
        return {"tiering": "off", "tiers": []}

    def profile_table(self):
        return None


def test_any_engine_client_serves_both_apis(tiny_models):
    """create_app takes an EngineClient; both APIs, streaming or not, work from its deltas alone."""
    import json

    from turbofan.engine import EngineClient
    from turbofan.model.tokenizer import Tokenizer

    EngineClient.register(FakeClient)
    fake = FakeClient(Tokenizer(tiny_models["llama"]))
    with TestClient(create_app(fake, ServerSettings(debug_endpoints=True))) as client:
        assert fake.started
        models = client.get("/v1/models").json()["data"]
        assert models[0]["id"] == "fake" and models[0]["root"] == "fake-root" and models[0]["max_model_len"] == 64
        body = {"model": "fake", "prompt": "hi", "max_tokens": 8}
        r = client.post("/v1/completions", json=body).json()
        assert r["choices"][0]["text"] == "Hello, world!" and r["choices"][0]["finish_reason"] == "stop"
        assert r["usage"]["completion_tokens"] == 4
        with client.stream("POST", "/v1/chat/completions", json={
            "model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True},
        }) as s:  # fmt: skip
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        pieces = [c["delta"].get("content", "") for e in events for c in e["choices"]]
        assert "".join(pieces) == "Hello, world!" and pieces[1:5] == FakeClient.WORDS
        assert events[-1]["usage"]["completion_tokens"] == 4
        with client.stream("POST", "/api/generate", json={"model": "fake", "prompt": "hi"}) as s:
            lines = [json.loads(line) for line in s.iter_lines() if line]
        assert [x["response"] for x in lines[:-1]] == FakeClient.WORDS
        assert lines[-1]["done"] and lines[-1]["eval_count"] == 4 and lines[-1]["context"][-4:] == [10, 11, 12, 13]
        r = client.post("/api/chat", json={"model": "fake", "messages": [{"role": "user", "content": "x"}],
                                           "stream": False}).json()  # fmt: skip
        assert r["message"]["content"] == "Hello, world!" and r["done_reason"] == "stop"
        assert client.get("/debug/engine").json()["in_flight"] == 0
        assert client.get("/debug/tiers").json()["tiering"] == "off"
        assert "vllm:request_success_total" in client.get("/metrics").text
    assert fake.stopped


def test_a_loader_builds_the_engine_on_the_engine_thread(tiny_models):
    """All torch work on one thread: libgomp keeps a thread team per thread that ran a parallel region and stops
    spin-waiting once it manages more threads than CPUs (decoding then runs at half speed on 2 cores)."""
    from turbofan.assembly import build_engine
    from turbofan.config import EngineConfig

    where: list[str] = []

    def loader():
        where.append(threading.current_thread().name)
        return build_engine(EngineConfig(model=str(tiny_models["llama"]), num_kv_blocks=64))

    with TestClient(create_app(loader, ServerSettings())) as client:
        body = {"prompt": "hello", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert where == ["turbofan-engine"]
