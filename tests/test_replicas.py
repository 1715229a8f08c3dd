"""`turbofan serve --replicas N` on Ray Serve: one HTTP endpoint for both APIs over N engines, /metrics from every
replica, and a replica killed with SIGKILL replaced by Ray while the endpoint keeps answering."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from test_server import free_port

from turbofan.distributed.replicas import labelled, merge

REPO = Path(__file__).resolve().parents[1]


def test_metrics_of_every_replica_merge_under_one_help_line():
    text = '# HELP t_total Tokens.\n# TYPE t_total counter\nt_total{model="m"} 3.0\nup 1.0\n'
    assert labelled(text, "a")[2:] == ['t_total{replica="a",model="m"} 3.0', 'up{replica="a"} 1.0']
    merged = merge({"a": text, "b": text.replace("3.0", "5.0")}).splitlines()
    assert merged.count("# HELP t_total Tokens.") == 1 and merged.count("# TYPE t_total counter") == 1
    assert 't_total{replica="a",model="m"} 3.0' in merged and 't_total{replica="b",model="m"} 5.0' in merged


def replica_pids(root: int) -> list[int]:
    """Ray Serve replica processes (their title names the deployment) in the server's process session."""
    out = subprocess.run(["pgrep", "-s", str(os.getsid(root)), "-f", "ServeReplica:turbofan"],
                         capture_output=True, text=True).stdout  # fmt: skip
    return [int(p) for p in out.split()]


def ask(url: str, i: int) -> int:
    """Alternately an OpenAI and an Ollama request; returns the HTTP status."""
    if i % 2:
        body = {"model": "tiny", "prompt": f"The quick brown fox {i}", "max_tokens": 8, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    else:
        body = {"model": "tiny", "prompt": f"Paged attention {i}", "stream": False, "options": {"num_predict": 8}}
        r = httpx.post(url + "/api/generate", json=body, timeout=120)
    return r.status_code


@pytest.mark.slow
def test_two_replicas_answer_32_concurrent_requests_and_survive_a_kill(tiny_models, tmp_path):
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'turbofan[ray]'")
    port = free_port()
    log = (tmp_path / "replicas.log").open("w")
    cmd = [sys.executable, "-m", "turbofan.cli", "serve", str(tiny_models["llama"]), "--port", str(port),
           "--replicas", "2", "--replica-threads", "1", "--num-kv-blocks", "128", "--served-model-name", "tiny"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "replicas.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200 and len(replica_pids(proc.pid)) == 2:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("replicas did not become healthy:\n" + (tmp_path / "replicas.log").read_text()[-3000:])
        with ThreadPoolExecutor(32) as pool:
            assert list(pool.map(lambda i: ask(url, i), range(32))) == [200] * 32
        time.sleep(7)  # two health-check rounds: each replica has published its metrics
        metrics = httpx.get(url + "/metrics", timeout=30).text
        assert len(set(re.findall(r'replica="([^"]+)"', metrics))) == 2

        victim = replica_pids(proc.pid)[0]
        with ThreadPoolExecutor(8) as pool:
            in_flight = [pool.submit(ask, url, i) for i in range(8)]
            os.kill(victim, signal.SIGKILL)
            killed_at = time.time()
            # In-flight requests end (answered, or a clean error from the proxy for those on the dead replica).
            statuses = [f.result(timeout=120) for f in in_flight]
        assert all(s in (200, 500, 502, 503) for s in statuses), statuses
        answered_again = None
        while time.time() - killed_at < 60:
            if ask(url, 1) == 200:
                answered_again = time.time() - killed_at
                break
            time.sleep(0.5)
        assert answered_again is not None, "no answer within 60 s of the kill"
        while time.time() - killed_at < 180 and victim in replica_pids(proc.pid) or len(replica_pids(proc.pid)) < 2:
            time.sleep(1)
        assert len(replica_pids(proc.pid)) == 2 and victim not in replica_pids(proc.pid)  # Ray replaced it
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(lambda i: ask(url, i), range(8))) == [200] * 8
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the local Ray it started is left
