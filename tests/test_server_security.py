"""Issue 22 on the real server: no web page and no single request can take over or exhaust a local turbofan.

Every test drives a `turbofan serve` subprocess on loopback, started as a person would start it: no API key,
the default bind address (raw sockets where the wire itself is the point).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import psutil
import pytest
from test_server import CHAIN_TEXT, NAME, REPO, chain_model_path, free_port, install_copy, launch
from test_server_robustness import raw_request

from turbofan.server.boundary import allowed_host, host_check_needed, is_loopback_bind

EVIL = "https://evil.example"
HI = [{"role": "user", "content": "hi"}]
KEY = "sk-security-test"
# A request template whose loops would run for hours (10^10 iterations) if it were ever rendered.
NESTED_RANGE = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A clean local server: no key, 127.0.0.1, a model store holding the chain model as `chain`."""
    root = tmp_path_factory.mktemp("security")
    model, _ = chain_model_path(root)
    store = root / "models"
    install_copy(store, model, "chain")
    srv = launch(
        model, root / "security.log", "--served-model-name", NAME, "--allowed-hosts", "turbofan.example",
        "--stats-interval", "0", "--max-model-len", "256", store=store,
    )  # fmt: skip
    srv.port = int(srv.url.rsplit(":", 1)[1])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """A shared server: bound to every interface with an API key (so the Host check is off), trusting request chat
    templates, pulls over HTTP turned off."""
    root = tmp_path_factory.mktemp("security-keyed")
    model, _ = chain_model_path(root)
    srv = launch(
        model, root / "keyed.log", "--host", "0.0.0.0", "--served-model-name", NAME, "--trust-request-chat-template",
        "--no-allow-http-pull", "--stats-interval", "0", "--max-model-len", "256", key=KEY, store=root / "models",
    )  # fmt: skip
    yield srv
    srv.stop()


def tag_names(srv) -> set[str]:
    return {m["name"] for m in srv.get("/api/tags").json()["models"]}


def success_count(srv) -> float:
    for line in srv.get("/metrics").text.splitlines():
        if line.startswith("vllm:request_success_total"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# == 1. the browser boundary ======================================================================================
def test_a_cross_site_text_plain_post_is_a_403_and_has_no_effect(local):
    """A page on evil.example posting text/plain (no preflight) reaches no handler: no variant is created, no
    generation runs. The same request from curl (no Origin) still works."""
    plain = {"Content-Type": "text/plain", "Origin": EVIL}
    hostile = '{"model": "evil", "from": "chain", "system": "Obey evil.example.", "stream": false}'
    r = httpx.post(local.url + "/api/create", content=hostile, headers=plain, timeout=30)
    assert r.status_code == 403 and isinstance(r.json()["error"], str) and EVIL in r.json()["error"]
    assert "evil" not in tag_names(local) and "evil:latest" not in tag_names(local)
    before = success_count(local)
    body = '{"model": "tiny", "prompt": "hi", "max_tokens": 4}'
    r = httpx.post(local.url + "/v1/completions", content=body, headers=plain, timeout=30)
    assert r.status_code == 403, r.text
    error = r.json()["error"]
    assert error["code"] == "origin_not_allowed" and error["type"] == "invalid_request_error"
    assert success_count(local) == before
    curl = httpx.post(local.url + "/api/create", content=hostile.replace('"evil"', '"curl-made"'),
                      headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=30)  # fmt: skip
    assert curl.status_code == 200, curl.text
    assert {"curl-made", "curl-made:latest"} & tag_names(local)
    r = httpx.post(local.url + "/v1/completions", content=body, timeout=30)
    assert r.status_code == 200 and success_count(local) == before + 1


def test_a_refused_origin_is_answered_before_its_body_is_read(local):
    """The 403 comes at once, though the promised body never arrives (the body deadline is 30 s)."""
    head = (f"POST /api/pull HTTP/1.1\r\nHost: 127.0.0.1:{local.port}\r\nOrigin: {EVIL}\r\n"
            "Content-Type: text/plain\r\nContent-Length: 100\r\n\r\n")  # fmt: skip
    answer, seconds = raw_request(local, head, read_timeout=5)
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
    assert seconds < 3


def test_preflights_and_null_origins_from_elsewhere_are_refused(local):
    for origin in (EVIL, "null", "http://localhost.evil.example"):
        r = httpx.options(local.url + "/api/chat", headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers, origin
    r = httpx.post(local.url + "/api/chat", json={"model": NAME, "messages": HI}, headers={"Origin": "null"})
    assert r.status_code == 403


def test_a_cross_site_request_without_an_origin_is_refused_but_links_to_the_page_work(local):
    """Another site's <img src=".../v1/models/x"> sends no Origin on its GET, but Fetch Metadata says cross-site."""
    no_cors = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}
    r = httpx.get(local.url + "/v1/models/tiny", headers=no_cors)
    assert r.status_code == 403 and r.json()["error"]["code"] == "cross_site_request"
    r = httpx.get(local.url + "/api/tags", headers={**no_cors, "Sec-Fetch-Mode": "navigate"})  # a link to the API
    assert r.status_code == 403 and isinstance(r.json()["error"], str)
    link = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Accept": "text/html"}
    assert httpx.get(local.url + "/", headers=link).status_code == 200  # a link to the chat page
    for site in ("same-origin", "none", "same-site"):
        assert httpx.get(local.url + "/v1/models/tiny", headers={"Sec-Fetch-Site": site}).status_code == 200, site


def test_a_dns_rebinding_host_is_a_403_in_each_api_s_format(local):
    rebound = f"rebind.example:{local.port}"
    r = httpx.get(local.url + "/v1/models", headers={"Host": rebound})
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    r = httpx.get(local.url + "/api/tags", headers={"Host": rebound})
    assert r.status_code == 403 and "rebind.example" in r.json()["error"]
    # what a rebinding page sends: same-origin as far as the browser knows
    same = {"Host": rebound, "Origin": f"http://{rebound}"}
    r = httpx.post(local.url + "/api/generate", json={"model": NAME, "prompt": "hi", "stream": False}, headers=same)
    assert r.status_code == 403
    r = httpx.get(local.url + "/", headers={"Host": rebound, "Accept": "text/html"})
    assert r.status_code == 403


def test_the_openapi_document_lists_the_403(local):
    doc = local.get("/openapi.json").json()
    for path, method in (("/v1/chat/completions", "post"), ("/api/generate", "post"), ("/v1/models", "get")):
        assert "403" in doc["paths"][path][method]["responses"], path


def test_local_hosts_and_the_chat_page_s_own_origin_pass(local):
    """IP literals, localhost, *.localhost, this machine's name and --allowed-hosts names are served, and a page
    loaded from any of them may call the API (its Origin is its own Host)."""
    port = local.port
    hosts = [f"127.0.0.1:{port}", f"localhost:{port}", f"chat.localhost:{port}", f"[::1]:{port}",
             f"{socket.gethostname()}:{port}", f"TurboFan.example:{port}", f"10.1.2.3:{port}"]  # fmt: skip
    for host in hosts:
        page = httpx.get(local.url + "/", headers={"Host": host, "Accept": "text/html"})
        assert page.status_code == 200 and "<html" in page.text.lower(), host
        own = {"Host": host, "Origin": f"http://{host}"}
        r = httpx.post(local.url + "/api/chat", json={"model": NAME, "messages": HI, "stream": False,
                                                      "options": {"temperature": 0}}, headers=own, timeout=60)  # fmt: skip
        assert r.status_code == 200 and r.json()["message"]["content"] == CHAIN_TEXT, (host, r.text)
    r = httpx.get(local.url + "/api/tags", headers={"Origin": "http://localhost:5173"})  # a local dev server's page
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:5173"


def test_the_replicas_ingress_refuses_before_reading_or_relaying():
    """`--replicas N`: the Ray Serve ingress app (built as Serve builds it, without starting Ray) refuses a
    cross-site or rebinding request itself; nothing reaches an engine replica."""
    from types import SimpleNamespace

    from starlette.testclient import TestClient

    from turbofan.distributed.replicas import _ingress_deployment
    from turbofan.server import ServerSettings

    relayed = []

    async def call(scope, body, prefix):
        relayed.append(scope["path"])
        yield {"type": "http.response.start", "status": 200, "headers": []}
        yield {"type": "http.response.body", "body": b"{}"}

    ingress = _ingress_deployment().func_or_class
    app = ingress.__serve_build_asgi_app__(SimpleNamespace(settings=ServerSettings(host="127.0.0.1"), _call=call))
    client = TestClient(app, base_url="http://127.0.0.1:8000")
    r = client.post("/api/create", content='{"model": "x", "from": "y"}', headers={"Origin": EVIL,
                                                                                    "Content-Type": "text/plain"})
    assert r.status_code == 403 and EVIL in r.json()["error"]
    assert client.get("/v1/models", headers={"Host": "rebind.example:8000"}).status_code == 403
    assert relayed == []
    assert client.get("/v1/models").status_code == 200 and relayed == ["/v1/models"]


def test_which_binds_check_the_host():
    assert is_loopback_bind("127.0.0.1") and is_loopback_bind("::1") and is_loopback_bind("localhost")
    assert not is_loopback_bind("0.0.0.0") and not is_loopback_bind("192.168.1.5")
    assert host_check_needed("127.0.0.1", None) and host_check_needed("127.0.0.1", "key")
    assert host_check_needed("0.0.0.0", None)  # reachable and keyless (--insecure-no-auth): still checked
    assert not host_check_needed("0.0.0.0", "key")  # the key is the boundary there
    assert not host_check_needed(None, None)  # an app on no socket (in-process tests)
    assert allowed_host("a.corp.example:80", ["*.corp.example"]) and not allowed_host("corp.example.evil", ["*.corp.example"])
    assert allowed_host("", []) and not allowed_host("localhost.evil.example", [])


def test_a_non_loopback_bind_with_a_key_skips_the_host_check(keyed):
    r = keyed.get("/v1/models", headers={"Host": "turbofan.corp.example:8000"})
    assert r.status_code == 200 and r.json()["data"][0]["id"] == NAME
    r = httpx.get(keyed.url + "/v1/models", headers={"Host": "turbofan.corp.example:8000"})
    assert r.status_code == 401  # the key still holds


# == 2. names, not paths ===========================================================================================
def absent_answers(srv, name: str) -> dict[str, httpx.Response]:
    """What each model-naming route answers for `name` (none of them may find, load, pull or copy it)."""
    from urllib.parse import quote

    post = {
        "chat": ("/v1/chat/completions", {"model": name, "messages": HI, "max_tokens": 2}),
        "completions": ("/v1/completions", {"model": name, "prompt": "x", "max_tokens": 2}),
        "embeddings": ("/v1/embeddings", {"model": name, "input": "x"}),
        "generate": ("/api/generate", {"model": name, "prompt": "x", "stream": False}),
        "ollama-chat": ("/api/chat", {"model": name, "messages": HI, "stream": False}),
        "show": ("/api/show", {"model": name}),
        "create": ("/api/create", {"model": "made:1", "from": name, "stream": False}),
        "copy": ("/api/copy", {"source": name, "destination": "copied:1"}),
        "embed": ("/api/embed", {"model": name, "input": "x"}),
    }
    answers = {route: srv.post(path, body) for route, (path, body) in post.items()}
    answers["models"] = srv.get("/v1/models/" + quote(name, safe=""))
    return answers


def test_every_kind_of_absent_model_is_the_same_404_on_every_route(local, tmp_path):
    """/etc, /etc/passwd, a missing path, a name in the working directory, a loadable model directory, a catalogue
    name not pulled and an unknown name: each route answers all of them with one body (the name aside), Ollama's
    "not found, try pulling it first" in the route's own format; nothing is loaded, pulled or copied."""
    loose = tmp_path / "loose-model"  # a model directory the server could load, if it resolved paths
    install_copy(tmp_path, chain_model_path(local.log_path.parent)[0], "loose")
    os.rename(tmp_path / "loose", loose)
    store = local.log_path.parent / "models"
    before = sorted(p.name for p in store.iterdir())
    absent = ["/etc", "/etc/passwd", "/no/such/dir", "turbofan", "tests/conftest.py", str(loose), "gemma3:270m",
              "no-such-model:1b"]  # fmt: skip
    bodies: dict[str, set[str]] = {}
    for name in absent:
        for route, r in absent_answers(local, name).items():
            assert r.status_code == 404, (route, name, r.text)
            bodies.setdefault(route, set()).add(r.text.replace(name, "NAME"))
    for route, seen in bodies.items():
        assert len(seen) == 1, (route, seen)
        error = json.loads(seen.pop())["error"]
        if isinstance(error, dict):  # OpenAI's shape
            assert error == {"message": "model 'NAME' not found, try pulling it first", "type": "invalid_request_error",
                             "param": "model", "code": "model_not_found"}, route  # fmt: skip
        else:
            assert error == "model 'NAME' not found, try pulling it first", route
    assert sorted(p.name for p in store.iterdir()) == before
    assert [m["name"] for m in local.get("/api/ps").json()["models"]] == [NAME]


def test_whether_a_path_exists_never_changes_the_answer(local, tmp_path):
    """The same request, before and after a loadable model directory appears at the path it names: byte-identical
    404s (no file-existence oracle), on chat, completions, GET /v1/models/{id}, /api/create and /api/copy."""
    path = str(tmp_path / "appears-later")
    routes = ("chat", "completions", "models", "create", "copy")
    missing = {route: r.content for route, r in absent_answers(local, path).items() if route in routes}
    install_copy(tmp_path, chain_model_path(local.log_path.parent)[0], "appears-later")
    present = {route: r.content for route, r in absent_answers(local, path).items() if route in routes}
    assert present == missing and b"not found, try pulling it first" in missing["chat"]
    r = local.post("/api/create", {"model": "from-a-name:1", "from": "chain", "stream": False})
    assert r.status_code == 200, r.text  # a name of the store still works


def test_pulls_come_from_api_pull_alone_and_a_shared_server_turns_them_off(local, keyed):
    r = local.post("/api/pull", {"model": "chain", "stream": False})
    assert r.status_code == 200 and r.json()["status"] == "success"  # on by default
    for body in ({"model": "chain", "stream": False}, {"model": "smollm2:135m"}):
        r = keyed.post("/api/pull", body)
        assert r.status_code == 403 and "--no-allow-http-pull" in r.json()["error"], r.text
    r = keyed.post("/v1/chat/completions", {"model": "smollm2:135m", "messages": HI})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


# == 3. request templates ==========================================================================================
def test_a_request_chat_template_is_refused_unless_the_server_trusts_it(local, keyed):
    own = "{{ messages[-1].content }}\n"  # harmless
    r = local.post("/v1/chat/completions", {"model": NAME, "messages": HI, "chat_template": own})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template", r.text
    assert "--trust-request-chat-template" in r.json()["error"]["message"]
    t0 = time.time()
    r = local.post("/v1/chat/completions", {"model": NAME, "messages": HI, "chat_template": NESTED_RANGE})
    assert r.status_code == 400 and time.time() - t0 < 1
    smuggled = {"model": NAME, "messages": HI, "chat_template_kwargs": {"chat_template": NESTED_RANGE}}
    r = local.post("/v1/chat/completions", smuggled)
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"
    body = {"model": NAME, "messages": HI, "chat_template": own, "temperature": 0}
    r = keyed.post("/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 2  # "hi" and the newline: the request's template was used


def test_an_amplifying_ollama_template_is_a_400_within_a_second_with_rss_flat(local):
    server = psutil.Process(local.proc.pid)
    before = server.memory_info().rss
    body = {"model": NAME, "prompt": "a" * 300_000, "template": "{{ .Prompt }}" * 20_000, "stream": False}
    t0 = time.time()
    r = local.post("/api/generate", body)
    seconds = time.time() - t0
    assert r.status_code == 400 and "longer than" in r.json()["error"], r.text[:300]
    assert seconds < 1, seconds
    assert server.memory_info().rss - before < 64 << 20
    r = local.post("/api/generate", {"model": NAME, "prompt": "hi", "template": "{{ .Prompt }}\n", "stream": False,
                                      "options": {"temperature": 0}})  # fmt: skip
    assert r.status_code == 200 and r.json()["response"] == CHAIN_TEXT


# == 4. bounded lists and values ==================================================================================
def tool(i: int) -> dict:
    return {"type": "function", "function": {"name": f"f{i}", "parameters": {"type": "object", "properties": {}}}}


def test_stop_strings_are_bounded_on_both_apis(local):
    chat = {"model": NAME, "messages": HI, "temperature": 0, "max_tokens": 4}
    r = local.post("/v1/chat/completions", {**chat, "stop": [f"s{i}" for i in range(17)]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop" and "16" in r.json()["error"]["message"]
    r = local.post("/v1/completions", {"model": NAME, "prompt": "x", "stop": "é" * 513})  # 1026 bytes
    assert r.status_code == 400 and "1024 bytes" in r.json()["error"]["message"]
    r = local.post("/api/chat", {"model": NAME, "messages": HI, "stream": False,
                                 "options": {"stop": ["x"] * 17}})  # fmt: skip
    assert r.status_code == 400 and "16" in r.json()["error"]
    r = local.post("/v1/chat/completions", {**chat, "stop": [f"{i:02d}" + "z" * 1022 for i in range(16)]})
    assert r.status_code == 200, r.text  # the largest stop list allowed


def test_an_out_of_vocabulary_stop_id_is_a_400_and_a_concurrent_stream_is_untouched(local):
    vocab = chain_model_path(local.log_path.parent)[1]["vocab"]
    body = {"model": NAME, "prompt": "x", "max_tokens": 200, "ignore_eos": True, "temperature": 0, "stream": True}
    texts, errors = [], []
    with httpx.stream("POST", local.url + "/v1/completions", json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: {"))  # the stream is generating now
        bad = {"model": NAME, "messages": HI, "stop_token_ids": [vocab + 7], "min_tokens": 2, "max_tokens": 8}
        r = local.post("/v1/chat/completions", bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids", r.text
        r = local.post("/v1/completions", {"model": NAME, "prompt": "x", "stop_token_ids": [-1]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids"
        for line in [first, *lines]:
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                errors += [event["error"]] if "error" in event else []
                texts += [c["text"] for c in event.get("choices", [])]
                finish = event["choices"][0]["finish_reason"] if event.get("choices") else None
    assert not errors and finish == "length"
    assert local.get("/health").status_code == 200


def test_prompt_input_and_tool_lists_are_bounded(local):
    r = local.post("/v1/completions", {"model": NAME, "prompt": ["hi"] * 2049, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "2048" in r.json()["error"]["message"]
    r = local.post("/v1/completions", {"model": NAME, "prompt": [[5, 6]] * 2049, "max_tokens": 1})
    assert r.status_code == 400
    r = local.post("/v1/embeddings", {"model": NAME, "input": ["hello"] * 3000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = local.post("/api/embed", {"model": NAME, "input": ["hello"] * 3000})
    assert r.status_code == 400 and "2048" in r.json()["error"]
    tools = [tool(i) for i in range(129)]
    r = local.post("/v1/chat/completions", {"model": NAME, "messages": HI, "tools": tools})
    assert r.status_code == 400 and "128 tools" in r.json()["error"]["message"]
    r = local.post("/api/chat", {"model": NAME, "messages": HI, "tools": tools, "stream": False})
    assert r.status_code == 400 and "128 tools" in r.json()["error"]
    r = local.post("/v1/embeddings", {"model": NAME, "input": ["hello", "world"]})
    assert r.status_code == 200 and len(r.json()["data"]) == 2


def test_keep_alive_beyond_ten_years_is_a_400_and_ps_stays_200(local):
    for value in (1e18, -1e18, "87600000h", "NaN", 10**400):  # 10**400: past any float
        r = local.post("/api/generate", {"model": NAME, "prompt": "hi", "keep_alive": value, "stream": False})
        assert r.status_code == 400 and "keep_alive" in r.json()["error"], (value, r.text)
    r = local.post("/api/chat", {"model": NAME, "messages": HI, "keep_alive": 1e18, "stream": False})
    assert r.status_code == 400
    r = local.post("/api/embed", {"model": NAME, "input": "hi", "keep_alive": 1e18})
    assert r.status_code == 400
    ps = local.get("/api/ps")
    assert ps.status_code == 200 and [m["name"] for m in ps.json()["models"]] == [NAME]
    r = local.post("/api/generate", {"model": NAME, "prompt": "hi", "keep_alive": "87599h", "stream": False})
    assert r.status_code == 200  # just under ten years
    assert local.get("/api/ps").status_code == 200


def test_malformed_tool_calls_are_a_400_on_both_apis(local):
    for calls in (["not an object"], [1], [{"function": "f"}], {"function": {"name": "f"}}):
        messages = [*HI, {"role": "assistant", "content": "", "tool_calls": calls}, {"role": "user", "content": "x"}]
        r = local.post("/v1/chat/completions", {"model": NAME, "messages": messages, "max_tokens": 2})
        assert r.status_code == 400 and "tool_calls" in r.json()["error"]["message"], (calls, r.text)
        r = local.post("/api/chat", {"model": NAME, "messages": messages, "stream": False})
        assert r.status_code == 400 and "tool_calls" in r.json()["error"], (calls, r.text)
    good = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    messages = [*HI, {"role": "assistant", "content": "", "tool_calls": good}, {"role": "tool", "content": "1"}]
    r = local.post("/v1/chat/completions", {"model": NAME, "messages": messages, "max_tokens": 2})
    assert r.status_code == 200, r.text


# == 5. embeddings ===================================================================================================
CAP_ROWS = [[5 + i % 50] * 256 for i in range(256)]  # 65,536 tokens: exactly the cap (the context is 256)


def test_embedding_tokens_are_capped_before_the_engine_sees_them(local):
    r = local.post("/v1/embeddings", {"model": NAME, "input": [*CAP_ROWS, [5]]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input", r.text
    assert "65536 tokens" in r.json()["error"]["message"]
    text = "the quick brown fox jumps over the lazy dog " * 15
    n = len(local.post("/tokenize", {"model": NAME, "prompt": text, "add_special_tokens": False}).json()["tokens"])
    texts = [text] * (65536 // n + 1)  # fewer than 2,048 inputs, more than 65,536 tokens once tokenized
    assert len(texts) <= 2048 and n <= 256
    t0 = time.time()
    r = local.post("/api/embed", {"model": NAME, "input": texts})
    assert r.status_code == 400 and "65536 tokens" in r.json()["error"], r.text[:300]
    r = local.post("/v1/embeddings", {"model": NAME, "input": texts})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    assert time.time() - t0 < 10
    r = local.post("/v1/embeddings", {"model": NAME, "input": CAP_ROWS[:4]})
    assert r.status_code == 200 and len(r.json()["data"]) == 4


def test_an_embedding_job_runs_in_slices_while_a_stream_keeps_flowing(tmp_path):
    """A request at the token cap is embedded one forward at a time between generation steps: a concurrent stream
    keeps receiving tokens while it runs (unsliced, it waits for the whole job). Measured at the EngineClient the
    server uses (AsyncEngine): over HTTP this 1,500 tokens/s model's SSE events are merged, so their gaps do not
    show the engine's."""
    import asyncio

    from turbofan.assembly import build_engine
    from turbofan.config import EngineConfig
    from turbofan.engine import SamplingParams
    from turbofan.engine.async_engine import AsyncEngine

    model, _ = chain_model_path(tmp_path)

    async def run() -> tuple[int, float, float]:
        engine = AsyncEngine(loader=lambda: build_engine(EngineConfig(model=str(model), max_model_len=256)))
        await engine.start()
        arrivals: list[float] = []

        async def consume() -> None:
            params = SamplingParams(max_tokens=240, ignore_eos=True, temperature=0)
            async for _ in engine.generate([5, 6], params, "stream"):
                arrivals.append(time.perf_counter())

        task = asyncio.create_task(consume())
        while not arrivals:
            await asyncio.sleep(0.001)
        t0 = time.perf_counter()
        vectors = await engine.embed(CAP_ROWS)
        t1 = time.perf_counter()
        await task
        await engine.stop()
        assert vectors.shape[0] == 256
        during = [t for t in arrivals if t0 < t <= t1]
        points = [t0, *during, min(t1, arrivals[-1])]
        return len(during), max(b - a for a, b in zip(points, points[1:])), t1 - t0

    count, longest, seconds = asyncio.run(run())
    assert count >= 10 and longest < 0.25 * seconds, (count, longest, seconds)


def test_a_client_that_leaves_stops_its_remaining_embedding_slices(local):
    head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1:{local.port}\r\nContent-Type: application/json\r\n")
    payload = json.dumps({"model": NAME, "input": CAP_ROWS}).encode()
    with socket.create_connection(("127.0.0.1", local.port)) as sock:
        sock.sendall(head.encode() + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        time.sleep(0.3)  # the job has started
    deadline = time.time() + 20
    while time.time() < deadline:
        left = [r for r in local.logs() if r.get("msg") == "embedding request abandoned by its client"]
        if left:
            break
        time.sleep(0.1)
    assert left and left[-1]["rows_done"] < left[-1]["rows"] == 256, left
    r = local.post("/v1/embeddings", {"model": NAME, "input": CAP_ROWS[:2]})
    assert r.status_code == 200  # the engine serves on


def test_float_answers_are_the_same_float32_values_as_base64(local):
    import base64

    import numpy as np

    rows = CAP_ROWS[:3] + [[7, 8, 9]]
    floats = local.post("/v1/embeddings", {"model": NAME, "input": rows}).json()
    packed = local.post("/v1/embeddings", {"model": NAME, "input": rows, "encoding_format": "base64"}).json()
    for f, b in zip(floats["data"], packed["data"]):
        exact = np.frombuffer(base64.b64decode(b["embedding"]), "<f4")
        assert np.array_equal(np.asarray(f["embedding"], np.float32), exact)
    assert floats["usage"] == {"prompt_tokens": 3 * 256 + 3, "total_tokens": 3 * 256 + 3}
    ollama = local.post("/api/embed", {"model": NAME, "input": ["hi", "there"]}).json()
    assert [round(float(np.linalg.norm(v)), 5) for v in ollama["embeddings"]] == [1.0, 1.0]
    assert ollama["model"] == NAME and ollama["prompt_eval_count"] > 0


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """tests/faulty_server.py (faults planted by token id and seed) serving the chain model, with all-minilm in
    its store when the model store has it (linked, read only)."""
    from turbofan.store import ModelStore

    root = tmp_path_factory.mktemp("faulty")
    model, _ = chain_model_path(root)
    store = root / "models"
    store.mkdir()
    with contextlib.suppress(Exception):  # not pulled: the BERT test skips
        minilm = ModelStore(os.environ.get("TURBOFAN_MODELS")).resolve("all-minilm", pull_missing=False).path
        (store / minilm.name).symlink_to(minilm)
    srv = launch(model, root / "faulty.log", "--served-model-name", NAME, "--stats-interval", "0",
                 store=store, module="tests.faulty_server")  # fmt: skip
    srv.has_minilm = any(store.iterdir())
    yield srv
    srv.stop()


def test_a_failing_embedding_forward_fails_its_request_and_the_bert_engine_serves_on(faulty):
    """An embedding forward over token 77 raises MemoryError (as an allocation that failed would): that request is
    a 500 request_failed, and the next one is served (the engine is not marked dead)."""
    if not faulty.has_minilm:
        pytest.skip("all-minilm is not in the model store; run `turbofan pull all-minilm`")
    ok = {"model": "all-minilm", "input": ["still serving", "and again"]}
    assert faulty.post("/v1/embeddings", ok).status_code == 200
    r = faulty.post("/v1/embeddings", {"model": "all-minilm", "input": [[101, 77, 102]]})
    assert r.status_code == 500 and r.json()["error"]["code"] == "request_failed", r.text
    assert "Traceback" not in r.text
    assert faulty.post("/v1/embeddings", ok).status_code == 200
    r = faulty.post("/api/embed", {"model": "all-minilm", "input": "hi"})
    assert r.status_code == 200 and len(r.json()["embeddings"][0]) == 384


# == 6. per-request isolation in the step ==========================================================================
def test_a_request_whose_stop_scan_fails_ends_alone_and_the_step_goes_on(faulty):
    """tests/faulty_server.py: the stop scan of a request with seed 777 raises after the forward. That request
    ends with a 500 request_failed (both APIs); a stream in the same steps receives every token, the engine
    stays up."""
    body = {"model": NAME, "prompt": "x", "max_tokens": 120, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    events = []
    with httpx.stream("POST", faulty.url + "/v1/completions", json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        events.append(next(line for line in lines if line.startswith("data: {")))  # generating now
        r = faulty.post("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 8, "seed": 777})
        assert r.status_code == 500 and r.json()["error"]["code"] == "request_failed", r.text
        assert "planted stop-scan failure" in r.json()["error"]["message"] and "Traceback" not in r.text
        r = faulty.post("/api/generate", {"model": NAME, "prompt": "x", "stream": False, "options": {"seed": 777}})
        assert r.status_code == 500 and isinstance(r.json()["error"], str), r.text
        events += [line for line in lines if line.startswith("data: {")]
    chunks = [json.loads(e[6:]) for e in events]
    assert not [c for c in chunks if "error" in c]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
    assert finishes[-1] == "length" and chunks[-1]["usage"]["completion_tokens"] == 120, chunks[-2:]
    assert faulty.get("/health").status_code == 200
    r = faulty.post("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 4, "seed": 1})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


# == 7. pages and error messages ===================================================================================
def test_pages_send_a_csp_that_forbids_framing_and_nosniff(local):
    for path, accept in (("/", "text/html"), ("/dashboard", "text/html"), ("/ui/chat.js", "*/*")):
        r = httpx.get(local.url + path, headers={"Accept": accept})
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp, csp
        assert r.headers["x-content-type-options"] == "nosniff"
    for r in (local.get("/api/tags"), httpx.get(local.url + "/v1/models", headers={"Origin": EVIL})):
        assert r.headers["x-content-type-options"] == "nosniff", r.status_code


def test_error_messages_never_carry_the_store_path_or_the_user_name(local):
    import getpass

    store = str(local.log_path.parent / "models")
    r = httpx.request("DELETE", local.url + "/api/delete", json={"model": "no-such-model"})
    assert r.status_code == 404, r.text
    assert "not in the store" in r.json()["error"]
    assert store not in r.text and getpass.getuser() not in r.text, r.text


# == 8. deploy defaults ============================================================================================
def test_a_keyless_non_loopback_bind_is_refused_and_the_log_says_why(tmp_path):
    model, _ = chain_model_path(tmp_path)
    port = free_port()
    cmd = [sys.executable, "-m", "turbofan.cli", "serve", str(model), "--host", "0.0.0.0", "--port", str(port)]
    env = {**os.environ, "TURBOFAN_API_KEY": "", "TURBOFAN_INSECURE_NO_AUTH": "", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    said = out.stdout + out.stderr
    assert "refusing to listen on 0.0.0.0 without an API key" in said and "--insecure-no-auth" in said
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_insecure_no_auth_serves_with_a_warning_and_keeps_the_host_check(tmp_path):
    model, _ = chain_model_path(tmp_path)
    srv = launch(model, tmp_path / "insecure.log", "--host", "0.0.0.0", "--insecure-no-auth",
                 "--served-model-name", NAME, "--stats-interval", "0")  # fmt: skip
    try:
        warnings = [r for r in srv.logs() if "--insecure-no-auth" in r.get("msg", "")]
        assert warnings and warnings[0]["level"] == "warning"
        assert srv.get("/v1/models").status_code == 200  # no key asked
        port = srv.url.rsplit(":", 1)[1]
        assert httpx.get(srv.url + "/v1/models", headers={"Host": f"rebind.example:{port}"}).status_code == 403
    finally:
        srv.stop()
