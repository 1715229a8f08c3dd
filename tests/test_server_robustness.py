"""Issue 8 on the real server: one request never takes it down, nothing a client sends can stall it.

Every test drives a `turbofan serve` subprocess over loopback (raw sockets where the wire itself is the point:
oversized, stalled or half-sent requests).
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_server import CHAIN_TEXT, NAME, chain_model_path, launch

KV_TOKENS = 256  # 16 blocks of 16


@pytest.fixture(scope="module")
def robust(tmp_path_factory):
    """A tiny KV cache (the model's 512-token context does not fit), short read timeouts, debug routes on."""
    root = tmp_path_factory.mktemp("robust")
    model, _ = chain_model_path(root)
    srv = launch(
        model, root / "robust.log", "--served-model-name", NAME, "--num-kv-blocks", "16", "--max-num-seqs", "8",
        "--header-timeout", "1", "--body-timeout", "1", "--enable-debug-endpoints", "--stats-interval", "0",
    )  # fmt: skip
    yield srv
    srv.stop()


def wait_all_free(srv, timeout: float = 10.0) -> dict:
    deadline = time.time() + timeout
    while True:
        stats = srv.get("/debug/engine").json()
        idle = stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["in_flight"] == 0
        if idle and stats["num_free_blocks"] == stats["num_blocks"]:
            return stats
        assert time.time() < deadline, stats
        time.sleep(0.05)


def raw_request(srv, head: str, body: bytes = b"", read_timeout: float = 10.0) -> tuple[bytes, float]:
    """Send a request head (and body) on a fresh socket; (the bytes answered until close, seconds taken)."""
    host, port = srv.url.removeprefix("http://").split(":")
    t0 = time.time()
    with socket.create_connection((host, int(port)), timeout=read_timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # answered and closed before all was sent
            sock.sendall(head.encode() + body)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks), time.time() - t0


# == KV capacity =================================================================================================
def test_context_is_capped_to_the_kv_cache_and_logged(robust):
    assert robust.get("/v1/models").json()["data"][0]["max_model_len"] == KV_TOKENS
    capped = [r for r in robust.logs() if "does not fit the KV cache" in r.get("msg", "")]
    assert capped and capped[0]["max_model_len_wanted"] == 512 and capped[0]["max_model_len"] == KV_TOKENS


def test_a_3000_token_request_is_a_400_naming_the_numbers(robust):
    r = robust.post("/v1/completions", {"model": NAME, "prompt": [5] * 3000, "max_tokens": 4})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert f"{KV_TOKENS} tokens" in message and "3000 tokens" in message
    r = robust.post("/api/generate", {"model": NAME, "prompt": "hi " * 3000, "stream": False})
    assert r.status_code == 400 and str(KV_TOKENS) in r.json()["error"]
    assert robust.get("/health").status_code == 200


def test_concurrent_requests_that_overflow_the_cache_all_complete(robust):
    before = robust.get("/metrics").text
    body = {"model": NAME, "prompt": [5, 6, 7] * 10, "max_tokens": 150, "ignore_eos": True, "temperature": 1.5}

    def complete(i: int) -> dict:
        r = robust.post("/v1/completions", {**body, "seed": i})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    with ThreadPoolExecutor(8) as pool:  # 8 x 180 tokens wanted, 256 in the cache
        choices = list(pool.map(complete, range(8)))
    assert all(c["finish_reason"] == "length" for c in choices)
    assert "preemptions" in before and _metric(robust, "vllm:num_preemptions_total") > 0
    wait_all_free(robust)


def _metric(srv, name: str) -> float:
    for line in srv.get("/metrics").text.splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


# == limits: body size, read timeouts, tokenization off the event loop ==========================================
def test_a_40_mb_body_is_refused_at_once_while_health_stays_fast(robust):
    head = ("POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {40 << 20}\r\n\r\n")  # fmt: skip
    answer, seconds = raw_request(robust, head, b'{"prompt": "' + b"a" * (1 << 20))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert seconds < 2 and b"--max-request-bytes" in answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "413"
    # no Content-Length: counted as it arrives, refused once past the limit, never buffered whole
    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(40):
            yield b"a" * (1 << 20)
        yield b'"}'

    t0 = time.time()
    try:
        r = httpx.post(robust.url + "/api/generate", content=chunks(), timeout=30)
        assert r.status_code == 413 and "limit" in r.json()["error"]
    except httpx.HTTPError:  # the server answered and closed while the client was still sending: also refused
        pass
    assert time.time() - t0 < 10
    assert robust.get("/health").status_code == 200


def test_health_answers_fast_while_a_long_prompt_tokenizes(robust):
    prompt = "the quick brown fox jumps over the lazy dog " * 30_000  # 1.3 MB: under the limit, seconds to encode
    result: dict = {}
    idle = []
    for _ in range(10):
        t0 = time.time()
        httpx.get(robust.url + "/health", timeout=5)
        idle.append(time.time() - t0)
    idle.sort()

    def send():
        t0 = time.time()
        r = robust.post("/v1/completions", {"model": NAME, "prompt": prompt, "max_tokens": 1})
        result.update(status=r.status_code, seconds=time.time() - t0)

    sender = threading.Thread(target=send)
    sender.start()
    times = []
    time.sleep(0.3)  # the body is in; tokenization has begun
    while sender.is_alive() and len(times) < 200:
        t0 = time.time()
        assert httpx.get(robust.url + "/health", timeout=5).status_code == 200
        times.append(time.time() - t0)
        time.sleep(0.02)
    sender.join(120)
    assert result["status"] == 400  # far over the context, answered after tokenizing
    assert len(times) >= 5, (times, result)  # health was polled while the prompt was being tokenized
    # On the event loop the encode would hold /health for its whole duration (seconds). Off it, /health answers
    # in well under 100 ms on a quiet machine; on a shared 2-core box at load 8-10 the OS scheduling alone costs
    # more, so the bound is relative to /health's own idle latency measured just before.
    times.sort()
    median = times[len(times) // 2]
    assert median < max(0.1, 3 * idle[5]) and times[-1] < result["seconds"] / 4, (idle[5], median, times[-5:], result)


def test_a_stalled_body_gets_408_and_a_stalled_head_is_closed(robust):
    head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    answer, seconds = raw_request(robust, head, b'{"prompt": ')
    assert answer.startswith(b"HTTP/1.1 408") and 0.9 < seconds < 4, (answer[:120], seconds)
    answer, seconds = raw_request(robust, "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line: never ends
    assert answer == b"" and 0.9 < seconds < 4, (answer, seconds)
    assert robust.get("/health").status_code == 200


# == liberal parsing: JSON whatever the Content-Type, invalid Unicode a 400 ======================================
def test_curl_style_bodies_are_json(robust):
    form = {"Content-Type": "application/x-www-form-urlencoded"}  # what `curl -d` sends
    gen = {"model": NAME, "prompt": "hi", "stream": False, "options": {"temperature": 0}}
    r = httpx.post(robust.url + "/api/generate", content=json.dumps(gen), headers=form, timeout=30)
    assert r.status_code == 200 and r.json()["done"] is True, r.text
    chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "stream": False}
    r = httpx.post(robust.url + "/api/chat", content=json.dumps(chat), headers=form, timeout=30)
    assert r.status_code == 200 and r.json()["message"]["role"] == "assistant", r.text
    r = httpx.post(robust.url + "/api/chat", content=json.dumps({**chat, "stream": True}), timeout=30)  # no type
    assert r.status_code == 200 and json.loads(r.text.splitlines()[-1])["done"] is True
    r = httpx.post(robust.url + "/v1/chat/completions", content=json.dumps(chat), headers=form, timeout=30)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    r = httpx.post(robust.url + "/api/generate", content=b"model=tiny&prompt=hi", headers=form, timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = httpx.post(robust.url + "/v1/completions", content=b"model=tiny&prompt=hi", headers=form, timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


SURROGATE_ROUTES = [
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}'),
    ("/v1/completions", '{"model": "tiny", "prompt": "\\udc00"}'),
    ("/tokenize", '{"model": "tiny", "prompt": "x\\uDBFF"}'),
    ("/api/generate", '{"model": "tiny", "prompt": "\\ud800", "stream": false}'),
    ("/api/chat", '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}'),
]


@pytest.mark.parametrize("path,body", SURROGATE_ROUTES)
def test_lone_surrogates_are_a_400_in_the_api_s_format(robust, path, body):
    r = httpx.post(robust.url + path, content=body.encode(), headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    message = error if path.startswith("/api/") else error["message"]
    assert "surrogate" in message


def test_invalid_utf8_is_a_400_and_real_pairs_and_escaped_backslashes_pass(robust):
    r = httpx.post(robust.url + "/v1/completions", content=b'{"model": "tiny", "prompt": "\xff\xfe"}', timeout=30)
    assert r.status_code == 400 and "UTF-8" in r.json()["error"]["message"]
    for text in ('"\\ud83d\\ude00"', '"\\\\ud800"'):  # an emoji as a surrogate pair; a literal backslash + "ud800"
        body = f'{{"model": "tiny", "prompt": {text}, "max_tokens": 2}}'.encode()
        r = httpx.post(robust.url + "/v1/completions", content=body, timeout=30)
        assert r.status_code == 200, r.text


# == validation names its field ==================================================================================
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize(
    "change,param,needle",
    [
        ({"temperature": 1e9}, "temperature", "less than or equal to 2"),
        ({"temperature": -0.5}, "temperature", "greater than or equal to 0"),
        ({"logit_bias": {"5": 1000}}, "logit_bias.5", "less than or equal to 100"),
        ({"seed": 2**70}, "seed", "less than 9223372036854775808"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role", "'system', 'developer', 'user'"),
        ({"messages": [{"role": "user", "content": None}]}, "messages.0", "needs content"),
        ({"use_beam_search": True, "best_of": 1000}, "best_of", "at most 10"),
        ({"presence_penalty": 5}, "presence_penalty", "[-2, 2]"),
        ({"n": 0}, "n", "greater than or equal to 1"),
    ],
)
def test_validation_names_its_field(robust, change, param, needle):
    r = robust.post("/v1/chat/completions", {**CHAT, **change})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and needle in error["message"], error


def test_roles_openai_accepts(robust):
    messages = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": []}, {"role": "user", "content": "again"}]  # fmt: skip
    r = robust.post("/v1/chat/completions", {**CHAT, "messages": messages})
    assert r.status_code == 200, r.text


# == debug routes ================================================================================================
def test_torch_profile_on_an_idle_server_returns_after_its_timeout(robust):
    t0 = time.time()
    r = robust.post("/debug/profile/torch?steps=3&timeout=1")
    assert r.status_code == 200 and r.json()["steps"] == 0 and time.time() - t0 < 5, r.text


# == failures: isolated to their request, or the process exits for a supervisor ==================================
@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """tests/faulty_server.py: token 77 in a forward raises; seed 666 breaks the scheduler's bookkeeping."""
    root = tmp_path_factory.mktemp("faulty")
    model, _ = chain_model_path(root)
    srv = launch(
        model, root / "faulty.log", "--served-model-name", NAME, "--max-model-len", "256",
        "--enable-debug-endpoints", "--stats-interval", "0", module="tests.faulty_server",
    )  # fmt: skip
    yield srv
    srv.stop()


def test_a_failing_request_ends_with_an_error_and_the_server_goes_on(faulty):
    import openai

    client = openai.OpenAI(base_url=faulty.url + "/v1", api_key="none", max_retries=0)

    def good() -> str:  # greedy chat on the chain model: never feeds token 77
        reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], temperature=0)
        return reply.choices[0].message.content

    assert good() == CHAIN_TEXT
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=NAME, prompt=[5, 77, 6], max_tokens=8)
    assert "planted forward failure" in e.value.body["message"] and e.value.body["code"] == "request_failed"
    assert good() == CHAIN_TEXT  # the engine goes on, unchanged
    # streaming: the error arrives as an event on the stream, then [DONE]
    with httpx.stream("POST", faulty.url + "/v1/completions",
                      json={"model": NAME, "prompt": [77], "stream": True}, timeout=30) as r:  # fmt: skip
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 500 or json.loads(events[-2])["error"]["code"] == "request_failed"
    r = faulty.post("/api/generate", {"model": NAME, "context": [77], "prompt": "x", "stream": False})
    assert r.status_code == 500 and "planted forward failure" in r.json()["error"]
    assert faulty.get("/health").json() == {"status": "ok"}
    wait_all_free(faulty)


def test_a_broken_invariant_stops_the_engine_and_the_process_exits_non_zero(faulty):
    r = faulty.post("/v1/completions", {"model": NAME, "prompt": [5, 6], "max_tokens": 4, "seed": 666})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    assert faulty.proc.wait(30) == 1
    assert any("engine loop failed" in rec.get("msg", "") for rec in faulty.logs())


# == graceful shutdown ===========================================================================================
def test_sigterm_lets_a_running_stream_finish_refuses_new_work_and_exits_0(tmp_path_factory):
    root = tmp_path_factory.mktemp("sigterm")
    model, _ = chain_model_path(root)
    srv = launch(model, root / "sigterm.log", "--served-model-name", NAME, "--max-model-len", "512",
                 "--stats-interval", "0")  # fmt: skip
    try:
        assert srv.get("/debug/engine").status_code == 404  # debug routes are off unless asked for
        body = {"model": NAME, "prompt": [5], "max_tokens": 500, "ignore_eos": True, "stream": True}
        texts, refused = [], []
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    break
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            late = httpx.post(srv.url + "/v1/completions", json={"model": NAME, "prompt": "hi"}, timeout=10)
            refused.append((late.status_code, late.headers.get("retry-after"), late.json()["error"]["message"]))
            for line in lines:
                if line.startswith("data: {"):
                    texts.append(json.loads(line[6:])["choices"][0])
        assert texts[-1]["finish_reason"] == "length"
        assert refused[0][0] == 503 and refused[0][1] and "shutting down" in refused[0][2]
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop()
