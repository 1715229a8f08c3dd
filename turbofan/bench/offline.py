"""Offline throughput: turbofan against Hugging Face transformers, side by side in one process.

    python -m turbofan.bench.offline [--models smollm2:135m,gemma3:270m] [--num-prompts 64] [--output-len 128]

For each model: turbofan on all prompts at once (continuous batching), turbofan single stream, HF `generate`
one prompt at a time, and HF's own continuous batching (`generate_batch`), all with ignore_eos and the same
prompt token ids on the same weights (the converted model-store copy). `--tiering on` also compares decode
tokens/s of tier 0 and tier 1 at fixed batch sizes.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import time

import torch

TOPICS = [
    "the ocean",
    "a lighthouse keeper",
    "bread baking",
    "the history of paper",
    "a robot learning to paint",
    "mountain weather",
    "how bees communicate",
    "a night market",
    "the first bicycle",
    "a library at midnight",
    "volcanoes",
    "a chess tournament",
    "tea ceremonies",
    "migrating birds",
    "a tiny village",
    "the moon landing",
]


def make_prompts(tokenizer, n: int, chat: bool) -> list[list[int]]:
    prompts = []
    for i in range(n):
        text = f"Write a detailed story about {TOPICS[i % len(TOPICS)]}, part {i // len(TOPICS) + 1}."
        if chat:
            prompts.append(tokenizer.encode_chat([{"role": "user", "content": text}]))
        else:
            prompts.append(tokenizer.encode(text))
    return prompts


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_turbofan(llm, prompts: list[list[int]], output_len: int) -> float:
    from turbofan import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    seconds = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / seconds


def bench_hf_single(model, prompts: list[list[int]], output_len: int) -> float:
    tokens, seconds = 0, 0.0
    for ids in prompts:
        x = torch.tensor([ids])
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(x, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False)
        seconds += time.perf_counter() - start
        tokens += out.shape[1] - x.shape[1]
    return tokens / seconds


def bench_hf_batch(model, prompts: list[list[int]], output_len: int) -> float:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=-1, pad_token_id=0)
    # Its default reserves most of free memory for KV; cap it at what the batch needs (4 pages of 256 per request).
    cb = ContinuousBatchingConfig(num_blocks=4 * len(prompts), max_batch_tokens=2048)
    start = time.perf_counter()
    out = model.generate_batch(
        prompts, generation_config=gen, continuous_batching_config=cb
    )  # not inference_mode
    seconds = time.perf_counter() - start
    return sum(len(o.generated_tokens) for o in out.values()) / seconds


def decode_rate(llm, batch: int, output_len: int, repeats: int) -> float:
    """Decode tokens/s at a fixed batch size (prefill excluded), median of `repeats`."""
    from turbofan import SamplingParams

    rates = []
    for r in range(repeats):
        engine = llm.engine
        sp = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"d{r}-{i}-{time.monotonic_ns()}", [1 + (i % 50)] * 8, sp)
        engine.step()  # the prefill
        steps, start = 0, time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        rates.append(batch * steps / (time.perf_counter() - start))
    return statistics.median(rates)


def tier_comparison(llm, args) -> dict:
    """Decode tokens/s per batch size on tier 0 (eager forced) and tier 1 (after tier-up), same process."""
    runner = llm.engine.runner
    tiers = runner.forward_fn
    runner.forward_fn = runner.eager_forward
    tier0 = {b: decode_rate(llm, b, args.output_len, args.repeats) for b in args.decode_batches}
    runner.forward_fn = tiers
    for batch in args.decode_batches:  # drive each bucket hot, let it tier up off the serving path
        decode_rate(llm, batch, args.tier_threshold + 8, 1)
        tiers.wait_idle()
    tier1 = {b: decode_rate(llm, b, args.output_len, args.repeats) for b in args.decode_batches}
    return {"decode_tok_s_tier0": tier0, "decode_tok_s_tier1": tier1, "tiers": tiers.table()}


def run_model(name: str, args) -> dict:
    from transformers import AutoModelForCausalLM

    from turbofan import LLM

    result: dict = {"model": name}
    llm = LLM(
        name,
        tiering=args.tiering,
        tier_threshold=args.tier_threshold,
        max_num_seqs=max(64, args.num_prompts),
        quantization=args.quantization,
    )
    chat = llm.engine.tokenizer.has_chat_template
    prompts = make_prompts(llm.engine.tokenizer, args.num_prompts, chat)
    path = str(llm.engine.container.get("model_path"))
    bench_turbofan(llm, prompts[:4], 8)  # warm-up
    if args.tiering == "on":
        result.update(tier_comparison(llm, args))
    result["turbofan_batch_tok_s"] = statistics.median(
        bench_turbofan(llm, prompts, args.output_len) for _ in range(args.repeats)
    )
    result["turbofan_single_tok_s"] = statistics.median(
        bench_turbofan(llm, prompts[i : i + 1], args.output_len) for i in range(args.repeats)
    )
    if args.decode_batches and args.tiering == "off":
        result["decode_tok_s"] = {b: decode_rate(llm, b, args.output_len, args.repeats) for b in args.decode_batches}
    stats = llm.engine.stats()
    result["prefix_cache_hit_rate"] = stats.prefix_hits / max(stats.prefix_queries, 1)
    result["turbofan_peak_rss_mib"] = peak_rss_mib()
    if args.also_int8:  # the opt-in fast path, same prompts, same process
        del llm
        gc.collect()
        llm = LLM(name, max_num_seqs=max(64, args.num_prompts), quantization="int8")
        bench_turbofan(llm, prompts[:4], 8)
        result["int8_batch_tok_s"] = statistics.median(
            bench_turbofan(llm, prompts, args.output_len) for _ in range(args.repeats)
        )
        result["int8_single_tok_s"] = statistics.median(
            bench_turbofan(llm, prompts[i : i + 1], args.output_len) for i in range(args.repeats)
        )
    del llm
    gc.collect()
    if not args.skip_hf:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        result["hf_single_tok_s"] = bench_hf_single(model, prompts[: args.hf_single_prompts], args.output_len)
        if not args.skip_hf_batch:
            try:
                result["hf_batch_tok_s"] = bench_hf_batch(model, prompts, args.output_len)
            except MemoryError as exc:
                result["hf_batch_error"] = str(exc)
        del model
        gc.collect()
    return result


def report(r: dict) -> str:
    lines = [f"## {r['model']}"]
    for key in (
        "turbofan_batch_tok_s", "turbofan_single_tok_s", "int8_batch_tok_s", "int8_single_tok_s",
        "hf_single_tok_s", "hf_batch_tok_s",
    ):  # fmt: skip
        if key in r:
            lines.append(f"{key:<24} {r[key]:>10.1f}")
    if "hf_single_tok_s" in r:
        lines.append(f"batch vs HF single       {r['turbofan_batch_tok_s'] / r['hf_single_tok_s']:>10.2f}x")
        lines.append(f"single vs HF single      {r['turbofan_single_tok_s'] / r['hf_single_tok_s']:>10.2f}x")
    if "hf_batch_error" in r:
        lines.append(f"HF generate_batch failed: {r['hf_batch_error']}")
    if "hf_batch_tok_s" in r:
        lines.append(f"batch vs HF generate_batch {r['turbofan_batch_tok_s'] / r['hf_batch_tok_s']:>8.2f}x")
    for b, v in (r.get("decode_tok_s") or {}).items():
        lines.append(f"decode tok/s at batch {b:<3} {v:>10.1f}")
    for b, t0 in (r.get("decode_tok_s_tier0") or {}).items():
        t1 = r["decode_tok_s_tier1"][b]
        lines.append(f"decode batch {b:<3} tier0 {t0:>8.1f}  tier1 {t1:>8.1f}  ratio {t1 / t0:>5.2f}x")
    for row in r.get("tiers") or []:
        if row["compile_seconds"] is not None:
            lines.append(f"  {row['key']:<18} compiled in {row['compile_seconds']:.1f} s")
    lines.append(f"turbofan peak RSS MiB    {r['turbofan_peak_rss_mib']:>10.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="turbofan bench offline", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="smollm2:135m,gemma3:270m")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hf-single-prompts", type=int, default=2)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-hf-batch", action="store_true")
    p.add_argument("--tiering", choices=["off", "on"], default="off")
    p.add_argument("--tier-threshold", type=int, default=16)
    p.add_argument("--quantization", choices=["auto", "none", "int8", "int4"], default="auto")
    p.add_argument("--also-int8", action="store_true", help="also measure turbofan with --quantization int8")
    p.add_argument("--decode-batches", type=lambda s: [int(x) for x in s.split(",") if x], default=[])
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = []
    for m in args.models.split(","):
        results.append(run_model(m, args))
        print(report(results[-1]), flush=True)  # as soon as each model is done
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
