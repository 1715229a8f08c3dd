"""`turbofan bench serve`: load an OpenAI-compatible server the way `vllm bench serve` does, and time it.

Requests stream over SSE from `/v1/completions` (or `/v1/chat/completions`), arrive all at once or as a Poisson
process (`--request-rate`), and are capped at `--max-concurrency` in flight. Per request we record time to first
token (TTFT), the gaps between streamed chunks (ITL), time per output token after the first (TPOT) and the end-to-
end latency (E2E); the report gives mean, median and p99 of each, and throughput. It works against any server
that speaks the API (turbofan, vLLM, llama.cpp's llama-server), so the numbers compare like for like.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# Common short English words: each is about one token in every BPE vocabulary we serve, which keeps prompt
# lengths close to --input-len when no tokenizer is given.
_WORD_TEXT = (
    "the of and to in is it you that he was for on are as with his they at be this from have or by one had not "
    "but what all were when we there can an your which their said if do will each about how up out them then "
    "she many some so these would other into has more her two like him see time could no make than first been "
    "its who now people my made over did down only way find use may water long little very after words called "
    "just where most know get through back much before go good new write our used me man too any day same right "
    "look think also around another came come work three word must because does part even place well such here"
)
WORDS = _WORD_TEXT.split()


@dataclass
class RequestResult:
    ok: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""
    text: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


# -- prompts ------------------------------------------------------------------------------------------------------
def load_tokenizer(spec: str | None):
    """A `tokenizers.Tokenizer` from an HF directory, a tokenizer.json, or a model-store name; None if not given."""
    if not spec:
        return None
    from tokenizers import Tokenizer

    path = Path(spec).expanduser()
    if path.is_file():
        return Tokenizer.from_file(str(path))
    if not path.is_dir():
        from turbofan.store import ModelStore

        path = Path(ModelStore(os.environ.get("TURBOFAN_MODELS")).resolve(spec).path)
    return Tokenizer.from_file(str(path / "tokenizer.json"))


def make_prompt(rng: random.Random, length: int, tokenizer, index: int) -> str:
    """About `length` tokens of varied text; exact when a tokenizer is given (random ids, decoded, trimmed)."""
    if tokenizer is None:
        return " ".join(rng.choice(WORDS) for _ in range(max(1, length)))
    vocab = tokenizer.get_vocab_size()
    special = {tokenizer.token_to_id(t) for t in tokenizer.get_vocab() if t.startswith("<") and t.endswith(">")}
    ids = [(index + rng.randrange(vocab)) % vocab for _ in range(length)]
    ids = [i if i not in special else (i + 1) % vocab for i in ids]
    text = tokenizer.decode(ids)
    for _ in range(5):  # decoding and re-encoding may merge or split tokens: nudge the text to the length
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) == length:
            break
        if len(ids) > length:
            ids = ids[:length]
        else:
            ids = ids + [rng.randrange(vocab) for _ in range(length - len(ids))]
        text = tokenizer.decode(ids)
    return text


def sample_lengths(rng: random.Random, mean: int, ratio: float) -> int:
    """vLLM's --random-range-ratio: uniform in [mean * (1 - ratio), mean * (1 + ratio)]."""
    if ratio <= 0:
        return mean
    low, high = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.randint(low, high)


def make_workload(
    rng: random.Random, tokenizer, num_prompts: int, input_len: int, output_len: int, ratio: float = 0.0
) -> tuple[list[tuple[int, int]], list[str]]:
    """(input, output) lengths and the prompts of a run, drawn from `rng` in a fixed order, so the same seed gives
    the same requests (bench compare runs them offline too)."""
    lengths = [(sample_lengths(rng, input_len, ratio), sample_lengths(rng, output_len, ratio)) for _ in range(num_prompts)]
    return lengths, [make_prompt(rng, n, tokenizer, i) for i, (n, _) in enumerate(lengths)]


# -- one request --------------------------------------------------------------------------------------------------
async def send(client, url: str, payload: dict, chat: bool) -> RequestResult:
    result = RequestResult()
    start = time.perf_counter()
    last = start
    chunks = 0
    finished = False
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    finished = True
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"])
                    return result
                usage = event.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens", result.prompt_tokens)
                    result.output_tokens = usage.get("completion_tokens", result.output_tokens)
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if not text:
                        continue
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
                    result.text += text
    except Exception as exc:  # a failed request is counted, not fatal
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e = time.perf_counter() - start
    if not finished:
        result.error = "the stream ended before data: [DONE]"
        return result
    if not result.output_tokens:  # the server sent no usage: one streamed chunk is about one token
        result.output_tokens = chunks
    if chunks == 0:  # tokens that decoded to no visible text (or none at all): the answer came at the end
        result.ttft = result.e2e
    result.ok = True
    return result


def build_payload(args: argparse.Namespace, prompt: str, max_tokens: int, chat: bool) -> dict:
    payload: dict = {
        "model": args.model,
        "max_tokens": max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if chat:
        payload["messages"] = [{"role": "user", "content": prompt}]
    else:
        payload["prompt"] = prompt
    if args.ignore_eos:
        payload["ignore_eos"] = True
    if args.top_k is not None:
        payload["top_k"] = args.top_k
    if args.logit_bias:
        payload["logit_bias"] = json.loads(args.logit_bias)
    return payload


# -- the run ------------------------------------------------------------------------------------------------------
async def arrivals(n: int, rate: float, burstiness: float, rng: random.Random):
    """Yield request indices at Poisson (gamma, with burstiness) intervals; all at once when rate is inf."""
    for i in range(n):
        yield i
        if math.isinf(rate) or i == n - 1:
            continue
        theta = 1.0 / (rate * burstiness)
        await asyncio.sleep(rng.gammavariate(burstiness, theta))


async def resolve_model(client, base_url: str) -> str:
    reply = await client.get(f"{base_url}/v1/models")
    reply.raise_for_status()
    return reply.json()["data"][0]["id"]


async def run(args: argparse.Namespace) -> dict:
    import httpx

    rng = random.Random(args.seed)
    tokenizer = load_tokenizer(args.tokenizer)
    base = args.base_url.rstrip("/")
    chat = "chat" in args.endpoint
    url = base + args.endpoint
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = args.max_concurrency or args.num_prompts
    limits = httpx.Limits(max_connections=limit + 2, max_keepalive_connections=limit + 2)
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(6 * 3600), limits=limits) as client:
        if not args.model:
            args.model = await resolve_model(client, base)
        lengths, prompts = make_workload(rng, tokenizer, args.num_prompts, args.input_len, args.output_len,
                                         args.random_range_ratio)  # fmt: skip
        if args.warmup:  # a prompt of its own, so that no measured prompt is in a prefix cache before it is sent
            warm_prompt = make_prompt(rng, min(args.input_len, 16), tokenizer, args.num_prompts)
            warm = await send(client, url, build_payload(args, warm_prompt, 4, chat), chat)
            if not warm.ok:
                raise SystemExit(f"the warm-up request failed: {warm.error}")
        semaphore = asyncio.Semaphore(limit)

        async def one(i: int) -> RequestResult:
            async with semaphore:
                r = await send(client, url, build_payload(args, prompts[i], lengths[i][1], chat), chat)
                if not r.prompt_tokens:
                    r.prompt_tokens = lengths[i][0]
                return r

        start = time.perf_counter()
        tasks = []
        async for i in arrivals(args.num_prompts, args.request_rate, args.burstiness, rng):
            tasks.append(asyncio.create_task(one(i)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(args, results, duration)


def _stats(values: list[float], percentiles: list[float], scale: float = 1000.0) -> dict:
    if not values:
        return {"mean": 0.0, "median": 0.0, "std": 0.0, **{f"p{p:g}": 0.0 for p in percentiles}}
    ordered = sorted(values)
    out = {
        "mean": statistics.fmean(ordered) * scale,
        "median": statistics.median(ordered) * scale,
        "std": (statistics.pstdev(ordered) if len(ordered) > 1 else 0.0) * scale,
    }
    for p in percentiles:
        k = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))
        out[f"p{p:g}"] = ordered[k] * scale
    return out


def summarize(args: argparse.Namespace, results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    percentiles = [float(p) for p in args.percentiles.split(",")]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    errors = sorted({r.error for r in results if not r.ok})
    return {
        "label": args.label,
        "base_url": args.base_url,
        "model": args.model,
        "endpoint": args.endpoint,
        "num_prompts": args.num_prompts,
        "max_concurrency": args.max_concurrency,
        "request_rate": None if math.isinf(args.request_rate) else args.request_rate,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": errors[:5],
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
        "ttft_ms": _stats([r.ttft for r in ok], percentiles),
        "tpot_ms": _stats([t for r in ok if (t := r.tpot) is not None], percentiles),
        "itl_ms": _stats([x for r in ok for x in r.itl], percentiles),
        "e2e_ms": _stats([r.e2e for r in ok], percentiles),
    }


def format_report(s: dict) -> str:
    lines = [f"{' Serving Benchmark Result ':=^60}"]

    def row(label: str, value) -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{label:<44}{text:>16}")

    row("Successful requests:", s["completed"])
    if s["failed"]:
        row("Failed requests:", s["failed"])
    row("Maximum request concurrency:", s["max_concurrency"] or "unlimited")
    row("Request rate (req/s):", "inf" if s["request_rate"] is None else s["request_rate"])
    row("Benchmark duration (s):", s["duration_s"])
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", s["request_throughput"])
    row("Output token throughput (tok/s):", s["output_throughput"])
    row("Total token throughput (tok/s):", s["total_token_throughput"])
    for key, title, short in (
        ("ttft_ms", "Time to First Token", "TTFT"),
        ("tpot_ms", "Time per Output Token (excl. 1st token)", "TPOT"),
        ("itl_ms", "Inter-token Latency", "ITL"),
        ("e2e_ms", "End-to-end Latency", "E2EL"),
    ):
        lines.append(f"{title:-^60}")
        for stat, value in s[key].items():
            if stat == "std":
                continue
            label = stat.capitalize() if not stat.startswith("p") else stat.upper()
            row(f"{label} {short} (ms):", value)
    lines.append("=" * 60)
    if s["errors"]:
        lines.append("errors: " + "; ".join(s["errors"]))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="turbofan bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=os.environ.get("TURBOFAN_BENCH_URL", "http://127.0.0.1:8000"))
    p.add_argument("--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    p.add_argument("--api-key", default=os.environ.get("TURBOFAN_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument(
        "--max-concurrency", "--concurrency", type=int, default=None, help="requests in flight at most (default: all)"
    )
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson arrivals (default inf)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals; 1 = Poisson")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens per request")
    p.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths uniform in len*(1±ratio)")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --output-len tokens")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--logit-bias", default=None, help='JSON sent as logit_bias, e.g. \'{"2": -100}\' bans token 2')
    p.add_argument("--tokenizer", default=None, help="HF dir, tokenizer.json or store name: exact prompt lengths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--percentiles", default="50,99", help="comma-separated percentiles to report")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the warm-up request")
    p.add_argument("--label", default=None, help="a name for this run in the JSON")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    p.add_argument("--result-json", default=None, help="also append the result as one JSON line to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_prompts < 1:
        print("--num-prompts must be at least 1", file=sys.stderr)
        return 2
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_report(result))
    if args.result_json:
        with open(args.result_json, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**result, "time": time.time(), **{"args": asdict_args(args)}}) + "\n")
    return 0 if result["completed"] else 1


def asdict_args(args: argparse.Namespace) -> dict:
    return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in vars(args).items()}


if __name__ == "__main__":
    sys.exit(main())

