"""What an open dashboard costs the server (docs/benchmarks.md, issue 12).

1. One snapshot (DashboardSampler.sample + JSON) on a tiny engine, with empty and with full latency windows.
2. Served output tokens/s of `turbofan bench serve` against `turbofan serve smollm2:135m`, with (B) and without (A)
   a /dashboard/events reader, alternating A and B (medians).

    TURBOFAN_MODELS=... .venv/bin/python tests/ui_feed_overhead.py [rounds]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import httpx  # noqa: E402
from test_server import KEY, launch  # noqa: E402

BENCH = ["--num-prompts", "24", "--max-concurrency", "4", "--input-len", "64", "--output-len", "64", "--ignore-eos"]


def snapshot_cost() -> None:
    from fastapi.testclient import TestClient
    from tiny_models import build_tiny_model

    from turbofan import LLM
    from turbofan.server.app import create_app
    from turbofan.server.dashboard import DashboardSampler

    path = build_tiny_model(Path(tempfile.mkdtemp()) / "llama", "llama")
    app = create_app(LLM(str(path), num_kv_blocks=64).engine)
    with TestClient(app) as client:
        client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        metrics = app.state.ctx.metrics
        for label, n in (("empty windows", 0), ("full windows", 20_000)):
            for i in range(n):
                metrics.recent_itl.add(0.01 * (i % 7))
                metrics.recent_ttft.add(0.1)
            sampler = DashboardSampler(app.state.ctx)
            times = []
            for _ in range(200):
                t = time.perf_counter()
                sampler.sample().to_json()
                times.append(time.perf_counter() - t)
            print(f"snapshot, {label}: median {statistics.median(times) * 1e3:.3f} ms", flush=True)


def served_ab(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--max-model-len", "2048", "--num-kv-blocks", "256"]
        srv = launch("smollm2:135m", Path(tmp) / "server.log", *flags, key=KEY, ready_timeout=600)
        cmd = [sys.executable, "-m", "turbofan.bench.serve", "--base-url", srv.url, "--api-key", KEY, *BENCH, "--json"]

        def feed(stop: threading.Event) -> None:
            with httpx.stream("GET", srv.url + "/dashboard/events", headers=srv.headers(), timeout=None) as r:
                for _ in r.iter_lines():
                    if stop.is_set():
                        return

        results: dict[str, list[float]] = {"A": [], "B": []}
        try:
            for _ in range(rounds):
                for arm in "AB":
                    stop = threading.Event()
                    reader = threading.Thread(target=feed, args=(stop,)) if arm == "B" else None
                    if reader:
                        reader.start()
                        time.sleep(1.5)
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                    results[arm].append(json.loads(out)["output_throughput"])
                    stop.set()
                    if reader:
                        reader.join(5)
        finally:
            srv.stop()
    a, b = statistics.median(results["A"]), statistics.median(results["B"])
    print(json.dumps(results))
    print(f"served output tok/s: median A (no feed) {a:.1f}, B (feed open) {b:.1f}, B/A {b / a:.3f}")


if __name__ == "__main__":
    snapshot_cost()
    served_ab(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
