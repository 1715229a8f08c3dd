"""`turbofan serve --replicas N` on Ray Serve: one HTTP endpoint for both APIs over N engines, /metrics from every
replica, prefix affinity (the policy alone, then over Ray), a replica dying mid-request answered in each API's error
format (the ingress alone with a real app behind it, then a real replica killed with SIGKILL mid-stream), and Ray
replacing the dead replica while the endpoint keeps answering."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import ollama
import openai
import pytest
import uvicorn
from test_server import free_port

from turbofan.distributed.affinity import (
    MIN_PREFIX_CHARS,
    AffinityTable,
    prefix_hashes,
    request_prefixes,
)
from turbofan.distributed.ingress import DIED, Ingress
from turbofan.distributed.relay import relay
from turbofan.distributed.replicas import labelled, merge

REPO = Path(__file__).resolve().parents[1]


def test_metrics_of_every_replica_merge_under_one_help_line():
    text = '# HELP t_total Tokens.\n# TYPE t_total counter\nt_total{model="m"} 3.0\nup 1.0\n'
    assert labelled(text, "a")[2:] == ['t_total{replica="a",model="m"} 3.0', 'up{replica="a"} 1.0']
    merged = merge({"a": text, "b": text.replace("3.0", "5.0")}).splitlines()
    assert merged.count("# HELP t_total Tokens.") == 1 and merged.count("# TYPE t_total counter") == 1
    assert 't_total{replica="a",model="m"} 3.0' in merged and 't_total{replica="b",model="m"} 5.0' in merged


SYSTEM = "You are the support desk of a shipping company. Answer in two sentences and quote the order number."
DOC = "Paged attention stores the KV cache in fixed-size blocks, so memory is allocated on demand. " * 4


def chat(system: str, *turns: str) -> bytes:
    """A chat request body: the system prompt, then user and assistant turns alternately."""
    messages = [{"role": "system", "content": system}]
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return json.dumps({"model": "m", "messages": messages}).encode()


def route(table: AffinityTable, body: bytes, loads: dict, path="/v1/chat/completions", threshold=4) -> str:
    """What the ingress and the router do for one request: key it, choose, record."""
    prefixes = request_prefixes(path, body)
    replica = table.choose(prefixes, loads, threshold)
    table.record(prefixes, replica)
    return replica


def test_a_conversation_and_a_system_prompt_stay_on_their_replica_unless_it_is_much_busier():
    table, loads = AffinityTable(rng=random.Random(0)), {"a": 0, "b": 0, "c": 0}
    first = route(table, chat(SYSTEM, "Where is order 1?"), loads)
    loads[first] = 3  # busier than the others, within the threshold
    # the next turns of the conversation, and another conversation behind the same system prompt, follow it
    assert (
        route(
            table, chat(SYSTEM, "Where is order 1?", "It shipped on Monday.", "When does it arrive?"), loads
        )
        == first
    )
    assert route(table, chat(SYSTEM, "Cancel order 7, please."), loads) == first
    # a conversation with another system prompt shares nothing: the least loaded replica
    assert route(table, chat(SYSTEM.replace("shipping", "railway"), "Where is order 1?"), loads) != first
    # more than `threshold` requests above the least loaded: the request goes elsewhere, and back once it is not
    turn3 = chat(
        SYSTEM, "Where is order 1?", "It shipped on Monday.", "When does it arrive?", "Friday.", "Thanks!"
    )
    loads = {"a": 1, "b": 1, "c": 1, first: 6}
    assert route(table, turn3, loads) != first
    table.record(request_prefixes("/v1/chat/completions", turn3), first)
    assert route(table, turn3, {**loads, first: 5}) == first
    # a negative threshold turns affinity off
    assert route(table, turn3, {**loads, first: 1}, threshold=-1) in loads


def test_unkeyed_requests_go_to_the_least_loaded_replica_and_dead_replicas_are_forgotten():
    table = AffinityTable(rng=random.Random(1))
    assert (
        request_prefixes("/v1/chat/completions", chat("Be brief.", "Hi")) == []
    )  # shorter than one KV block
    assert request_prefixes("/v1/embeddings", json.dumps({"input": DOC}).encode()) == []
    assert request_prefixes("/v1/completions", b"{not json") == []
    picks = {table.choose([], {"a": 3, "b": 1, "c": 1}) for _ in range(50)}
    assert picks == {"b", "c"}  # ties broken at random
    keyed = request_prefixes("/v1/completions", json.dumps({"model": "m", "prompt": DOC + "Q1"}).encode())
    table.record(keyed, "gone")  # a replica that died: not among the live ones
    assert table.choose(keyed, {"a": 2, "b": 0}) == "b"


def test_prefix_hashes_follow_the_shared_part_of_prompts_in_every_form():
    assert prefix_hashes("x" * (MIN_PREFIX_CHARS - 1)) == []
    assert len(prefix_hashes("x" * MIN_PREFIX_CHARS)) == 1 and len(prefix_hashes("x" * 1000)) == 4  # 64..512
    assert prefix_hashes("x" * 64, "model-a") != prefix_hashes("x" * 64, "model-b")

    def keys(path: str, **body) -> list[str]:
        return request_prefixes(path, json.dumps({"model": "m", **body}).encode())

    one, two = (
        keys("/v1/completions", prompt=DOC + "Question one?"),
        keys("/v1/completions", prompt=DOC + "Two?"),
    )
    assert len(one) == 3 and one[:3] == two[:3]  # 64, 128 and 256 characters of the document
    assert keys("/v1/completions", prompt=[DOC + "a", "b"])[:3] == one[:3]  # a list of prompts: the first
    ids = keys("/v1/completions", prompt=list(range(100)))
    assert len(ids) >= 2 and ids == keys("/v1/completions", prompt=[list(range(100))])
    generate = keys("/api/generate", system=SYSTEM, prompt="Where is order 1?")
    assert generate and generate != keys("/api/generate", prompt="Where is order 1?")
    # Ollama's and OpenAI's chat render alike; OpenAI's list-of-parts content counts by its text
    parts = [{"type": "text", "text": SYSTEM}]
    openai_chat = keys("/v1/chat/completions", messages=[{"role": "system", "content": parts}])
    assert openai_chat == keys("/api/chat", messages=[{"role": "system", "content": SYSTEM}])


def test_the_table_forgets_the_least_recently_used_prefixes():
    table = AffinityTable(size=4)
    table.record(["h1", "h2"], "a")
    table.record(["h3", "h4"], "b")
    table.record(["h1"], "a")  # used again: kept
    table.record(["h5"], "b")
    assert set(table.where) == {"h3", "h4", "h1", "h5"}


# -- the ingress, without Ray: a real turbofan app behind it, the "replica" made to die mid-request ---------------
class ReplicaDied(Exception):
    """Stands for Ray's RayActorError."""


class Front:
    """The ingress on a loopback port, relaying to one in-process turbofan app; `cut_after` messages into an
    answer the relayed stream fails as a dead replica's does."""

    def __init__(self, model: Path):
        from turbofan.assembly import build_engine
        from turbofan.config import EngineConfig
        from turbofan.server import ServerSettings, create_app

        settings = ServerSettings(served_model_names=["tiny"])
        config = EngineConfig(model=str(model), num_kv_blocks=128)
        self.app = create_app(lambda: build_engine(config), settings)
        self.cut_after: int | None = None
        self.prefixes: list[list[str]] = []
        ingress = Ingress(self.call, lambda e: isinstance(e, ReplicaDied), settings.max_request_bytes, 30.0)

        async def both(
            scope, receive, send
        ):  # the app's lifespan loads the model; requests go through the ingress
            await (self.app if scope["type"] == "lifespan" else ingress)(scope, receive, send)

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(both, host="127.0.0.1", port=self.port, log_config=None))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    async def call(self, scope: dict, body: bytes, prefixes: list[str]):
        self.prefixes.append(prefixes)
        n = 0
        async for message in relay(self.app, scope, body, [(b"x-turbofan-replica", b"r0")]):
            if self.cut_after is not None and n >= self.cut_after:
                raise ReplicaDied("The actor died unexpectedly before finishing this task.")
            n += 1
            yield message

    @property
    def in_flight(self) -> int:
        client = self.app.state.ctx.state.client
        return client.num_in_flight if client is not None else 0


@pytest.fixture(scope="module")
def front(tiny_models):
    f = Front(tiny_models["llama"])
    f.thread.start()
    f.url = f"http://127.0.0.1:{f.port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f.url + "/health", timeout=5).status_code == 200:
                break
        time.sleep(0.2)
    else:
        pytest.fail("the ingress never reported the engine healthy")
    yield f
    f.server.should_exit = True
    f.thread.join(30)


def test_the_ingress_relays_both_apis_and_keys_requests_by_their_prompt(front):
    oai = openai.OpenAI(base_url=front.url + "/v1", api_key="x", max_retries=0)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Where is order 1?"}]
    raw = oai.chat.completions.with_raw_response.create(model="tiny", messages=messages, max_tokens=4)
    assert raw.headers["x-turbofan-replica"] == "r0" and raw.parse().usage.completion_tokens == 4
    assert front.prefixes[-1] == request_prefixes(
        "/v1/chat/completions", {"model": "tiny", "messages": messages}
    )
    assert front.prefixes[-1]  # the system prompt is long enough to be keyed
    assert ollama.Client(host=front.url).generate(model="tiny", prompt="Hi", options={"num_predict": 3}).done
    assert front.prefixes[-1] == []
    bad = httpx.post(
        front.url + "/v1/completions", content=b"{not json", timeout=30
    )  # the app's own 400, relayed
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]


def wait_idle(front: Front) -> None:
    deadline = time.time() + 20
    while front.in_flight and time.time() < deadline:
        time.sleep(0.1)
    assert front.in_flight == 0, "a cut request kept running on the engine"


def test_a_replica_dying_mid_request_ends_it_in_each_api_error_format(front):
    oai = openai.OpenAI(base_url=front.url + "/v1", api_key="x", max_retries=0)
    ol = ollama.Client(host=front.url, timeout=60)
    user = [{"role": "user", "content": "Tell me a long story."}]
    try:
        front.cut_after = 0  # died before answering: a 503 saying so, in each API's shape
        with pytest.raises(openai.InternalServerError) as err:
            oai.chat.completions.create(model="tiny", messages=user, max_tokens=8)
        assert err.value.status_code == 503 and err.value.body["message"] == DIED
        assert err.value.response.headers["retry-after"]
        with pytest.raises(ollama.ResponseError) as oerr:
            ol.generate(model="tiny", prompt="Hi", options={"num_predict": 8})
        assert oerr.value.status_code == 503 and oerr.value.error == DIED

        front.cut_after = 3  # died once the stream had started: a last error event, then the stream's end
        chunks = []
        with pytest.raises(openai.APIError) as err:
            stream = oai.chat.completions.create(
                model="tiny", messages=user, max_tokens=64, stream=True, extra_body={"ignore_eos": True}
            )
            for chunk in stream:
                chunks.append(chunk)
        assert chunks and DIED in str(err.value)
        body = {"model": "tiny", "prompt": "Once", "max_tokens": 64, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", front.url + "/v1/completions", json=body, timeout=30) as r:
            events = [e for e in r.read().decode().split("\n\n") if e]
        assert r.status_code == 200 and len(events) >= 3 and events[-1] == "data: [DONE]"
        assert json.loads(events[-2].removeprefix("data: "))["error"]["message"] == DIED

        front.cut_after = 2
        parts = []
        with pytest.raises(ollama.ResponseError) as oerr:
            for part in ol.chat(model="tiny", messages=user, stream=True, options={"num_predict": 64}):
                parts.append(part)
        assert parts and oerr.value.error == DIED
        body = {"model": "tiny", "prompt": "Once", "stream": True, "options": {"num_predict": 64}}
        with httpx.stream("POST", front.url + "/api/generate", json=body, timeout=30) as r:
            lines = r.read().decode().splitlines()
        assert r.status_code == 200 and json.loads(lines[-1]) == {"error": DIED} and len(lines) >= 2
        wait_idle(front)  # the generations the cut streams were running were aborted
    finally:
        front.cut_after = None
    assert oai.completions.create(model="tiny", prompt="Again", max_tokens=2).usage.completion_tokens == 2


# -- over Ray -------------------------------------------------------------------------------------------------
def replica_pids(root: int) -> list[int]:
    """Ray Serve engine replica processes (their title names the deployment) in the server's process session."""
    out = subprocess.run(["pgrep", "-s", str(os.getsid(root)), "-f", "ServeReplica:turbofan:engine"],
                         capture_output=True, text=True).stdout  # fmt: skip
    return [int(p) for p in out.split()]


def ask(url: str, i: int) -> tuple[int, str | None]:
    """Alternately an OpenAI and an Ollama request; returns the HTTP status and the replica that answered."""
    if i % 2:
        body = {"model": "tiny", "prompt": f"The quick brown fox {i}", "max_tokens": 8, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    else:
        body = {
            "model": "tiny",
            "prompt": f"Paged attention {i}",
            "stream": False,
            "options": {"num_predict": 8},
        }
        r = httpx.post(url + "/api/generate", json=body, timeout=120)
    if r.status_code != 200:  # whatever went wrong, the answer is in the API's own shape
        error = r.json()["error"]
        assert isinstance(error, str) if i % 2 == 0 else isinstance(error["message"], str), r.text
    return r.status_code, r.headers.get("x-turbofan-replica")


@pytest.fixture(scope="module")
def ray_serve(tiny_models, tmp_path_factory):
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'turbofan[ray]'")
    port, log_path = free_port(), tmp_path_factory.mktemp("ray") / "replicas.log"
    cmd = [sys.executable, "-m", "turbofan.cli", "serve", str(tiny_models["llama"]), "--port", str(port),
           "--replicas", "2", "--replica-threads", "1", "--num-kv-blocks", "128", "--served-model-name", "tiny",
           "--enable-debug-endpoints"]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}
    log = log_path.open("w")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if (
                    httpx.get(url + "/health", timeout=5).status_code == 200
                    and len(replica_pids(proc.pid)) == 2
                ):
                    break
            time.sleep(1)
        else:
            pytest.fail("replicas did not become healthy:\n" + log_path.read_text()[-3000:])
        yield url, proc, log_path
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the local Ray it started is left


@pytest.mark.slow
def test_requests_sharing_a_long_prefix_land_on_one_replica_and_hit_its_prefix_cache(ray_serve):
    url = ray_serve[0]
    oai = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    for k in range(
        3
    ):  # three documents: each new one goes to the least loaded replica, its questions follow it
        doc = f"Document {k}. " + DOC
        first = oai.completions.with_raw_response.create(model="tiny", prompt=doc + "Who?", max_tokens=2)
        second = oai.completions.with_raw_response.create(model="tiny", prompt=doc + "Why?", max_tokens=2)
        assert first.headers["x-turbofan-replica"] == second.headers["x-turbofan-replica"]
        assert second.parse().usage.prompt_tokens_details.cached_tokens >= 16  # at least one KV block reused
    turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Where is order 12?"}]
    seen = set()
    for _ in range(3):  # a conversation over Ollama's API: every turn on the replica of the first
        r = httpx.post(url + "/api/chat", json={"model": "tiny", "messages": turns, "stream": False,
                                                "options": {"num_predict": 4}}, timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text
        seen.add(r.headers["x-turbofan-replica"])
        turns += [r.json()["message"], {"role": "user", "content": "And then?"}]
    assert len(seen) == 1


@pytest.mark.slow
def test_two_replicas_answer_32_concurrent_requests_and_a_kill_mid_stream_ends_cleanly(ray_serve):
    url, proc, log_path = ray_serve
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda i: ask(url, i), range(32)))
    assert [status for status, _ in answers] == [200] * 32
    assert len({replica for _, replica in answers}) == 2  # unkeyed requests spread over the least loaded
    time.sleep(7)  # two health-check rounds: each replica has published its metrics
    metrics = httpx.get(url + "/metrics", timeout=30).text
    assert len(set(re.findall(r'replica="([^"]+)"', metrics))) == 2

    # A stream under way, then its replica killed: the stream ends with an error event, not a hang or a cut.
    body = {
        "model": "tiny",
        "prompt": "Once upon a time",
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        victim = int(r.headers["x-turbofan-replica-pid"])
        with ThreadPoolExecutor(8) as pool:
            in_flight = [pool.submit(ask, url, i) for i in range(8)]
            os.kill(victim, signal.SIGKILL)
            killed_at = time.time()
            rest = [line for line in lines if line.startswith("data: ")]
            # in-flight requests end: answered, or (those on the dead replica) a 503 in their API's shape
            statuses = [f.result(timeout=120)[0] for f in in_flight]
    assert json.loads(first.removeprefix("data: "))["choices"]
    assert (
        rest[-1] == "data: [DONE]" and json.loads(rest[-2].removeprefix("data: "))["error"]["message"] == DIED
    )
    assert all(s in (200, 503) for s in statuses), statuses
    assert "Traceback" not in "".join(rest)
    answered_again = None
    while time.time() - killed_at < 60:
        if ask(url, 1)[0] == 200:
            answered_again = time.time() - killed_at
            break
        time.sleep(0.5)
    assert answered_again is not None, "no answer within 60 s of the kill"
    while time.time() - killed_at < 180 and (
        victim in replica_pids(proc.pid) or len(replica_pids(proc.pid)) < 2
    ):
        time.sleep(1)
    assert len(replica_pids(proc.pid)) == 2 and victim not in replica_pids(proc.pid)  # Ray replaced it
    with ThreadPoolExecutor(8) as pool:
        assert [status for status, _ in pool.map(lambda i: ask(url, i), range(8))] == [200] * 8
    print(
        f"answered again {answered_again:.1f} s after the kill; replaced within {time.time() - killed_at:.0f} s"
    )
