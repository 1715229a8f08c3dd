"""The HTTP server, end to end: a real `turbofan serve` subprocess on loopback, driven by the real `openai` and
`ollama` clients (and raw httpx where the wire format itself is the point).

The model is a tiny llama rewired into a *chain*: every layer's output projection is zeroed, so the last hidden
state is the current token's embedding, and the LM head maps each chain token to the next one with a logit of
30 (everything else stays near 0). Greedy decoding after the chat template's final newline therefore always
says exactly CHAIN_TEXT ("你好，世界。", with "界" split across two byte-level tokens) and then EOS — so the
tests can assert exact texts, token counts, logprobs and stop behaviour, and the Chinese stream exercises the
incremental UTF-8 decoder. A high temperature makes it random again for the seed and n>1 tests.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-turbofan-test"
CHAIN_TEXT = "你好，世界。"
NAME = "tiny"
THREADS = os.environ.get("TURBOFAN_TEST_THREADS", "1")  # see conftest: OpenMP spinning on a shared box


# -- the chain model ----------------------------------------------------------------------------------------------
def build_chain_model(path: Path) -> dict:
    """Returns facts the tests need: the chain's token ids, eos, vocab size."""
    import torch
    from safetensors.torch import load_file, save_file
    from tiny_models import build_tiny_model
    from tokenizers import Tokenizer

    if not (path / "chain.json").exists():
        build_tiny_model(path, "llama")
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        config = json.loads((path / "config.json").read_text())
        eos = config["eos_token_id"]
        newline = tok.token_to_id("Ċ")  # byte-level BPE's "\n": the chat template's last token
        chain = [newline, *tok.encode(CHAIN_TEXT).ids, eos]
        assert len(set(chain)) == len(chain), chain
        sd = load_file(str(path / "model.safetensors"))
        for key in sd:
            if key.endswith(("o_proj.weight", "down_proj.weight")):
                sd[key] = torch.zeros_like(sd[key])
        sd["model.norm.weight"] = torch.ones_like(sd["model.norm.weight"])
        emb = sd["model.embed_tokens.weight"]
        h = emb * torch.rsqrt(emb.pow(2).mean(-1, keepdim=True) + config["rms_norm_eps"])
        head = torch.zeros_like(sd["lm_head.weight"])
        for cur, nxt in zip(chain, chain[1:]):
            head[nxt] += h[cur] * (30.0 / h[cur].dot(h[cur]))
        sd["lm_head.weight"] = head
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
        (path / "chain.json").write_text(json.dumps({"chain": chain, "eos": eos, "vocab": tok.get_vocab_size()}))
    return json.loads((path / "chain.json").read_text())


# -- servers as subprocesses --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: Path
    key: str | None
    health_seen: list = field(default_factory=list)  # (status code, body) while starting
    during_loading: dict = field(default_factory=dict)  # a request sent while the model was loading

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, headers={**self.headers(), **kw.pop("headers", {})}, timeout=60, **kw)

    def post(self, path: str, body=None, **kw) -> httpx.Response:
        headers = {**self.headers(), **kw.pop("headers", {})}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=60, **kw)

    def logs(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def install_copy(store_root: Path, model: Path, name: str) -> Path:
    """Put a copy of `model` into a model store as `name` (what `turbofan pull` leaves behind)."""
    import shutil

    from turbofan.store import ModelStore
    from turbofan.store.store import describe_hf_dir

    target = ModelStore(store_root).path_for(name)
    if not target.exists():
        shutil.copytree(model, target)
        describe_hf_dir(target, name, f"local:{model}").write(target)
    return target


def launch(
    model: Path | str,
    log_path: Path,
    *flags: str,
    key: str | None = None,
    probe_loading: bool = False,
    store: Path | None = None,
    module: str = "turbofan.cli",
    ready_timeout: float = 180,
) -> Server:
    """`turbofan serve` in a subprocess; returns once /health says ok. `store`: its TURBOFAN_MODELS; `module`: what
    `python -m` runs (a test's wrapper around turbofan.cli)."""
    port = free_port()
    cmd = [sys.executable, "-m", module, "serve", str(model), "--port", str(port), *flags]
    if key:
        cmd += ["--api-key", key]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TURBOFAN_API_KEY": "", "OMP_NUM_THREADS": THREADS}
    if store is not None:
        env["TURBOFAN_MODELS"] = str(store)
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path, key)
    atexit.register(server.stop)
    deadline = time.time() + ready_timeout
    prober: threading.Thread | None = None
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            r = httpx.get(server.url + "/health", timeout=5)
        except httpx.HTTPError:
            time.sleep(0.05)
            continue
        server.health_seen.append((r.status_code, r.json()))
        if r.status_code == 200:
            break
        if probe_loading and prober is None:
            prober = threading.Thread(target=_request_while_loading, args=(server,), daemon=True)
            prober.start()
        time.sleep(0.05)
    else:
        server.stop()
        raise RuntimeError(f"server did not become healthy:\n{log_path.read_text()[-3000:]}")
    if prober is not None:
        prober.join(60)
    return server


def _request_while_loading(server: Server) -> None:
    t0 = time.time()
    r = server.post("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}]})
    server.during_loading.update(status=r.status_code, body=r.json(), seconds=time.time() - t0)


_SERVERS: dict[str, Server] = {}
_MODEL: dict[str, object] = {}


def chain_model_path(tmp_root: Path) -> tuple[Path, dict]:
    if "path" not in _MODEL:
        path = tmp_root / "chain-llama"
        _MODEL["facts"] = build_chain_model(path)
        _MODEL["path"] = path
    return _MODEL["path"], _MODEL["facts"]


def main_server(tmp_root: Path) -> Server:
    """The shared server: API key on, two served names, a small KV cache, default CORS."""
    if "main" not in _SERVERS:
        model, _ = chain_model_path(tmp_root)
        _SERVERS["main"] = launch(
            model,
            tmp_root / "main-server.log",
            "--served-model-name", NAME, "tiny-alias",
            "--max-model-len", "128",
            "--num-kv-blocks", "160",
            "--stats-interval", "1",
            "--enable-debug-endpoints",
            key=KEY,
            probe_loading=True,
            store=tmp_root / "models",
        )  # fmt: skip
    return _SERVERS["main"]


@pytest.fixture(scope="session")
def chain(tmp_root) -> dict:
    return chain_model_path(tmp_root)[1]


@pytest.fixture(scope="session")
def server(tmp_root) -> Server:
    srv = main_server(tmp_root)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def busy_server(tmp_root) -> Server:
    """One sequence at a time, one waiting at most, no key, any origin: for queue-full and CORS '*'."""
    model, _ = chain_model_path(tmp_root)
    srv = launch(
        model,
        tmp_root / "busy-server.log",
        "--max-num-seqs", "1",
        "--max-waiting", "1",
        "--max-model-len", "256",
        "--allowed-origins", "*",
        "--stats-interval", "0",
        "--enable-debug-endpoints",
        store=tmp_root / "busy-models",
    )  # fmt: skip
    yield srv
    srv.stop()


@pytest.fixture()
def oai(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture()
def aoai(server):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture()
def ollama_client(server):
    import ollama

    return ollama.Client(host=server.url, headers={"Authorization": f"Bearer {KEY}"})


HI = [{"role": "user", "content": "hi"}]


def assert_serving(server: Server) -> None:
    r = server.post("/v1/chat/completions", {"model": NAME, "messages": HI, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == CHAIN_TEXT


# == startup and health ==========================================================================================
def test_health_reports_loading_then_ok_and_early_requests_wait(server):
    statuses = [s for s, _ in server.health_seen]
    assert (503, {"status": "loading"}) in server.health_seen, server.health_seen
    assert statuses[-1] == 200 and server.health_seen[-1][1] == {"status": "ok"}
    assert statuses.index(200) > statuses.index(503)
    early = server.during_loading
    assert early.get("status") == 200, early
    assert early["body"]["choices"][0]["message"]["content"] == CHAIN_TEXT


def test_root_and_health_need_no_key(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.text == "turbofan is running"
    assert httpx.head(server.url + "/").status_code == 200
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


# == OpenAI: models, chat ========================================================================================
def test_models_list_and_retrieve(oai):
    models = oai.models.list()
    assert [m.id for m in models.data] == [NAME, "tiny-alias"]
    assert models.data[0].object == "model"
    assert models.data[0].model_extra["max_model_len"] == 128
    assert oai.models.retrieve("tiny-alias").id == "tiny-alias"


def test_responses_match_the_protocol_models(server):
    from turbofan.server import protocol

    r = server.post("/v1/chat/completions", {"model": NAME, "messages": HI, "logprobs": True, "top_logprobs": 1})
    protocol.ChatCompletionResponse.model_validate(r.json(), strict=False)
    body = {"model": NAME, "messages": HI, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=server.headers()) as resp:
        events = [json.loads(x[6:]) for x in resp.iter_lines() if x.startswith("data: {")]
    for event in events:
        protocol.ChatCompletionChunk.model_validate(event)
    r = server.post("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 2, "logprobs": 1, "echo": True})
    protocol.CompletionResponse.model_validate(r.json())
    protocol.ModelList.model_validate(server.get("/v1/models").json())


def test_chat_completion_shape_and_usage(oai, server):
    r = oai.chat.completions.create(model=NAME, messages=HI, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == NAME
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == CHAIN_TEXT
    assert choice.finish_reason == "stop" and choice.index == 0
    count = server.post("/tokenize", {"model": NAME, "messages": HI}).json()["count"]
    assert r.usage.prompt_tokens == count
    assert r.usage.completion_tokens == 8  # seven text tokens and EOS
    assert r.usage.total_tokens == count + 8


def test_model_alias_and_absent_model_are_accepted(server):
    for body in ({"model": "tiny-alias"}, {}):
        r = server.post("/v1/chat/completions", {**body, "messages": HI, "temperature": 0})
        assert r.status_code == 200, r.text


def test_chat_stream_equals_non_stream_and_has_no_replacement_chars(oai):
    full = oai.chat.completions.create(model=NAME, messages=HI, temperature=0)
    stream = oai.chat.completions.create(
        model=NAME, messages=HI, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert all("\ufffd" not in d for d in deltas), deltas
    assert "".join(deltas) == full.choices[0].message.content == CHAIN_TEXT
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_wire_format_ends_with_done(server):
    body = {"model": NAME, "messages": HI, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=server.headers()) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert "usage" not in json.loads(lines[0][6:])  # no usage key unless include_usage


def test_async_client_stream_and_non_stream(aoai):
    async def go():
        full = await aoai.chat.completions.create(model=NAME, messages=HI, temperature=0)
        stream = await aoai.chat.completions.create(model=NAME, messages=HI, temperature=0, stream=True)
        text = ""
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        return full.choices[0].message.content, text

    full, streamed = asyncio.run(go())
    assert full == streamed == CHAIN_TEXT


def test_n_greater_than_one(oai, chain):
    flat = {str(t): -30 for t in chain["chain"]}  # cancels the chain's +30 logits: sampling at temperature 2 is random
    r = oai.chat.completions.create(
        model=NAME, messages=HI, n=3, temperature=2.0, seed=11, max_tokens=6, logit_bias=flat,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 18
    assert len({c.message.content for c in r.choices}) > 1  # random, independent samples
    stream = oai.chat.completions.create(model=NAME, messages=HI, n=3, temperature=0, stream=True)
    texts = {0: "", 1: "", 2: ""}
    finished = set()
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1, 2}
    assert set(texts.values()) == {CHAIN_TEXT}


def test_seed_reproducibility(oai):
    def sample(seed: int) -> str:
        r = oai.completions.create(
            model=NAME, prompt="The quick", temperature=2.0, seed=seed, max_tokens=12, extra_body={"ignore_eos": True}
        )
        return r.choices[0].text

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_stop_strings_and_stop_token_ids(oai, chain):
    r = oai.chat.completions.create(model=NAME, messages=HI, temperature=0, stop=["世"])
    assert r.choices[0].message.content == "你好，"
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == "世"
    r = oai.chat.completions.create(
        model=NAME, messages=HI, temperature=0, stop="世", extra_body={"include_stop_str_in_output": True}
    )
    assert r.choices[0].message.content == "你好，世"
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in oai.chat.completions.create(model=NAME, messages=HI, temperature=0, stop=["界"], stream=True)
        if c.choices
    )
    assert streamed == "你好，世"
    comma = chain["chain"][3]
    r = oai.chat.completions.create(model=NAME, messages=HI, temperature=0, extra_body={"stop_token_ids": [comma]})
    assert r.choices[0].message.content == "你好，"  # vLLM keeps a stop token's text unless it is special
    assert r.choices[0].model_extra["stop_reason"] == comma


def test_max_tokens_and_max_completion_tokens(oai):
    r = oai.chat.completions.create(model=NAME, messages=HI, temperature=0, max_tokens=3)
    assert (r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens) == ("你好，", "length", 3)
    r = oai.chat.completions.create(model=NAME, messages=HI, temperature=0, max_completion_tokens=2)
    assert r.choices[0].message.content == "你好"


def test_vllm_extra_sampling_params(oai):
    r = oai.chat.completions.create(
        model=NAME, messages=HI, temperature=0, max_tokens=12, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    r = oai.chat.completions.create(
        model=NAME, messages=HI, temperature=0, max_tokens=20, extra_body={"min_tokens": 10}
    )
    assert r.usage.completion_tokens >= 10  # EOS is suppressed until min_tokens
    r = oai.chat.completions.create(
        model=NAME,
        messages=HI,
        temperature=0.7,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        seed=1,
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "repeat_last_n": 8},
    )
    assert r.choices[0].finish_reason in ("stop", "length")


def test_logit_bias(oai, chain):
    good = chain["chain"][2]  # 好
    r = oai.chat.completions.create(
        model=NAME, messages=HI, temperature=0, max_tokens=4, logit_bias={str(good): 100}
    )
    assert r.choices[0].message.content == "好" * 4


def test_chat_logprobs(oai):
    r = oai.chat.completions.create(model=NAME, messages=HI, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    first = content[0]
    assert first.token == "你" and first.logprob > -0.01 and first.bytes == list("你".encode())
    assert len(first.top_logprobs) == 3 and first.top_logprobs[0].token == "你"
    assert first.top_logprobs[0].logprob >= first.top_logprobs[1].logprob >= first.top_logprobs[2].logprob
    stream = oai.chat.completions.create(
        model=NAME, messages=HI, temperature=0, logprobs=True, top_logprobs=2, stream=True
    )
    streamed = [lp for c in stream if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert [x.token for x in streamed] == [x.token for x in content]


# == OpenAI: completions =========================================================================================
def test_completion_prompt_forms(oai, server):
    ids = server.post("/tokenize", {"model": NAME, "prompt": "The quick"}).json()["tokens"]
    as_text = oai.completions.create(model=NAME, prompt="The quick", temperature=0, max_tokens=5)
    as_ids = oai.completions.create(model=NAME, prompt=ids, temperature=0, max_tokens=5)
    assert as_text.object == "text_completion" and as_text.id.startswith("cmpl-")
    assert as_text.choices[0].text == as_ids.choices[0].text
    assert as_text.usage.prompt_tokens == len(ids)
    many = oai.completions.create(model=NAME, prompt=["The quick", "Paged"], temperature=0, max_tokens=5, n=2)
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]
    assert many.choices[0].text == as_text.choices[0].text
    many_ids = oai.completions.create(model=NAME, prompt=[ids, ids], temperature=0, max_tokens=5)
    assert [c.text for c in many_ids.choices] == [as_text.choices[0].text] * 2
    assert many_ids.usage.prompt_tokens == 2 * len(ids)


def test_completion_stream_equals_non_stream(oai):
    full = oai.completions.create(model=NAME, prompt=["The quick", "Paged"], temperature=0, max_tokens=8)
    stream = oai.completions.create(
        model=NAME, prompt=["The quick", "Paged"], temperature=0, max_tokens=8, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    texts = {0: "", 1: ""}
    usage = None
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
        usage = chunk.usage or usage
    assert [texts[0], texts[1]] == [c.text for c in sorted(full.choices, key=lambda c: c.index)]
    assert usage.completion_tokens == full.usage.completion_tokens


def test_completion_echo_logprobs_for_lm_eval(oai, chain):
    prompt = chain["chain"][:5]  # "\n你好，世": each token is the previous one's certain successor
    for max_tokens in (0, 1):
        r = oai.completions.create(
            model=NAME, prompt=[prompt], echo=True, max_tokens=max_tokens, logprobs=1, temperature=0, seed=1234
        )
        lp = r.choices[0].logprobs
        assert len(lp.token_logprobs) == len(prompt) + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert all(x > -0.01 for x in lp.token_logprobs[1:]), lp.token_logprobs
        assert "".join(lp.tokens[: len(prompt)]).endswith("你好，世")
        ctxlen = 1  # lm-eval's parse_logprobs: continuation = tokens[ctxlen:-1], greedy if each is the top one
        continuation = lp.token_logprobs[ctxlen:-1]
        tops = lp.top_logprobs[ctxlen:-1]
        assert all(tok == max(top.values()) for tok, top in zip(continuation, tops))
        assert r.choices[0].text.startswith("\n你好，世")
    r = oai.completions.create(model=NAME, prompt="The quick", max_tokens=3, logprobs=2, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 3 and len(lp.text_offset) == 3 and all(len(t) >= 2 for t in lp.top_logprobs)


def test_tokenize_detokenize_version(server, chain):
    r = server.post("/tokenize", {"model": NAME, "prompt": CHAIN_TEXT, "return_token_strs": True}).json()
    assert r["tokens"] == chain["chain"][1:-1] and r["count"] == len(r["tokens"]) and r["max_model_len"] == 128
    assert server.post("/detokenize", {"model": NAME, "tokens": r["tokens"]}).json() == {"prompt": CHAIN_TEXT}
    assert server.post("/v1/tokenize", {"prompt": "x"}).status_code == 200
    version = server.get("/version").json()["version"]
    assert re.match(r"\d+\.\d+", version)


# == errors ======================================================================================================
BAD_REQUESTS = [
    ("/v1/chat/completions", {"model": NAME, "messages": HI, "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"model": NAME, "messages": HI, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"model": NAME, "messages": HI, "n": 0}, 400, "n"),
    ("/v1/chat/completions", {"model": NAME, "messages": HI, "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": NAME, "messages": HI, "max_tokens": 500}, 400, "128"),
    ("/v1/chat/completions", {"model": NAME, "messages": HI, "logprobs": True, "top_logprobs": 99}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"model": NAME, "messages": HI, "top_logprobs": 2}, 400, "logprobs"),
    ("/v1/chat/completions", {"model": NAME, "messages": HI, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"model": NAME, "messages": HI, "stop_token_ids": "x"}, 400, "stop_token_ids"),
    ("/v1/chat/completions", {"model": NAME, "messages": HI, "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"model": NAME, "messages": HI, "logit_bias": {"99999": 1}}, 400, "vocabulary"),
    ("/v1/chat/completions", {"model": NAME, "messages": HI, "use_beam_search": True}, 400, "beam"),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": NAME}, 400, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"content": "no role"}]}, 400, "role"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "image_url"),  # fmt: skip
    ("/v1/chat/completions", {"model": "gpt-4", "messages": HI}, 404, "gpt-4"),
    ("/v1/completions", {"model": NAME, "prompt": "hi " * 200}, 400, "128"),
    ("/v1/completions", {"model": NAME, "prompt": [5, 999999]}, 400, "vocabulary"),
    ("/v1/completions", {"model": NAME, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": [[]]}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "suffix": "x"}, 400, "suffix"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": {"a": 1}}, 400, "prompt"),
    ("/detokenize", {"model": NAME, "tokens": [-1]}, 400, "vocabulary"),
    ("/tokenize", {"model": NAME}, 400, "prompt"),
    ("/v1/nope", {}, 404, "/v1/nope"),
]


@pytest.mark.parametrize(("path", "body", "status", "needle"), BAD_REQUESTS, ids=[f"{p}-{n}" for p, _, _, n in BAD_REQUESTS])
def test_bad_openai_requests(server, path, body, status, needle):
    r = server.post(path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle in err["message"] or needle == err["param"], err
    assert "Traceback" not in r.text


def test_invalid_json_and_wrong_method(server):
    r = httpx.post(
        server.url + "/v1/chat/completions", content=b"{not json", headers={**server.headers(), "content-type": "application/json"}
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = server.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]
    r = server.post("/api/nope", {})
    assert r.status_code == 404 and isinstance(r.json()["error"], str)
    assert_serving(server)


def test_openai_sdk_raises_typed_errors(oai):
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="nope", messages=HI)
    assert "nope" in e.value.message
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=NAME, messages=HI, temperature=-3)


def test_server_still_serves_after_bad_input(server):
    for path, body, _, _ in BAD_REQUESTS[:8]:
        server.post(path, body)
    assert_serving(server)


# == auth and CORS ===============================================================================================
def test_api_key_is_enforced(server):
    from openai import AuthenticationError, OpenAI

    for path in ("/v1/models", "/metrics", "/version", "/api/tags"):
        r = httpx.get(server.url + path)
        assert r.status_code == 401, path
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(server.url + "/api/chat", json={"model": NAME, "messages": HI})
    assert r.status_code == 401 and isinstance(r.json()["error"], str)
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_cors_default_allows_localhost_pages_only(server):
    def preflight(origin: str) -> httpx.Response:
        return httpx.options(
            server.url + "/v1/chat/completions",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )

    ok = preflight("http://localhost:5173")
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == "http://localhost:5173"
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    assert preflight("http://127.0.0.1:8080").headers.get("access-control-allow-origin") == "http://127.0.0.1:8080"
    bad = preflight("https://evil.example")
    assert "access-control-allow-origin" not in bad.headers
    r = server.get("/v1/models", headers={"Origin": "http://localhost:3000"})
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    r = server.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_star_by_flag(busy_server):
    r = httpx.options(
        busy_server.url + "/api/generate",
        headers={"Origin": "https://anywhere.example", "Access-Control-Request-Method": "POST"},
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


# == Ollama ======================================================================================================
def test_ollama_generate(ollama_client, server):
    r = ollama_client.generate(model=NAME, prompt="hi", options={"temperature": 0})
    assert r.response == CHAIN_TEXT and r.done and r.done_reason == "stop"
    assert r.eval_count == 8 and r.prompt_eval_count > 0
    for d in (r.total_duration, r.prompt_eval_duration, r.eval_duration, r.load_duration):
        assert isinstance(d, int) and d >= 0
    assert r.total_duration >= r.eval_duration > 0
    assert r.context and len(r.context) == r.prompt_eval_count + r.eval_count
    parts = list(ollama_client.generate(model=NAME, prompt="hi", options={"temperature": 0}, stream=True))
    assert "".join(p.response for p in parts) == CHAIN_TEXT
    assert all(not p.done for p in parts[:-1]) and parts[-1].done and parts[-1].eval_count == 8
    with httpx.stream("POST", server.url + "/api/generate", json={"model": NAME, "prompt": "hi"}, headers=server.headers()) as resp:
        assert resp.headers["content-type"].startswith("application/x-ndjson")  # streaming is the default
        lines = [json.loads(line) for line in resp.iter_lines() if line]
    assert lines[-1]["done"] is True and "created_at" in lines[0]


def test_ollama_logprobs(ollama_client):
    r = ollama_client.generate(model=NAME, prompt="hi", options={"temperature": 0}, logprobs=True, top_logprobs=2)
    assert len(r.logprobs) == r.eval_count
    assert r.logprobs[0].token == "你" and r.logprobs[0].logprob > -0.01
    assert [t.token for t in r.logprobs[0].top_logprobs][:1] == ["你"] and len(r.logprobs[0].top_logprobs) == 2
    parts = list(ollama_client.chat(model=NAME, messages=HI, options={"temperature": 0}, logprobs=True, stream=True))
    assert [lp.token for p in parts for lp in (p.logprobs or [])] == [lp.token for lp in r.logprobs]


def test_ollama_chat(ollama_client):
    r = ollama_client.chat(model=NAME, messages=HI, options={"temperature": 0})
    assert r.message.role == "assistant" and r.message.content == CHAIN_TEXT and r.done_reason == "stop"
    parts = list(ollama_client.chat(model=NAME, messages=HI, options={"temperature": 0}, stream=True))
    assert "".join(p.message.content for p in parts) == CHAIN_TEXT
    assert all("\ufffd" not in p.message.content for p in parts)
    assert parts[-1].done and parts[-1].eval_count == 8


def test_ollama_options(ollama_client):
    r = ollama_client.chat(model=NAME, messages=HI, options={"temperature": 0, "num_predict": 3})
    assert (r.message.content, r.done_reason) == ("你好，", "length")
    r = ollama_client.chat(model=NAME, messages=HI, options={"temperature": 0, "stop": ["世"]})
    assert r.message.content == "你好，"
    opts = {"temperature": 9.0, "seed": 5, "num_predict": 10, "top_k": 100, "top_p": 1.0, "repeat_penalty": 1.0}
    a = ollama_client.generate(model=NAME, prompt="x", options=opts).response
    b = ollama_client.generate(model=NAME, prompt="x", options=opts).response
    assert a == b
    r = ollama_client.generate(
        model=NAME,
        prompt="hi",
        options={"temperature": 0, "num_ctx": 64, "num_predict": 200, "min_p": 0.1, "repeat_last_n": 16,
                 "presence_penalty": 0.1, "frequency_penalty": 0.1, "mirostat": 0},
    )  # fmt: skip
    assert r.done


def test_ollama_system_template_raw_and_load(ollama_client):
    r = ollama_client.generate(model=NAME, prompt="hi", system="be brief", options={"temperature": 0})
    assert r.response == CHAIN_TEXT
    r = ollama_client.generate(
        model=NAME, prompt="hi", template="{{ if .System }}{{ .System }}\n{{ end }}Q: {{ .Prompt }}\n",
        options={"temperature": 0, "num_predict": 7},
    )  # fmt: skip
    assert r.response == CHAIN_TEXT
    r = ollama_client.generate(model=NAME, prompt="raw text\n", raw=True, options={"temperature": 0})
    assert r.response == CHAIN_TEXT
    r = ollama_client.generate(model=NAME, prompt="")
    assert r.done and r.done_reason == "load" and r.response == ""


def test_ollama_metadata_endpoints(ollama_client, server):
    ps = ollama_client.ps()
    assert [m.model for m in ps.models] == [NAME] and ps.models[0].size > 0 and ps.models[0].context_length == 128
    show = ollama_client.show(NAME)
    assert show.details is not None and "<|im_start|>" in (show.template or "")
    assert isinstance(ollama_client.list().models, list)
    assert re.match(r"\d+\.\d+", server.get("/api/version").json()["version"])


def test_ollama_store_endpoints(ollama_client, server, tmp_root):
    model, _ = chain_model_path(tmp_root)
    install_copy(tmp_root / "models", model, "chain-copy:1m")
    names = [m.model for m in ollama_client.list().models]
    assert names[0] == NAME and "chain-copy:1m" in names
    tags = server.get("/api/tags").json()["models"]
    copy = next(m for m in tags if m["name"] == "chain-copy:1m")
    assert copy["size"] > 0 and copy["details"]["family"] == "llama" and copy["details"]["parameter_size"]
    assert copy["digest"] and copy["modified_at"].endswith("Z")
    show = ollama_client.show("chain-copy:1m")
    assert show.details.family == "llama" and show.modelinfo["general.architecture"] == "llama"
    assert show.modelinfo["llama.context_length"] == 512 and "<|im_start|>" in show.template
    served = ollama_client.show(NAME)
    assert served.modelinfo["llama.context_length"] == 128  # the served context, not the config's
    progress = list(ollama_client.pull("chain-copy:1m", stream=True))  # installed already: a no-op pull
    assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
    import ollama

    for path in (str(model), "/etc", "../models", "/no/such/dir"):  # names only: the same answer, exists or not
        with pytest.raises(ollama.ResponseError) as e:
            ollama_client.pull(path)
        assert e.value.status_code == 400 and "invalid model name" in e.value.error
    assert ollama_client.delete("chain-copy:1m").status == "success"
    assert "chain-copy:1m" not in [m.model for m in ollama_client.list().models]

    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.delete("chain-copy:1m")
    assert e.value.status_code == 404


def test_ollama_errors(ollama_client, server):
    import ollama

    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.chat(model="llama3:8b", messages=HI)
    assert e.value.status_code == 404 and "llama3:8b" in e.value.error
    for body, status in (
        ({"prompt": "hi"}, 400),
        ({"model": NAME, "prompt": "hi", "options": {"temperature": "hot"}}, 400),
        ({"model": NAME, "prompt": "hi", "images": ["aGk="]}, 400),
        ({"model": NAME, "prompt": "hi", "format": "yaml"}, 400),
        ({"model": NAME, "prompt": "hi", "format": {"type": "object", "minProperties": "x"}}, 400),
        ({"model": NAME, "prompt": "hi", "template": "{{ .Nope }}"}, 400),
        ({"model": NAME, "prompt": "hi " * 200}, 400),
        ({"model": NAME, "prompt": 5}, 400),
    ):
        r = server.post("/api/generate", {"stream": False, **body})
        assert r.status_code == status, (body, r.text)
        assert isinstance(r.json()["error"], str) and r.json()["error"]
    r = httpx.request("DELETE", server.url + "/api/delete", json={"model": "not-there:1b"}, headers=server.headers())
    assert r.status_code == 404 and isinstance(r.json()["error"], str)
    r = server.post("/api/show", {"model": "not-there:1b"})
    assert r.status_code == 404
    r = server.post("/api/pull", {"model": "not-a-model-anywhere:0b", "stream": False})
    assert r.status_code == 404 and "not-a-model-anywhere:0b" in r.json()["error"]
    lines = [json.loads(x) for x in server.post("/api/pull", {"model": "not-a-model-anywhere:0b"}).text.splitlines()]
    assert lines[0] == {"status": "pulling manifest"} and "not-a-model-anywhere" in lines[-1]["error"]
    assert_serving(server)


# == metrics and logs ============================================================================================
def metric(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        named = line.startswith(name + "{") or line.startswith(name + " ")
        if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_metrics_use_vllm_names(server):
    assert_serving(server)
    text = server.get("/metrics").text
    for name in (
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
        "vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_count", "vllm:time_per_output_token_seconds_count",
        "vllm:inter_token_latency_seconds_count", "vllm:e2e_request_latency_seconds_count",
        "vllm:request_queue_time_seconds_count", "turbofan:kv_cache_free_blocks",
    ):  # fmt: skip
        metric(text, name, model_name=NAME)
    assert metric(text, "vllm:request_success_total", model_name=NAME, finished_reason="stop") >= 1
    assert metric(text, "vllm:e2e_request_latency_seconds_count", model_name=NAME) >= 1
    assert metric(text, "vllm:generation_tokens_total", model_name=NAME) >= 8
    assert "_created" not in text


def test_json_logs_one_line_per_request(server):
    assert_serving(server)
    deadline = time.time() + 5
    while time.time() < deadline:
        finished = [e for e in server.logs() if e.get("msg") == "request finished"]
        stats = [e for e in server.logs() if e.get("msg") == "engine stats"]
        if finished and stats:
            break
        time.sleep(0.2)
    entry = finished[-1]
    for key in ("request_id", "prompt_tokens", "output_tokens", "queue_time", "ttft", "tokens_per_s", "finish_reason"):
        assert key in entry, entry
    assert entry["output_tokens"] == 8 and entry["finish_reason"] == "stop"
    assert {"num_running", "num_waiting", "kv_usage_pct", "rss_mib"} <= set(stats[-1])


# == load, disconnects, queue ====================================================================================
def test_32_concurrent_streams_all_finish(aoai, server):
    async def one(i: int) -> tuple[str, str | None]:
        stream = await aoai.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": f"request {i}"}], temperature=0, stream=True
        )
        text, reason = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(32)))

    results = asyncio.run(all_of_them())
    assert [r for r in results] == [(CHAIN_TEXT, "stop")] * 32
    wait_idle(server)


def wait_idle(server: Server, timeout: float = 10.0) -> dict:
    deadline = time.time() + timeout
    while True:
        d = server.get("/debug/engine").json()
        if (d["num_running"], d["num_waiting"], d["in_flight"]) == (0, 0, 0) and d["num_free_blocks"] == d["num_blocks"]:
            return d
        if time.time() > deadline:
            raise AssertionError(f"engine not idle: {d}")
        time.sleep(0.05)


def test_disconnect_mid_stream_frees_everything(server):
    body = {"model": NAME, "messages": HI, "max_tokens": 100, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=server.headers()) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert got[0].startswith("data: ")
        busy = server.get("/debug/engine").json()
        assert busy["in_flight"] == 1 and busy["num_free_blocks"] < busy["num_blocks"]
    # leaving the block closed the connection mid-stream
    idle = wait_idle(server)
    text = server.get("/metrics").text
    assert metric(text, "vllm:num_requests_running", model_name=NAME) == 0
    assert metric(text, "turbofan:kv_cache_free_blocks", model_name=NAME) == idle["num_blocks"]
    assert metric(text, "vllm:request_success_total", model_name=NAME, finished_reason="abort") >= 1


def test_disconnect_from_a_multi_prompt_stream_aborts_every_prompt(server):
    body = {"model": NAME, "prompt": ["a", "b", "c"], "max_tokens": 100, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=server.headers()) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert server.get("/debug/engine").json()["in_flight"] == 3
    wait_idle(server)


def test_one_bad_prompt_in_a_batch_fails_the_request_and_leaks_nothing(server):
    r = server.post("/v1/completions", {"model": NAME, "prompt": ["fine", "hi " * 200], "max_tokens": 50})
    assert r.status_code == 400 and "128" in r.json()["error"]["message"]
    wait_idle(server)


def aborted_total(server: Server) -> float:
    try:
        return metric(server.get("/metrics").text, "vllm:request_success_total", model_name=NAME, finished_reason="abort")
    except KeyError:  # no request aborted yet
        return 0.0


def test_disconnect_during_non_streaming_request_aborts_it(server):
    """Hang up on a non-streaming request once the engine's counters say it is decoding (not after a guessed
    timeout, which a fast host outruns): it must be aborted, cut short, and its KV blocks freed."""
    max_tokens = 120  # EOS ignored: the request can only end by its length, and that takes 120 engine steps
    body = {"model": NAME, "prompt": "x", "max_tokens": max_tokens, "ignore_eos": True}
    before = wait_idle(server)
    aborts = aborted_total(server)

    async def go() -> dict:
        async with (
            httpx.AsyncClient(base_url=server.url, headers=server.headers(), timeout=60) as client,
            httpx.AsyncClient(base_url=server.url, headers=server.headers(), timeout=60) as poller,
        ):
            post = asyncio.create_task(client.post("/v1/completions", json=body))
            deadline = time.time() + 30
            while True:
                d = (await poller.get("/debug/engine")).json()
                decoding = d["generation_tokens_total"] > before["generation_tokens_total"]
                if d["in_flight"] == 1 and d["num_running"] == 1 and decoding:
                    break
                assert not post.done(), f"the request ended before it was seen running: {post!r}"
                assert time.time() < deadline, f"the request never started: {d}"
                await asyncio.sleep(0.002)
            assert not post.done()
            post.cancel()  # drops the connection mid-request: the server sees http.disconnect
            with contextlib.suppress(asyncio.CancelledError):
                await post
            return d

    running = asyncio.run(go())
    assert running["num_free_blocks"] < running["num_blocks"]
    idle = wait_idle(server)  # in_flight 0, nothing running or waiting, every KV block free again
    generated = idle["generation_tokens_total"] - before["generation_tokens_total"]
    assert generated < max_tokens, f"the request ran to its end ({generated} tokens) instead of being aborted"
    deadline = time.time() + 5
    while aborted_total(server) < aborts + 1 and time.time() < deadline:
        time.sleep(0.02)
    assert aborted_total(server) == aborts + 1
    assert_serving(server)


def test_queue_full_is_503_and_server_recovers(busy_server):
    long = {"prompt": "x", "max_tokens": 250, "ignore_eos": True}

    async def go():
        async with httpx.AsyncClient(base_url=busy_server.url, timeout=60) as client:
            holders = [asyncio.create_task(client.post("/v1/completions", json=long)) for _ in range(2)]
            for _ in range(200):  # one running, one waiting: then the queue is full
                if (await client.get("/debug/engine")).json()["in_flight"] == 2:
                    break
                await asyncio.sleep(0.01)
            rejected = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            name = (await client.get("/v1/models")).json()["data"][0]["id"]
            rejected_ollama = await client.post("/api/generate", json={"model": name, "prompt": "x"})
            for h in holders:
                h.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
            return rejected, rejected_ollama

    rejected, rejected_ollama = asyncio.run(go())
    assert rejected.status_code == 503 and rejected.headers.get("retry-after")
    assert "busy" in rejected.json()["error"]["message"]
    assert rejected_ollama.status_code == 503 and "busy" in rejected_ollama.json()["error"]
    wait_idle(busy_server)
    r = busy_server.post("/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert r.status_code == 200


# == the real model (slow) =======================================================================================
def real_model_available() -> bool:
    try:
        from turbofan.store import ModelStore

        names = [getattr(m, "name", None) for m in ModelStore(os.environ.get("TURBOFAN_MODELS")).list()]
    except Exception:
        return False
    return "smollm2:135m" in names


@pytest.fixture(scope="module")
def real_server(tmp_root):
    if not real_model_available():
        pytest.skip("smollm2:135m is not in the model store (TURBOFAN_MODELS); `turbofan pull smollm2:135m`")
    srv = launch("smollm2:135m", tmp_root / "real-server.log", "--max-model-len", "1024")
    yield srv
    srv.stop()


@pytest.mark.slow
def test_real_model_chinese_stream_without_replacement_chars(real_server):
    from openai import OpenAI

    client = OpenAI(base_url=real_server.url + "/v1", api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "Translate into Chinese: Good morning, my friend. The weather is nice."}]
    full = client.chat.completions.create(model="smollm2:135m", messages=messages, temperature=0, max_tokens=48)
    stream = client.chat.completions.create(
        model="smollm2:135m", messages=messages, temperature=0, max_tokens=48, stream=True
    )
    deltas = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(deltas) == full.choices[0].message.content
    assert all("\ufffd" not in d for d in deltas)
    assert full.usage.completion_tokens > 0


@pytest.mark.slow
def test_real_model_ollama_chat(real_server):
    import ollama

    client = ollama.Client(host=real_server.url)
    r = client.chat(model="smollm2", messages=[{"role": "user", "content": "Say hello."}],
                    options={"temperature": 0, "num_predict": 24})  # fmt: skip
    assert r.message.content.strip() and r.eval_count > 0
