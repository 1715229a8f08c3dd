"""`turbofan bench structured`: what a JSON-schema constraint costs a running server, measured A/B interleaved.

Each round sends the same `--concurrency` chat prompts twice, one arm after the other in alternating order
(ABAB…): free text, and the same requests constrained to a JSON schema (an array of objects with a bounded
string, an integer range and an enum: forced key tokens, free tokens and narrow choices in every object). The
schema asks for more objects than fit in `--max-tokens` and the free arm ignores EOS, so both arms generate
exactly `--max-tokens` tokens per request and the comparison is per token. The report gives each arm's median
output throughput over the rounds and their ratio (constrained / free; the target is ≥ 0.9).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

from turbofan.bench.serve import send

SCHEMA = {
    "type": "array",
    "minItems": 1000,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "pet": {"enum": ["cat", "dog", "fish", "parrot"]},
        },
        "required": ["name", "age", "pet"],
        "additionalProperties": False,
    },
}
TOPICS = ["a school class", "a football team", "a book club", "neighbours", "a choir", "a chess club", "a crew",
          "an office", "a family", "a band", "a village", "a lab", "a kitchen", "a studio", "a farm", "a garage"]  # fmt: skip


def payload(model: str, i: int, max_tokens: int, constrained: bool) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"List the people of {TOPICS[i % len(TOPICS)]} with their pets."}],
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": i,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "people", "schema": SCHEMA}}
    else:
        body["ignore_eos"] = True
    return body


async def one_round(client, url: str, model: str, n: int, max_tokens: int, constrained: bool) -> tuple[float, list]:
    start = time.perf_counter()
    results = await asyncio.gather(*(send(client, url, payload(model, i, max_tokens, constrained), True)
                                     for i in range(n)))  # fmt: skip
    duration = time.perf_counter() - start
    bad = [r.error for r in results if not r.ok]
    if bad:
        raise SystemExit(f"requests failed: {bad[:3]}")
    return sum(r.output_tokens for r in results) / duration, results


async def run(args: argparse.Namespace) -> dict:
    import httpx

    url = args.base_url.rstrip("/") + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=args.concurrency + 2)
    rates: dict[str, list[float]] = {"free": [], "json_schema": []}
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600), limits=limits) as client:
        model = args.model or (await client.get(args.base_url.rstrip("/") + "/v1/models")).json()["data"][0]["id"]
        for constrained in (False, True):  # warm-up: kernels, the grammar cache, llguidance's tokenizer
            await one_round(client, url, model, 2, 8, constrained)
        for r in range(args.rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            for constrained in order:
                rate, results = await one_round(client, url, model, args.concurrency, args.max_tokens, constrained)
                rates["json_schema" if constrained else "free"].append(rate)
                if constrained and not all(res.text.startswith("[") for res in results):
                    raise SystemExit("a constrained answer does not start like the schema says")
                print(f"round {r}: {'json_schema' if constrained else 'free':<12} {rate:8.2f} tok/s", flush=True)
    free, constrained = statistics.median(rates["free"]), statistics.median(rates["json_schema"])
    return {
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "free_tok_s": rates["free"],
        "json_schema_tok_s": rates["json_schema"],
        "free_median": round(free, 2),
        "json_schema_median": round(constrained, 2),
        "ratio": round(constrained / free, 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="turbofan bench structured", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=os.environ.get("TURBOFAN_BENCH_URL", "http://127.0.0.1:8000"))
    p.add_argument("--model", default=None)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=4, help="rounds of (free, constrained), alternating the order")
    args = p.parse_args(argv)
    summary = asyncio.run(run(args))
    print(json.dumps(summary, indent=2))
    return 0 if summary["ratio"] >= 0.9 else 1


if __name__ == "__main__":
    raise SystemExit(main())
