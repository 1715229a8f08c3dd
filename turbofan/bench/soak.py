"""`turbofan bench soak`: a bounded soak of a running server with careless and hostile clients mixed in.

By default 1,000 requests at concurrency 32 against both APIs: 80% ordinary (OpenAI chat/completions, Ollama
generate/chat, streaming and not), 10% that hang up mid-stream, 10% bad inputs (invalid JSON, lone surrogates,
out-of-range fields, unknown roles and models, prompts over the context, bodies over the size limit). It passes
when:
- no answer is a 5xx, except 503 with Retry-After (a full queue);
- every request gets an answer (hang-ups aside), and every stream ends properly (SSE `[DONE]`, Ollama `done`);
- bad inputs get a 4xx;
- afterwards nothing runs or waits and every KV block is free (`/metrics`);
- the server's resident memory grows by less than 10% between the end of the warm-up and the end.

The server's memory is read from its process (`--pid`, or found by the port when the server is on this machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx
import psutil

BAD_BODIES: list[tuple[str, str, bytes | str | dict, dict]] = [  # (name, path, body, headers)
    ("invalid_json", "/v1/chat/completions", b'{"messages": [', {}),
    ("lone_surrogate", "/v1/completions", b'{"model": "MODEL", "prompt": "a\\ud800"}', {}),
    ("lone_surrogate_ollama", "/api/generate", b'{"model": "MODEL", "prompt": "\\udc00", "stream": false}', {}),
    ("invalid_utf8", "/api/chat", b'{"model": "MODEL", "messages": [{"role": "user", "content": "\xff"}]}', {}),
    ("temperature", "/v1/chat/completions", {"temperature": 1e9}, {}),
    ("role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, {}),
    ("seed", "/v1/completions", {"prompt": "hi", "seed": 2**70}, {}),
    ("max_tokens", "/v1/completions", {"prompt": "hi", "max_tokens": -5}, {}),
    ("beam", "/v1/completions", {"prompt": "hi", "use_beam_search": True, "best_of": 1000}, {}),
    ("unknown_model", "/api/generate", {"model": "no-such-model:1b", "prompt": "hi"}, {}),
    ("over_context", "/v1/completions", {"prompt": "hello " * 40_000}, {}),
    ("too_large", "/api/generate", b'{"prompt": "' + b"a" * (9 << 20) + b'"}', {}),
    ("form_garbage", "/api/generate", b"model=x&prompt=y", {"Content-Type": "application/x-www-form-urlencoded"}),
    ("path_pull", "/api/pull", {"model": "/etc/passwd"}, {}),
]


@dataclass
class Outcome:
    kind: str  # ok | hangup | bad
    name: str
    status: int | None = None
    seconds: float = 0.0
    problem: str = ""  # why this outcome breaks the soak's rules ("" when it does not)


@dataclass
class SoakReport:
    outcomes: list[Outcome] = field(default_factory=list)
    rss_warm: int = 0
    rss_end: int = 0
    kv_free: bool = False
    idle_state: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def problems(self) -> list[str]:
        out = [f"{o.kind}/{o.name}: {o.problem}" for o in self.outcomes if o.problem]
        if not self.kv_free:
            out.append(f"not idle or KV blocks still held afterwards: {self.idle_state}")
        if self.rss_warm and self.rss_growth >= 0.10:
            out.append(f"RSS grew {100 * self.rss_growth:.1f}% after warm-up (limit 10%)")
        return out

    @property
    def rss_growth(self) -> float:
        return (self.rss_end - self.rss_warm) / self.rss_warm if self.rss_warm else 0.0

    def summary(self) -> dict:
        by_kind = Counter(o.kind for o in self.outcomes)
        statuses = Counter(f"{o.kind}:{o.status}" for o in self.outcomes)
        ok_times = sorted(o.seconds for o in self.outcomes if o.kind == "ok" and o.status == 200)
        return {
            "requests": len(self.outcomes),
            "by_kind": dict(by_kind),
            "statuses": dict(sorted(statuses.items())),
            "seconds": round(self.seconds, 1),
            "ok_latency_p50_s": round(statistics.median(ok_times), 3) if ok_times else None,
            "ok_latency_p99_s": round(ok_times[int(0.99 * (len(ok_times) - 1))], 3) if ok_times else None,
            "rss_warm_mib": round(self.rss_warm / (1 << 20), 1),
            "rss_end_mib": round(self.rss_end / (1 << 20), 1),
            "rss_growth_pct": round(100 * self.rss_growth, 2),
            "kv_free_after": self.kv_free,
            "problems": self.problems,
            "passed": not self.problems,
        }


# -- one request each ---------------------------------------------------------------------------------------------
def _check_status(o: Outcome, response: httpx.Response, want_4xx: bool) -> bool:
    """Records a problem unless the status is allowed; True when the body is worth reading further."""
    status = o.status = response.status_code
    if status == 503 and response.headers.get("retry-after"):
        return False  # a full queue, said properly
    if status >= 500:
        o.problem = f"status {status}: {response.text[:200]}"
    elif want_4xx and not 400 <= status < 500:
        o.problem = f"a bad input got {status}"
    elif not want_4xx and status != 200:
        o.problem = f"status {status}: {response.text[:200]}"
    return status == 200


async def ordinary(
    client: httpx.AsyncClient, model: str, rng: random.Random, hang_up: bool, max_new: int = 64
) -> Outcome:
    """One of four request shapes; a hang-up streams and closes the connection after a chunk or two."""
    shape = rng.choice(["openai.chat", "openai.completions", "ollama.generate", "ollama.chat"])
    stream = hang_up or rng.random() < 0.5
    max_tokens = rng.randint(max(1, max_new // 4), max_new)
    words = " ".join(rng.choice(["tell", "me", "about", "the", "sea", "sky", "a", "story", "why"]) for _ in range(8))
    messages = [{"role": "user", "content": words}]
    if shape == "openai.chat":
        path, body = "/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": max_tokens}
    elif shape == "openai.completions":
        path, body = "/v1/completions", {"model": model, "prompt": words, "max_tokens": max_tokens}
    elif shape == "ollama.generate":
        path, body = "/api/generate", {"model": model, "prompt": words, "options": {"num_predict": max_tokens}}
    else:
        path, body = "/api/chat", {"model": model, "messages": messages, "options": {"num_predict": max_tokens}}
    body["stream"] = stream
    o = Outcome("hangup" if hang_up else "ok", shape + (".stream" if stream else ""))
    t0 = time.perf_counter()
    if not stream:
        response = await client.post(path, json=body)
        if _check_status(o, response, want_4xx=False) and not response.json():
            o.problem = "an empty answer"
        o.seconds = time.perf_counter() - t0
        return o
    async with client.stream("POST", path, json=body) as response:
        if not _check_status(o, response, want_4xx=False):
            await response.aread()
            o.seconds = time.perf_counter() - t0
            return o
        cut_after = rng.randint(1, 3) if hang_up else None
        lines, ended = 0, False
        async for line in response.aiter_lines():
            if not line:
                continue
            lines += 1
            if cut_after is not None and lines >= cut_after:
                break  # leaving the block closes the connection mid-stream
            if path.startswith("/v1/"):
                ended = ended or line == "data: [DONE]"
                if line.startswith("data: {") and '"error"' in line[:20]:
                    o.problem = f"error event: {line[:200]}"
            else:
                event = json.loads(line)
                if "error" in event:
                    o.problem = f"error line: {line[:200]}"
                ended = ended or bool(event.get("done"))
        if cut_after is None and not ended and not o.problem:
            o.problem = "the stream ended without its final event"
    o.seconds = time.perf_counter() - t0
    return o


async def bad(client: httpx.AsyncClient, model: str, rng: random.Random) -> Outcome:
    name, path, body, headers = rng.choice(BAD_BODIES)
    o = Outcome("bad", name)
    t0 = time.perf_counter()
    if isinstance(body, dict):
        body = {"model": model, **({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {}),
                **body}  # fmt: skip
        content = json.dumps(body).encode()
    else:
        content = body.replace(b"MODEL", model.encode()) if isinstance(body, bytes) else body.encode()
    try:
        response = await client.post(path, content=content, headers=headers)
        _check_status(o, response, want_4xx=True)
    except httpx.TransportError as exc:  # a 413 may close the connection while the client still sends
        if name != "too_large":
            o.problem = f"no answer: {exc!r}"
        o.status = 413 if name == "too_large" else None
    o.seconds = time.perf_counter() - t0
    return o


# -- the server's side --------------------------------------------------------------------------------------------
def find_server_process(url: str, pid: int | None) -> psutil.Process | None:
    if pid:
        return psutil.Process(pid)
    port = urlparse(url).port
    try:
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
                return psutil.Process(conn.pid)
    except psutil.AccessDenied:
        pass
    return None


async def engine_idle(client: httpx.AsyncClient, timeout: float = 30.0) -> tuple[bool, dict]:
    """Nothing running or waiting and every KV block free, per the server's /metrics."""
    deadline = time.monotonic() + timeout
    state: dict = {}
    while True:
        text = (await client.get("/metrics")).text
        for line in text.splitlines():
            for key in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
                if line.startswith(key + "{") or line.startswith(key + " "):
                    state[key] = float(line.rsplit(" ", 1)[1])
        if len(state) == 3 and not any(state.values()):
            return True, state
        if time.monotonic() > deadline:
            return False, state
        await asyncio.sleep(0.2)


async def soak(args: argparse.Namespace) -> SoakReport:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency)
    timeout = httpx.Timeout(args.timeout)
    report = SoakReport()
    async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits, timeout=timeout) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        proc = find_server_process(args.url, args.pid)
        rng = random.Random(args.seed)
        plan = ["hangup"] * round(args.num_requests * args.hangup_fraction)
        plan += ["bad"] * round(args.num_requests * args.bad_fraction)
        plan += ["ok"] * (args.num_requests - len(plan))
        rng.shuffle(plan)
        warm_after = max(1, int(args.num_requests * args.warmup_fraction))
        semaphore = asyncio.Semaphore(args.concurrency)
        done = 0

        async def one(i: int, kind: str) -> None:
            nonlocal done
            local = random.Random(args.seed * 1_000_003 + i)
            async with semaphore:
                try:
                    if kind == "bad":
                        outcome = await bad(client, model, local)
                    else:
                        outcome = await ordinary(client, model, local, kind == "hangup", args.max_tokens)
                except httpx.HTTPError as exc:
                    outcome = Outcome(kind, "transport", problem=f"no answer: {exc!r}")
            report.outcomes.append(outcome)
            done += 1
            if done == warm_after and proc is not None:
                report.rss_warm = proc.memory_info().rss
            if args.progress and done % 100 == 0:
                print(f"{done}/{args.num_requests}", file=sys.stderr)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, kind) for i, kind in enumerate(plan)))
        report.seconds = time.perf_counter() - t0
        report.kv_free, report.idle_state = await engine_idle(client)
        if proc is not None:
            report.rss_end = proc.memory_info().rss
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="turbofan bench soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--hangup-fraction", type=float, default=0.10, help="requests that hang up mid-stream")
    p.add_argument("--bad-fraction", type=float, default=0.10, help="requests with bad input")
    p.add_argument("--warmup-fraction", type=float, default=0.10, help="RSS baseline after this share finished")
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens per answer (each draws 1/4 to all)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    p.add_argument("--pid", type=int, default=None, help="the server's process id (default: found by its port)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--progress", action="store_true", help="print progress every 100 requests")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = asyncio.run(soak(args))
    summary = report.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            print(f"{key:>18}: {value}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
