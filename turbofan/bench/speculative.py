"""Speculative decoding on against off, interleaved in one process (ABAB, medians of the per-round ratios).

    python -m turbofan.bench.speculative [--model smollm2:135m] [--rounds 3] [--output-len 128]
        [--speculative-config '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
                                "prompt_lookup_min": 2}']
    python -m turbofan.bench.speculative --model qwen2.5-coder:1.5b --workloads code1 --ignore-eos \
        --speculative-config '{"model": "qwen2.5-coder:0.5b", "num_speculative_tokens": 4}' \
        --llama-server /path/to/llama-server

Two engines on the same weights, one with the speculative config and one without, take turns on each workload
(greedy, ignore_eos off so both stop where the model stops; tokens/s counts the tokens each produced):
- copy, c=1: one chat prompt asking to repeat (and lightly edit) a given text: n-gram lookup's best case;
- free, c=1: one open-ended story prompt: proposals are rare and mostly wrong, speculation must cost ~nothing;
- copy, c=16 and free, c=16: sixteen prompts at once, where the cost model must switch speculation off unless it
  pays for itself;
- code, c=1: one "write this function" chat prompt per run (cycling through CODE_TASKS), the draft model's case.
With `--llama-server`, llama.cpp's server on the same GGUF files (the target's, and `-md` the draft's for a
draft-model config) takes its turns in the same rounds, with and without its draft, on the same prompt token ids
(greedy, /completion; c=1 workloads only). `--ignore-eos` makes every run produce exactly --output-len tokens.
`--control` adds an A/A arm (a second engine without speculation): its ratio to "off" is the noise band a ratio
of this run must be read against.
The speculator's counters give the profile: time proposing (the draft's forwards) and verifying (the target's).
Greedy outputs of the two engines are also compared token for token (identical_outputs): they must all be the
same, since a verified row is computed with the same bits as a decode step would compute it (batch invariance,
turbofan/kernels/attention.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from turbofan.bench.offline import TOPICS

COPY_TEXT = (
    "The lighthouse stood at the edge of the cliff for more than two hundred years. Every night its keeper "
    "climbed the one hundred and twelve steps, trimmed the wick, polished the great lens and watched the ships "
    "pass between the rocks. In winter the storms came from the north and the waves broke over the lower "
    "gallery; in summer the fog rolled in from the sea and the keeper sounded the horn every thirty seconds "
    "until morning. When the light was finally automated, the keeper wrote a letter to the harbour master, "
    "thanking him for the years of company the ships had given him."
)
COPY_TASKS = [
    "Repeat the following text exactly, word for word:\n\n{text}",
    "Copy this paragraph, replacing the word 'keeper' with 'guardian' everywhere:\n\n{text}",
]


CODE_TASKS = [
    "Write a Python function `merge_intervals(intervals)` that merges overlapping intervals, with a docstring, "
    "type hints and a few doctest examples.",
    "Write a Python class `LRUCache` with `get` and `put` in O(1), using a dict and a doubly linked list. "
    "Include type hints and docstrings.",
    "Write a Python function that parses a CSV file of (name, age, city) rows and returns the average age per "
    "city, with error handling for malformed rows.",
    "Implement binary search over a sorted list in Python, iteratively and recursively, with unit tests using "
    "unittest.",
]


def code_prompts(tokenizer, n: int, offset: int = 0) -> list[list[int]]:
    return [
        tokenizer.encode_chat([{"role": "user", "content": CODE_TASKS[(offset + i) % len(CODE_TASKS)]}])
        for i in range(n)
    ]


def copy_prompts(tokenizer, n: int) -> list[list[int]]:
    return [
        tokenizer.encode_chat([{"role": "user", "content": COPY_TASKS[i % len(COPY_TASKS)].format(text=COPY_TEXT)}])
        for i in range(n)
    ]


def free_prompts(tokenizer, n: int) -> list[list[int]]:
    return [
        tokenizer.encode_chat([{"role": "user", "content": f"Write a short story about {TOPICS[i % len(TOPICS)]}."}])
        for i in range(n)
    ]


def run(llm, prompts: list[list[int]], output_len: int, ignore_eos: bool = False) -> tuple[float, list[list[int]]]:
    from turbofan import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=ignore_eos)
    start = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = [o.outputs[0].token_ids for o in outs]
    return sum(len(t) for t in tokens) / seconds, tokens


def cpu_description() -> str:
    flags: set[str] = set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    shown = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16") if f in flags]
    return f"torch capability {torch.backends.cpu.get_cpu_capability()}, flags {','.join(shown)}"


class LlamaServers:
    """llama.cpp's llama-server on the target's GGUF, alone and with the draft's GGUF (`-md`), both kept running
    (idle while the others take their turn); `run` sends one prompt at a time to /completion, greedy."""

    def __init__(self, binary: str, model: str, draft: str | None, k: int, threads: int) -> None:
        from contextlib import ExitStack

        from turbofan.bench.compare import free_port, running
        from turbofan.store import ModelStore

        store = ModelStore()
        gguf = str(store.resolve(model).gguf_file)
        base = [binary, "-m", gguf, "-t", str(threads), "-tb", str(threads), "-np", "1", "-c", "4096"]
        self.commands = {"off": base}
        if draft is not None:
            draft_gguf = str(store.resolve(draft).gguf_file)
            self.commands["on"] = [*base, "-md", draft_gguf, "--spec-type", "draft-simple", "--spec-draft-n-max", str(k),
                                   "-td", str(threads), "-tbd", str(threads)]  # fmt: skip
        self.stack = ExitStack()
        self.urls = {}
        for name, cmd in self.commands.items():
            port = free_port()
            cmd = [*cmd, "--host", "127.0.0.1", "--port", str(port)]
            self.urls[name] = self.stack.enter_context(running(cmd, port, f"/tmp/bench-spec-llama-{name}.log"))
        self.drafted = {name: 0 for name in self.urls}
        self.accepted = {name: 0 for name in self.urls}

    def run(self, name: str, prompts: list[list[int]], output_len: int, ignore_eos: bool) -> float:
        import httpx

        tokens, start = 0, time.perf_counter()
        for ids in prompts:
            body = {"prompt": ids, "n_predict": output_len, "temperature": 0.0, "ignore_eos": ignore_eos}
            r = httpx.post(f"{self.urls[name]}/completion", json=body, timeout=600)
            r.raise_for_status()
            timings = r.json()["timings"]
            tokens += timings["predicted_n"]
            self.drafted[name] += timings.get("draft_n", 0)
            self.accepted[name] += timings.get("draft_n_accepted", 0)
        return tokens / (time.perf_counter() - start)

    def close(self) -> None:
        self.stack.close()


def llama_summary(llama: LlamaServers, rates: dict[str, list[float]], turbofan_on: list[float]) -> dict:
    """llama-server's medians, its own speed-up from its draft, and turbofan-with-speculation / llama's best arm."""
    out = {"llama_off_tok_s": round(statistics.median(rates["off"]), 2)}
    if rates["on"]:
        out["llama_on_tok_s"] = round(statistics.median(rates["on"]), 2)
        out["llama_speedup_median"] = round(statistics.median(b / a for a, b in zip(rates["off"], rates["on"])), 3)
        drafted = llama.drafted.get("on", 0)
        out["llama_acceptance"] = round(llama.accepted["on"] / drafted, 3) if drafted else None
    best = [max(pair) for pair in zip(rates["off"], rates["on"] or rates["off"])]
    out["turbofan_on_vs_llama_best"] = round(statistics.median(t / b for t, b in zip(turbofan_on, best)), 3)
    return out


def main(argv: list[str] | None = None) -> None:
    from turbofan import LLM

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2:135m")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--workloads", default="copy1,free1,copy16,free16", help="copyN, freeN, codeN (N: concurrency)")
    p.add_argument("--ignore-eos", action="store_true", help="every run generates exactly --output-len tokens")
    p.add_argument("--kv-cache-memory", default=None, help="each engine's KV cache (default: the engine's)")
    p.add_argument("--llama-server", default=None, help="also run llama.cpp's llama-server (c=1 workloads)")
    p.add_argument("--control", action="store_true",
                   help="a third arm: a second engine without speculation, taking its turns too; its ratio to 'off' "
                        "is this machine's noise band for the same work (an A/A test)")  # fmt: skip
    p.add_argument(
        "--speculative-config",
        default='{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}',
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec_config = json.loads(args.speculative_config)
    engine_args = {} if args.kv_cache_memory is None else {"kv_cache_memory": args.kv_cache_memory}
    off = LLM(args.model, **engine_args)
    on = LLM(args.model, speculative_config=spec_config, **engine_args)
    engines = {"off": off, "on": on}
    if args.control:
        engines["ctl"] = LLM(args.model, **engine_args)
    tok = off.get_tokenizer()
    llama = None
    if args.llama_server:
        k = spec_config.get("num_speculative_tokens", 4)
        llama = LlamaServers(args.llama_server, args.model, spec_config.get("model"), k, torch.get_num_threads())
    makers = {"copy": copy_prompts, "free": free_prompts, "code": code_prompts}
    workloads = {}
    for name in args.workloads.split(","):
        kind, conc = name.rstrip("0123456789"), int(name.lstrip("abcdefghijklmnopqrstuvwxyz"))
        workloads[name] = makers[kind](tok, conc)
    print(f"# {args.model}, {cpu_description()}, {torch.get_num_threads()} threads, config {spec_config}")
    warm = workloads[next(iter(workloads))][:1]
    for llm in engines.values():  # warm up every engine (kernels, allocator) on a short run
        run(llm, warm, 8)
    for arm in llama.urls if llama else ():
        llama.run(arm, warm, 8, False)
    results = {}
    for name, prompts in workloads.items():
        ratios, rates_on, rates_off, same, control = [], [], [], 0, []
        llama_rates: dict[str, list[float]] = {"off": [], "on": []}
        if llama is not None:
            llama.drafted = dict.fromkeys(llama.urls, 0)
            llama.accepted = dict.fromkeys(llama.urls, 0)
        before = on.speculative_stats()
        for r in range(args.rounds):
            if name.startswith("code"):  # a new task each round, the same for every arm
                prompts = code_prompts(tok, len(prompts), offset=r)
            arms = list(engines)
            if llama is not None and len(prompts) == 1:
                arms += [f"llama-{a}" for a in llama.urls]
            shift = r % len(arms)  # each arm goes first in turn
            got = {}
            for arm in arms[shift:] + arms[:shift]:
                if arm.startswith("llama-"):
                    got[arm] = (llama.run(arm.removeprefix("llama-"), prompts, args.output_len, args.ignore_eos), [])
                else:
                    got[arm] = run(engines[arm], prompts, args.output_len, args.ignore_eos)
            rates_off.append(got["off"][0])
            rates_on.append(got["on"][0])
            ratios.append(got["on"][0] / got["off"][0])
            if "ctl" in got:
                control.append(got["ctl"][0] / got["off"][0])
            same += sum(a == b for a, b in zip(got["on"][1], got["off"][1]))
            for a in llama_rates:
                if f"llama-{a}" in got:
                    llama_rates[a].append(got[f"llama-{a}"][0])
            print(f"  round {r + 1}: " + ", ".join(f"{a} {v[0]:.2f} tok/s" for a, v in got.items()), flush=True)
        after = on.speculative_stats()
        drafted = after["num_draft_tokens"] - before["num_draft_tokens"]
        accepted = after["num_accepted_tokens"] - before["num_accepted_tokens"]
        results[name] = {
            "off_tok_s": round(statistics.median(rates_off), 2),
            "on_tok_s": round(statistics.median(rates_on), 2),
            "speedup_median": round(statistics.median(ratios), 3),
            "speedup_min": round(min(ratios), 3),
            "acceptance": round(accepted / drafted, 3) if drafted else None,
            "draft_tokens_per_round": drafted // args.rounds,
            "identical_outputs": f"{same}/{len(prompts) * args.rounds}",
            # the profile: seconds (all rounds) the speculating engine spent proposing and verifying
            "propose_s": round(after["propose_seconds_total"] - before["propose_seconds_total"], 2),
            "verify_s": round(after["verify_seconds_total"] - before["verify_seconds_total"], 2),
        }
        if control:  # the same work on both arms: how far apart noise alone puts them
            results[name].update(control_median=round(statistics.median(control), 3),
                                 control_min=round(min(control), 3), control_max=round(max(control), 3))  # fmt: skip
        if llama_rates["off"]:
            results[name].update(llama_summary(llama, llama_rates, rates_on))
        print(name, json.dumps(results[name]), flush=True)
    print("speculator:", json.dumps(on.speculative_stats()))
    if llama is not None:
        llama.close()


if __name__ == "__main__":
    main()
