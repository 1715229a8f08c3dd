"""turbofan against llama.cpp's `llama-server` on the same GGUF, one after the other, in one run.

    python -m turbofan.bench.compare --llama-server /path/to/llama-server [--models smollm2:135m,gemma3:270m]
        [--concurrency 1,8,16,32] [--num-prompts 32] [--output-len 128] [--extra "--quantization int8"]

Each server runs alone (two CPU-heavy processes on two cores ruin both numbers), driven by `turbofan bench
serve` with ignore_eos and the same prompts. Prints throughput, TTFT and TPOT side by side with ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx

from turbofan.bench import serve as bench_serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(cmd: list[str], port: int, log_path: str, timeout: float = 600):
    log = open(log_path, "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}; see {log_path}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError(f"{cmd[0]} did not become healthy in {timeout} s; see {log_path}")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def bench(url: str, concurrency: int, args, tokenizer: str) -> dict:
    argv = [
        "--base-url", url, "--num-prompts", str(max(args.num_prompts, concurrency)),
        "--max-concurrency", str(concurrency), "--input-len", str(args.input_len),
        "--output-len", str(args.output_len), "--ignore-eos", "--tokenizer", tokenizer, "--json",
    ]  # fmt: skip
    return asyncio.run(bench_serve.run(bench_serve.build_parser().parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m turbofan.bench.compare", description=__doc__.split("\n")[0])
    p.add_argument("--llama-server", required=True)
    p.add_argument("--models", default="smollm2:135m,gemma3:270m")
    p.add_argument("--concurrency", default="1,8,16,32")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--extra", default="", help="extra flags for turbofan serve")
    p.add_argument("--json", default=None, help="write all results to this file")
    p.add_argument("--reference", default=None, help="llama-server results (a --json file) instead of running it")
    args = p.parse_args(argv)
    from turbofan.store import ModelStore

    store = ModelStore()
    levels = [int(c) for c in args.concurrency.split(",")]
    results = []
    if args.reference:
        with open(args.reference) as f:
            results = [r for r in json.load(f) if r["server"] == "llama-server"]
    for model in args.models.split(","):
        resolved = store.resolve(model)
        gguf = str(resolved.gguf_file)
        tokenizer = str(resolved.path)
        servers = {
            "turbofan": [sys.executable, "-m", "turbofan.cli", "serve", model, "--max-num-seqs", "64",
                         *shlex.split(args.extra)],
            "llama-server": [args.llama_server, "-m", gguf, "-t", str(args.threads), "-tb", str(args.threads),
                             "-np", "16", "-c", "32768", "-cb"],
        }  # fmt: skip
        if args.reference:
            del servers["llama-server"]
        for name, cmd in servers.items():
            port = free_port()
            cmd = [*cmd, "--host", "127.0.0.1", "--port", str(port)]
            with running(cmd, port, f"/tmp/compare-{name}.log") as url:
                for c in levels:
                    r = bench(url, c, args, tokenizer)
                    results.append({"model": model, "server": name, "concurrency": c, **r})
                    print(f"{model:<14} {name:<13} c={c:<3} {r['output_throughput']:7.1f} tok/s  "
                          f"TTFT p50 {r['ttft_ms']['p50']:7.0f} ms  TPOT p50 {r['tpot_ms']['p50']:6.1f} ms", flush=True)  # fmt: skip
    print()
    print(f"{'model':<14} {'conc':>4} {'turbofan tok/s':>15} {'llama tok/s':>12} {'ratio':>6} "
          f"{'TTFT p50 tf/ll (ms)':>22} {'TPOT p50 tf/ll (ms)':>21}")  # fmt: skip
    for model in args.models.split(","):
        for c in levels:
            t = next(r for r in results if r["model"] == model and r["server"] == "turbofan" and r["concurrency"] == c)
            ll = next(
                r for r in results if r["model"] == model and r["server"] == "llama-server" and r["concurrency"] == c
            )
            print(f"{model:<14} {c:>4} {t['output_throughput']:>15.1f} {ll['output_throughput']:>12.1f} "
                  f"{t['output_throughput'] / ll['output_throughput']:>6.2f} "
                  f"{t['ttft_ms']['p50']:>10.0f} / {ll['ttft_ms']['p50']:<9.0f} "
                  f"{t['tpot_ms']['p50']:>9.1f} / {ll['tpot_ms']['p50']:<9.1f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
