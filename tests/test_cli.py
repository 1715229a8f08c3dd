"""The `turbofan` command line: run (one-shot and interactive through a pseudo-terminal), ps, the store verbs,
and `bench serve` against a live server. Uses the chain model and the shared server from test_server.py."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_server import CHAIN_TEXT, KEY, NAME, REPO, THREADS, chain_model_path, install_copy, main_server

from turbofan import cli


@pytest.fixture(scope="module")
def model(tmp_root) -> Path:
    return chain_model_path(tmp_root)[0]


@pytest.fixture(scope="module")
def server(tmp_root):
    return main_server(tmp_root)  # shared with test_server.py when both run in one session


def env(**extra: str) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TURBOFAN_")}
    return {**base, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": THREADS, **extra}


def turbofan(*args: str, timeout: float = 120, **env_extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "turbofan.cli", *args],
        cwd=REPO,
        env=env(**env_extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- parsing ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ("127.0.0.1", None)),
        ("0.0.0.0", ("0.0.0.0", None)),
        ("0.0.0.0:9000", ("0.0.0.0", 9000)),
        (":9000", ("127.0.0.1", 9000)),
        ("http://example.com:1234/", ("example.com", 1234)),
        ("[::1]:8000", ("::1", 8000)),
    ],
)
def test_parse_host(value, expected):
    assert cli.parse_host(value) == expected


def test_server_url_from_env(monkeypatch):
    monkeypatch.setenv("TURBOFAN_HOST", "0.0.0.0:9001")
    assert cli.server_url(None) == "http://127.0.0.1:9001"
    assert cli.server_url("10.0.0.2:80") == "http://10.0.0.2:80"


def test_serve_flags_use_vllm_spelling(monkeypatch):
    monkeypatch.setenv("TURBOFAN_HOST", "0.0.0.0")
    monkeypatch.setenv("TURBOFAN_API_KEY", "k")
    monkeypatch.setenv("TURBOFAN_ORIGINS", "http://a.example,http://b.example")
    args = cli.build_parser().parse_args(
        ["serve", "--max-model-len", "512", "--max-num-seqs", "8", "--max-num-batched-tokens", "256",
         "--block-size", "32", "--no-enable-prefix-caching", "--dtype", "float32", "--kv-cache-memory", "256MiB",
         "--served-model-name", "a", "b", "--chat-template", "{{ x }}", "--tiering", "on", "--tier-threshold", "4",
         "--profile"]
    )  # fmt: skip
    assert args.model == "smollm2:135m" and args.port == 8000 and args.host == "0.0.0.0"
    assert args.api_key == "k" and args.allowed_origins == "http://a.example,http://b.example"
    config = cli.engine_config(args, "a")
    assert (config.max_model_len, config.max_num_seqs, config.max_num_batched_tokens, config.block_size) == (
        512, 8, 256, 32
    )  # fmt: skip
    assert not config.enable_prefix_caching and config.chat_template == "{{ x }}" and config.tiering == "on"
    assert args.served_model_name == ["a", "b"] and config.served_model_name == "a"


# -- run ----------------------------------------------------------------------------------------------------------
def test_run_one_shot(model):
    r = turbofan("run", str(model), "hello", "there", "--temperature", "0", "--repeat-penalty", "1.0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == CHAIN_TEXT


def read_until(fd: int, needle: bytes, timeout: float = 120) -> bytes:
    buf = b""
    deadline = time.time() + timeout
    while needle not in buf:
        if time.time() > deadline:
            raise AssertionError(f"{needle!r} not seen; got {buf[-2000:]!r}")
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_run_interactive_through_a_pty(model):
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "turbofan.cli", "run", str(model), "--temperature", "0", "--verbose"],
        stdin=follower, stdout=follower, stderr=follower, cwd=REPO, env=env(), close_fds=True,
    )  # fmt: skip
    os.close(follower)
    try:
        read_until(leader, b">>> ")
        os.write(leader, b"hi\n")
        out = read_until(leader, b">>> ")
        assert CHAIN_TEXT.encode() in out
        assert b"tokens/s" in out  # --verbose timings
        os.write(leader, b"/?\n")
        assert b"/bye" in read_until(leader, b">>> ")
        os.write(leader, b"/clear\n")
        assert b"Cleared" in read_until(leader, b">>> ")
        os.write(leader, b"second question\n")
        assert CHAIN_TEXT.encode() in read_until(leader, b">>> ")
        os.write(leader, b"/bye\n")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)


# -- ps, bench ----------------------------------------------------------------------------------------------------
def test_ps_lists_the_served_model(server):
    r = turbofan("ps", "--url", server.url, TURBOFAN_API_KEY=KEY, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "ID", "SIZE", "PROCESSOR"]
    assert lines[1].startswith(NAME) and "CPU" in lines[1] and "128" in lines[1]
    host = server.url.removeprefix("http://")
    assert turbofan("ps", TURBOFAN_HOST=host, TURBOFAN_API_KEY=KEY, timeout=60).stdout == r.stdout


def test_ps_without_a_server_says_so():
    r = turbofan("ps", "--url", "127.0.0.1:9", timeout=60)
    assert r.returncode == 1 and "could not reach" in r.stderr


def test_bench_serve_against_the_server(server, capsys, model):
    from turbofan.bench import serve as bench

    args = ["--base-url", server.url, "--api-key", KEY, "--num-prompts", "6", "--max-concurrency", "3",
            "--input-len", "16", "--output-len", "8", "--ignore-eos", "--json", "--tokenizer", str(model)]  # fmt: skip
    assert bench.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["completed"], result["failed"], result["total_output_tokens"]) == (6, 0, 48)
    assert result["model"] == NAME and result["max_concurrency"] == 3
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(result[key]) >= {"mean", "median", "p99"} and result[key]["mean"] > 0
    assert result["output_throughput"] > 0
    assert 14 <= result["total_input_tokens"] / 6 <= 18  # prompts of about --input-len tokens
    assert bench.main([*args[:-3], "--request-rate", "40", "--endpoint", "/v1/chat/completions"]) == 0
    table = capsys.readouterr().out
    assert "Output token throughput (tok/s):" in table and "P99 TTFT (ms):" in table


def test_bench_subcommand_dispatch(server):
    r = turbofan("bench", "serve", "--base-url", server.url, "--api-key", KEY, "--num-prompts", "2",
                 "--output-len", "4", "--input-len", "8", timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Successful requests:" in r.stdout


# -- the store verbs (in-process: they only touch the store) ------------------------------------------------------
def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_store_verbs(tmp_path, model, capsys, monkeypatch):
    store = tmp_path / "models"
    monkeypatch.setenv("TURBOFAN_MODELS", str(store))
    code, out, _ = run_cli(capsys, "list")
    assert code == 0 and out.split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    for verb in ("rm", "show"):
        code, _, err = run_cli(capsys, verb, "missing-model:1b")
        assert code == 1 and err.startswith("Error:") and "missing-model:1b" in err, (verb, err)
    install_copy(store, model, "chain:1m")
    code, out, _ = run_cli(capsys, "ls")
    row = out.splitlines()[1].split()
    assert row[0] == "chain:1m" and len(row[1]) == 12 and row[3] in ("KB", "MB")
    assert "just now" in out or "ago" in out
    code, out, _ = run_cli(capsys, "show", "chain:1m")
    assert code == 0 and "architecture" in out and "llama" in out and "Chat template" in out
    code, out, _ = run_cli(capsys, "pull", str(model))  # a local directory: used in place
    assert code == 0 and out.strip().endswith("success")
    code, out, _ = run_cli(capsys, "rm", "chain:1m")
    assert code == 0 and "deleted 'chain:1m'" in out
    assert "chain:1m" not in run_cli(capsys, "list")[1]
