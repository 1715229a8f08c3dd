"""turbofan against llama.cpp's `llama-server` on the same GGUF, one after the other, in one run.

    python -m turbofan.bench.compare --llama-server /path/to/llama-server
        [--plan "smollm2:135m=c1,c16,long;gemma3:270m=c16"] [--extra "--quantization none"]

Each server runs alone (two CPU-heavy processes on two cores ruin both numbers), driven by `turbofan bench
serve` on /v1/completions with the same prompts and every end token banned by logit_bias, so both generate the
full length. Prints the CPU, then throughput, TTFT and TPOT side by side with ratios.
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
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class Workload:
    name: str
    concurrency: int
    num_prompts: int
    input_len: int
    output_len: int


# The workloads of issue 15: one stream, sixteen streams, and long unique documents (prefill-heavy).
WORKLOADS = {
    "c1": Workload("c1", 1, 4, 64, 128),
    "c16": Workload("c16", 16, 32, 64, 128),
    "c32": Workload("c32", 32, 64, 64, 128),
    "long": Workload("long", 8, 16, 1300, 64),
}
DEFAULT_PLAN = "smollm2:135m=c1,c16,long;gemma3:270m=c16"


def eos_bias(model_dir: Path) -> str:
    """logit_bias JSON banning every end token of the model, so both servers generate the full length."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        f = model_dir / name
        if f.is_file():
            eos = json.loads(f.read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else eos or [])
    return json.dumps({str(i): -100 for i in sorted(ids)})


def bench(url: str, w: Workload, tokenizer: str, bias: str) -> dict:
    argv = [
        "--base-url", url, "--num-prompts", str(w.num_prompts), "--max-concurrency", str(w.concurrency),
        "--input-len", str(w.input_len), "--output-len", str(w.output_len), "--tokenizer", tokenizer,
        "--logit-bias", bias, "--json",
    ]  # fmt: skip
    return asyncio.run(bench_serve.run(bench_serve.build_parser().parse_args(argv)))


def parse_plan(plan: str) -> list[tuple[str, list[Workload]]]:
    out = []
    for part in plan.split(";"):
        model, _, names = part.partition("=")
        out.append((model.strip(), [WORKLOADS[n.strip()] for n in names.split(",")]))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m turbofan.bench.compare", description=__doc__.split("\n")[0])
    p.add_argument("--llama-server", required=True)
    p.add_argument("--plan", default=DEFAULT_PLAN, help=f"model=workload,...;... (workloads: {', '.join(WORKLOADS)})")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--extra", default="", help="extra flags for turbofan serve")
    p.add_argument("--json", default=None, help="write all results to this file")
    p.add_argument("--reference", default=None, help="llama-server results (a --json file) instead of running it")
    args = p.parse_args(argv)
    from turbofan import kernels
    from turbofan.store import ModelStore

    print(kernels.cpu_summary(), flush=True)
    store = ModelStore()
    plan = parse_plan(args.plan)
    results = []
    if args.reference:
        with open(args.reference) as f:
            results = [r for r in json.load(f) if r["server"] == "llama-server"]
    for model, workloads in plan:
        resolved = store.resolve(model)
        gguf = str(resolved.gguf_file)
        tokenizer = str(resolved.path)
        bias = eos_bias(Path(resolved.path))
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
                for w in workloads:
                    r = bench(url, w, tokenizer, bias)
                    results.append({**r, "model": model, "server": name, "workload": w.name})
                    print(f"{model:<14} {name:<13} {w.name:<5} {r['output_throughput']:7.1f} tok/s  "
                          f"TTFT p50 {r['ttft_ms']['p50']:7.0f} ms  TPOT p50 {r['tpot_ms']['p50']:6.1f} ms", flush=True)  # fmt: skip
    print()
    print("| model | workload | turbofan tok/s | llama-server tok/s | ratio | TTFT p50 turbofan / llama (ms) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for model, workloads in plan:
        for w in workloads:
            t, ll = (
                next(r for r in results if r["model"] == model and r["server"] == s and r["workload"] == w.name)
                for s in ("turbofan", "llama-server")
            )
            print(f"| {model} | {w.name} ({w.num_prompts} x {w.output_len}, c={w.concurrency}, in {w.input_len}) | "
                  f"{t['output_throughput']:.1f} | {ll['output_throughput']:.1f} | "
                  f"{t['output_throughput'] / ll['output_throughput']:.2f}x | "
                  f"{t['ttft_ms']['p50']:.0f} / {ll['ttft_ms']['p50']:.0f} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
