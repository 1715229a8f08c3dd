"""turbofan against llama.cpp's `llama-server` on the same GGUF, one after the other, in one run.

    python -m turbofan.bench.compare --llama-server /path/to/llama-server
        [--plan "smollm2:135m=c1,c16,long;gemma3:270m=c16"] [--extra "--quantization none"] [--offline-rounds 3]

Each server runs alone (two CPU-heavy processes on two cores ruin both numbers), driven by `turbofan bench
serve` on /v1/completions with the same prompts and every end token banned by logit_bias, so both generate the
full length. Prints the CPU, then throughput, TTFT and TPOT side by side with ratios.

`--rounds N` repeats the servers taking turns (medians and per-round ratios are reported: this machine's speed
drifts between minutes). `--offline-rounds N` then runs turbofan served and each workload through `LLM.generate` in this process (the same
prompts, the same logit_bias, greedy, `max_num_seqs` = the workload's concurrency, warmed up) taking turns, N
rounds, so the served/offline ratio says what the HTTP path costs on exactly the same work.
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
from statistics import median

import httpx

from turbofan.bench import serve as bench_serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM: file pages it mapped count too, as for llama-server's mmap)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Server:
    """A started server: its URL, process, and when it began and first answered."""

    def __init__(self, url: str, proc: subprocess.Popen, started: float) -> None:
        self.url, self.proc, self.started = url, proc, started
        self.first_answer_s = float("nan")

    def first_answer(self, model: str) -> float:
        """Seconds from the spawn to the end of a first 1-token completion (the start a user waits through)."""
        httpx.post(f"{self.url}/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1},
                   timeout=600).raise_for_status()  # fmt: skip
        self.first_answer_s = time.perf_counter() - self.started
        return self.first_answer_s

    def peak_rss_mib(self) -> float:
        return peak_rss_mib(self.proc.pid)


@contextmanager
def running(cmd: list[str], port: int, log_path: str, timeout: float = 600):
    log = open(log_path, "w")  # noqa: SIM115 (closed below)
    started = time.perf_counter()
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
        yield Server(f"http://127.0.0.1:{port}", proc, started)
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


class Offline:
    """The same workloads without HTTP, in this process: one LLM per concurrency (its max_num_seqs), built once
    and warmed up; each run generates the workload's whole prompt list at once."""

    def __init__(self, model: str, workloads: list[Workload], tokenizer: str, bias: str) -> None:
        import random

        from turbofan import LLM, SamplingParams

        tok = bench_serve.load_tokenizer(tokenizer)
        self.prompts = {  # bench serve's default seed 0: the same prompts as the served run
            w.name: bench_serve.make_workload(random.Random(0), tok, w.num_prompts, w.input_len, w.output_len)[1]
            for w in workloads
        }
        self.llms = {c: LLM(model, max_num_seqs=c, log_stats_interval=0) for c in {w.concurrency for w in workloads}}
        for llm in self.llms.values():
            llm.generate(["warm up"], SamplingParams(max_tokens=4), use_tqdm=False)
        self.bias = {int(k): v for k, v in json.loads(bias).items()}

    def run(self, w: Workload) -> dict:
        from turbofan import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=w.output_len, logit_bias=self.bias)
        start = time.perf_counter()
        outs = self.llms[w.concurrency].generate(self.prompts[w.name], params, use_tqdm=False)
        duration = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        return {"output_throughput": tokens / duration, "duration_s": duration, "output_tokens": tokens}


def served_vs_offline(model: str, workloads: list[Workload], tokenizer: str, bias: str, serve_cmd: list[str],
                      rounds: int) -> list[dict]:  # fmt: skip
    """Served and offline taking turns on each workload, `rounds` times (ABAB: this machine's speed drifts between
    minutes, so only interleaved ratios mean anything); per workload the median of each and of the round ratios."""
    offline = Offline(model, workloads, tokenizer, bias)
    port = free_port()
    rows = []
    with running([*serve_cmd, "--host", "127.0.0.1", "--port", str(port)], port, "/tmp/compare-served.log") as srv:
        url = srv.url
        runs: dict[str, list[tuple[float, float]]] = {w.name: [] for w in workloads}
        for r in range(rounds):
            for w in workloads:
                a = bench(url, w, tokenizer, bias)["output_throughput"]
                b = offline.run(w)["output_throughput"]
                runs[w.name].append((a, b))
                print(f"{model:<14} round {r + 1} {w.name:<5} served {a:7.1f}  offline {b:7.1f} tok/s  {a / b:.0%}",
                      flush=True)  # fmt: skip
    for w in workloads:
        pairs = runs[w.name]
        rows.append({"model": model, "workload": w.name, "served": median(a for a, _ in pairs),
                     "offline": median(b for _, b in pairs), "ratio": median(a / b for a, b in pairs),
                     "rounds": pairs})  # fmt: skip
    return rows


def _rss(rows: list[dict]) -> float:
    return median(r.get("peak_rss_mib", float("nan")) for r in rows) if rows else float("nan")


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
    p.add_argument("--extra", default="", help="extra flags for turbofan serve (e.g. --kv-cache-memory 0.5GiB)")
    p.add_argument("--llama-ctx", type=int, default=32768, help="llama-server -c (its KV cache: ctx tokens)")
    p.add_argument("--json", default=None, help="write all results to this file")
    p.add_argument("--reference", default=None, help="llama-server results (a --json file) instead of running it")
    p.add_argument("--rounds", type=int, default=1, help="rounds of the servers taking turns (medians reported)")
    p.add_argument("--offline-rounds", type=int, default=0,
                   help="then turbofan served and LLM.generate (no HTTP) taking turns on each workload, N rounds")
    args = p.parse_args(argv)
    from turbofan import kernels
    from turbofan.store import ModelStore

    print(kernels.cpu_summary(), flush=True)
    store = ModelStore()
    plan = parse_plan(args.plan)
    results, offline_rows = [], []
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
                             "-np", "16", "-c", str(args.llama_ctx), "-cb"],
        }  # fmt: skip
        if args.reference:
            del servers["llama-server"]
        for round_ in range(args.rounds):  # the servers take turns, each alone on the CPU
            for name, cmd in servers.items():
                port = free_port()
                cmd = [*cmd, "--host", "127.0.0.1", "--port", str(port)]
                with running(cmd, port, f"/tmp/compare-{name}.log") as srv:
                    srv.first_answer(model)
                    rows = []
                    for w in workloads:
                        r = bench(srv.url, w, tokenizer, bias)
                        rows.append({**r, "model": model, "server": name, "workload": w.name, "round": round_})
                        print(f"{model:<14} {name:<13} {w.name:<5} {r['output_throughput']:7.1f} tok/s  "
                              f"TTFT p50 {r['ttft_ms']['p50']:7.0f} ms  TPOT p50 {r['tpot_ms']['p50']:6.1f} ms", flush=True)  # fmt: skip
                    rss = srv.peak_rss_mib()
                    for r in rows:  # the server's peak over all its workloads, and its start
                        r.update(peak_rss_mib=rss, first_answer_s=srv.first_answer_s)
                    results += rows
                    print(f"{model:<14} {name:<13} peak RSS {rss:7.0f} MiB  start to first answer "
                          f"{srv.first_answer_s:5.1f} s", flush=True)
        if args.offline_rounds:
            offline_rows += served_vs_offline(model, workloads, tokenizer, bias, servers["turbofan"],
                                              args.offline_rounds)  # fmt: skip
    print()
    print("| model | workload | turbofan tok/s | llama-server tok/s | ratio | TTFT p50 turbofan / llama (ms) "
          "| peak RSS MiB turbofan / llama (ratio) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for model, workloads in plan:
        for w in workloads:
            t, ll = (
                [r for r in results if r["model"] == model and r["server"] == s and r["workload"] == w.name]
                for s in ("turbofan", "llama-server")
            )
            tok = [r["output_throughput"] for r in t], [r["output_throughput"] for r in ll]
            # the ratio of each round's pair (a --reference run has one llama-server row for every round)
            ratios = [a / ll[min(i, len(ll) - 1)]["output_throughput"] for i, a in enumerate(tok[0])]
            print(f"| {model} | {w.name} ({w.num_prompts} x {w.output_len}, c={w.concurrency}, in {w.input_len}) | "
                  f"{median(tok[0]):.1f} | {median(tok[1]):.1f} | {median(ratios):.2f}x"
                  f"{' (rounds: ' + ', '.join(f'{x:.2f}' for x in ratios) + ')' if len(ratios) > 1 else ''} | "
                  f"{median(r['ttft_ms']['p50'] for r in t):.0f} / {median(r['ttft_ms']['p50'] for r in ll):.0f} | "
                  f"{_rss(t):.0f} / {_rss(ll):.0f} ({_rss(t) / _rss(ll):.2f}x) |")  # fmt: skip
    for model, _ in plan:
        t, ll = ([r for r in results if r["model"] == model and r["server"] == s] for s in ("turbofan", "llama-server"))
        if t and ll:
            print(f"{model}: start to first answer {median(r['first_answer_s'] for r in t):.1f} s (turbofan) / "
                  f"{median(r['first_answer_s'] for r in ll):.1f} s (llama-server)")
    if offline_rows:
        print()
        print("| model | workload | served tok/s | offline tok/s | served / offline (median of rounds) |")
        print("| --- | --- | --- | --- | --- |")
        for r in offline_rows:
            print(f"| {r['model']} | {r['workload']} | {r['served']:.1f} | {r['offline']:.1f} | {r['ratio']:.0%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results + offline_rows, f, indent=2)


if __name__ == "__main__":
    main()
