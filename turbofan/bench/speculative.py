"""Speculative decoding on against off, interleaved in one process (ABAB, medians of the per-round ratios).

    python -m turbofan.bench.speculative [--model smollm2:135m] [--rounds 3] [--output-len 128]
        [--speculative-config '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
                                "prompt_lookup_min": 2}']

Two engines on the same weights, one with the speculative config and one without, take turns on each workload
(greedy, ignore_eos off so both stop where the model stops; tokens/s counts the tokens each produced):
- copy, c=1: one chat prompt asking to repeat (and lightly edit) a given text: n-gram lookup's best case;
- free, c=1: one open-ended story prompt: proposals are rare and mostly wrong, speculation must cost ~nothing;
- copy, c=16 and free, c=16: sixteen prompts at once, where the cost model must switch speculation off unless it
  pays for itself.
Greedy outputs of the two engines are also compared token for token (identical_outputs): a verify step runs
the matmuls and attention in other shapes than a decode step, so at a float-noise tie between the top two tokens
the two runs may take different tokens, as batching does.
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


def run(llm, prompts: list[list[int]], output_len: int) -> tuple[float, list[list[int]]]:
    from turbofan import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=output_len)
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


def main(argv: list[str] | None = None) -> None:
    from turbofan import LLM

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2:135m")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--workloads", default="copy1,free1,copy16,free16")
    p.add_argument(
        "--speculative-config",
        default='{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}',
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec_config = json.loads(args.speculative_config)
    off = LLM(args.model)
    on = LLM(args.model, speculative_config=spec_config)
    tok = off.get_tokenizer()
    makers = {"copy": copy_prompts, "free": free_prompts}
    workloads = {}
    for name in args.workloads.split(","):
        kind, conc = name.rstrip("0123456789"), int(name.lstrip("abcdefghijklmnopqrstuvwxyz"))
        workloads[name] = makers[kind](tok, conc)
    print(f"# {args.model}, {cpu_description()}, {torch.get_num_threads()} threads, config {spec_config}")
    for llm in (off, on):  # warm up both (kernels, allocator) on a short run
        run(llm, workloads[next(iter(workloads))][:1], 8)
    results = {}
    for name, prompts in workloads.items():
        ratios, rates_on, rates_off, same = [], [], [], 0
        before = on.speculative_stats()
        for r in range(args.rounds):
            order = (off, on) if r % 2 == 0 else (on, off)
            got = {}
            for llm in order:
                got[llm is on] = run(llm, prompts, args.output_len)
            rates_off.append(got[False][0])
            rates_on.append(got[True][0])
            ratios.append(got[True][0] / got[False][0])
            same += sum(a == b for a, b in zip(got[True][1], got[False][1]))
        after = on.speculative_stats()
        drafted = after["num_draft_tokens"] - before["num_draft_tokens"]
        accepted = after["num_accepted_tokens"] - before["num_accepted_tokens"]
        results[name] = {
            "off_tok_s": round(statistics.median(rates_off), 1),
            "on_tok_s": round(statistics.median(rates_on), 1),
            "speedup_median": round(statistics.median(ratios), 3),
            "speedup_min": round(min(ratios), 3),
            "acceptance": round(accepted / drafted, 3) if drafted else None,
            "draft_tokens_per_round": drafted // args.rounds,
            "identical_outputs": f"{same}/{len(prompts) * args.rounds}",
        }
        print(name, json.dumps(results[name]), flush=True)
    print("speculator:", json.dumps(on.speculative_stats()))


if __name__ == "__main__":
    main()
