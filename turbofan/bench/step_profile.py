"""Where a decode step's time goes: torch.profiler over engine steps at fixed batch sizes.

    python -m turbofan.bench.step_profile [--model smollm2:135m] [--batches 1,16,64] [--steps 10]

Prints the CPU summary, then per batch size the step time, decode tokens/s, the share of the step spent in
matrix multiplies (turbofan::qlinear and any float GEMM) and the top operators by self time. Greedy sampling,
8-token prompts, prefill excluded.
"""

from __future__ import annotations

import argparse
import time

MATMUL_OPS = ("turbofan::qlinear", "aten::mm", "aten::addmm", "aten::bmm")


def profile_batch(engine, batch: int, steps: int, top: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    from turbofan import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=steps * 3 + 8, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"prof{batch}-{i}-{time.monotonic_ns()}", [1 + (i % 50)] * 8, params)
    engine.step()  # the prefill
    for _ in range(3):
        engine.step()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    step_s = (time.perf_counter() - start) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = time.perf_counter() - wall
    while engine.has_unfinished_requests():
        engine.step()
    events = prof.key_averages()
    # Operator self times are in microseconds, on the calling thread.
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    lines = [
        f"### batch {batch}: {step_s * 1e3:.2f} ms/step, {batch / step_s:.0f} tok/s; matmuls {matmul / 1e6 / wall:.0%} of "
        f"the profiled steps' wall time ({matmul / total:.0%} of operator time)",
        "| op | share | calls/step |",
        "| --- | --- | --- |",
    ]
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        lines.append(f"| {e.key} | {e.self_cpu_time_total / total:.1%} | {e.count / steps:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from turbofan import LLM, kernels

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2:135m")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--quantization", default="auto")
    args = p.parse_args(argv)
    llm = LLM(args.model, max_num_seqs=256, quantization=args.quantization)
    print(kernels.cpu_summary())
    for b in (int(x) for x in args.batches.split(",")):
        print(profile_batch(llm.engine, b, args.steps, args.top), flush=True)


if __name__ == "__main__":
    main()
