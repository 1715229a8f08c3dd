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
