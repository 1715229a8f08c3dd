"""The operator's views: /debug/profile (the profiling aspect), /debug/profile/torch, /debug/tiers, tier metrics."""

from __future__ import annotations

import threading

import pytest
from test_server import KEY, NAME, chain_model_path, launch


@pytest.fixture(scope="module")
def debug_server(tmp_path_factory):
    tmp_root = tmp_path_factory.mktemp("debug")
    model, _ = chain_model_path(tmp_root)
    srv = launch(
        model, tmp_root / "debug-server.log", "--served-model-name", NAME, "--max-model-len", "256",
        "--num-kv-blocks", "64", "--profile", "--tiering", "on", "--tier-threshold", "1000000",
        "--enable-debug-endpoints", key=KEY,
    )  # fmt: skip
    yield srv
    srv.stop()


def _complete(srv, max_tokens: int = 8, ignore_eos: bool = False) -> dict:
    body = {"model": NAME, "prompt": "hello", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": ignore_eos}
    r = srv.post("/v1/completions", body)
    assert r.status_code == 200, r.text
    return r.json()


def test_profile_table_counts_engine_components(debug_server):
    assert debug_server.get("/debug/profile", headers={"Authorization": "Bearer wrong"}).status_code == 401
    _complete(debug_server)
    rows = debug_server.get("/debug/profile").json()["methods"]
    calls = {(r["component"], r["method"]): r["calls"] for r in rows}
    for key in [("scheduler", "schedule"), ("runner", "execute"), ("sampler", "sample")]:
        assert calls.get(key, 0) > 0, (key, calls)
    assert calls[("scheduler", "schedule")] >= calls[("runner", "execute")]


def test_torch_profile_records_steps_of_a_running_request(debug_server):
    done = threading.Event()

    def long_request():
        _complete(debug_server, max_tokens=120, ignore_eos=True)
        done.set()

    t = threading.Thread(target=long_request)
    t.start()
    r = debug_server.post("/debug/profile/torch?steps=3")
    t.join(60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert 1 <= body["steps"] <= 3
    import os
    import stat

    folder = os.path.dirname(body["trace"])  # a private folder of its own, never a guessable /tmp name
    assert os.path.basename(folder).startswith("turbofan-trace-") and os.path.isfile(body["trace"])
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    ops = {row["op"] for row in body["ops"]}
    assert any("mm" in op or "linear" in op for op in ops), ops
    assert done.is_set()
    assert debug_server.post("/debug/profile/torch?steps=0").status_code == 400


def test_tiers_table_and_metrics(debug_server):
    _complete(debug_server, max_tokens=6, ignore_eos=True)
    tiers = debug_server.get("/debug/tiers").json()
    assert tiers["tiering"] == "on"
    keys = {row["key"]: row for row in tiers["tiers"]}
    assert keys["decode[b=1]"]["calls"] >= 5 and keys["decode[b=1]"]["tier"] == 0
    assert any(k.startswith("prefill[") for k in keys)
    metrics = debug_server.get("/metrics").text
    assert 'turbofan:tier_calls_total{model_name="tiny",tier="0"}' in metrics
    assert "turbofan:compile_seconds_total" in metrics


def test_beam_search_over_http(debug_server):
    body = {"model": NAME, "prompt": "hello", "max_tokens": 4, "n": 2, "use_beam_search": True, "ignore_eos": True}
    r = debug_server.post("/v1/completions", body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert r.json()["usage"]["completion_tokens"] == 8
