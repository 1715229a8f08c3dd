"""Prefix affinity across replicas: conversations that share a long prefix, sent to a `--replicas N` server.

    turbofan serve smollm2:135m --port 8000 --replicas 2 --replica-threads 1 [--affinity-threshold -1]
    python -m turbofan.bench.affinity --base-url http://127.0.0.1:8000 [--conversations 8] [--turns 4]
        [--doc-words 300] [--concurrency 4] [--output-len 16]

Each conversation is one document (a system message of --doc-words words, different per conversation) and
--turns questions about it, each a new chat request repeating the document. Requests go out turn by turn (turn 1
of every conversation, then turn 2, ...), --concurrency in flight, streamed. A replica that already served a
conversation holds the document's KV blocks in its prefix cache and prefills only the question; another replica
prefills the whole document again. Reported: the share of a conversation's later turns served by the replica of
its first turn (`x-turbofan-replica`), TTFT p50/p90 of the later turns (the first turns prefill the document
everywhere) and output tokens/s. Run the server with and without `--affinity-threshold -1` and compare.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx

# fmt: off
WORDS = [
    "river", "stone", "lantern", "harbour", "market", "winter", "orchard", "signal", "copper", "meadow", "engine",
    "ladder", "garden", "bridge", "shadow", "window", "thunder", "canvas", "marble", "forest", "valley", "candle",
    "mirror", "rocket", "pillar", "basket", "violin", "island", "desert", "anchor", "blanket", "castle", "feather",
    "glacier", "hammer", "jungle", "kettle", "lemon", "magnet", "needle", "ocean", "pepper", "quartz", "ribbon",
    "saddle", "tunnel", "umbrella", "velvet", "walnut", "yogurt", "zipper",
]
# fmt: on


def document(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return f"Document {seed}: " + " ".join(rng.choice(WORDS) for _ in range(words))


def ask(client: httpx.Client, url: str, doc: str, question: str, output_len: int) -> dict:
    """One streamed chat request: TTFT (first content), tokens, the replica that served it."""
    body = {
        "messages": [{"role": "system", "content": doc}, {"role": "user", "content": question}],
        "max_tokens": output_len,
        "temperature": 0,
        "stream": True,
    }
    start = time.perf_counter()
    ttft, chunks = None, 0
    with client.stream("POST", url, json=body) as resp:
        resp.raise_for_status()
        replica = resp.headers.get("x-turbofan-replica", "?")
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
    return {
        "ttft": ttft if ttft is not None else time.perf_counter() - start,
        "chunks": chunks,
        "replica": replica,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--doc-words", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="documents differ between seeds (fresh prefix caches)")
    p.add_argument("--label", default="")
    args = p.parse_args(argv)
    url = args.base_url.rstrip("/") + "/v1/chat/completions"
    docs = [document(args.seed * 1000 + c, args.doc_words) for c in range(args.conversations)]
    jobs = [(c, t) for t in range(args.turns) for c in range(args.conversations)]
    first_replica: dict[int, str] = {}
    results: list[tuple[int, int, dict]] = []
    lock = threading.Lock()
    turn_done = [threading.Event() for _ in range(args.turns)]
    left = [args.conversations] * args.turns

    def run(job: tuple[int, int]) -> None:
        c, t = job
        if (
            t > 0
        ):  # a later turn waits for its conversation's first turn to be known (a user answers, then asks)
            turn_done[0].wait()
        r = ask(client, url, docs[c], f"Question {t + 1}: which words appear most often in document {c}?",
                args.output_len)  # fmt: skip
        with lock:
            results.append((c, t, r))
            if t == 0:
                first_replica[c] = r["replica"]
            left[t] -= 1
            if left[t] == 0:
                turn_done[t].set()

    start = time.perf_counter()
    with httpx.Client(timeout=600) as client, ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(run, jobs))
    wall = time.perf_counter() - start
    later = [(c, r) for c, t, r in results if t > 0]
    stayed = sum(r["replica"] == first_replica[c] for c, r in later)
    ttfts = sorted(r["ttft"] * 1e3 for _, r in later)
    out = {
        "label": args.label,
        "requests": len(results),
        "first_turns_per_replica": dict(Counter(first_replica.values())),
        "later_turns_on_first_replica": f"{stayed}/{len(later)}",
        "ttft_p50_ms_later_turns": round(statistics.median(ttfts), 1),
        "ttft_p90_ms_later_turns": round(ttfts[int(0.9 * (len(ttfts) - 1))], 1),
        "ttft_p50_ms_first_turns": round(
            statistics.median(r["ttft"] * 1e3 for _, t, r in results if t == 0), 1
        ),
        "output_tok_s": round(sum(r["chunks"] for _, _, r in results) / wall, 2),
        "wall_s": round(wall, 2),
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
