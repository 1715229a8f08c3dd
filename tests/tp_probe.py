"""Run as a script (a process of its own, since tensor parallelism pins threads and starts torch.distributed):
greedy tokens and prompt logprobs of a few prompts for each model path, as JSON on stdout.

    python tests/tp_probe.py TENSOR_PARALLEL_SIZE MODEL [MODEL ...]
"""

from __future__ import annotations

import json
import sys

PROMPTS = ["The quick brown fox", "Paged attention stores keys and values in", "Continuous batching lets"]


def probe(llm) -> dict:
    from turbofan import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=12, prompt_logprobs=0, ignore_eos=True)
    outs = llm.generate(PROMPTS, sp, use_tqdm=False)
    return {
        "tokens": [o.outputs[0].token_ids for o in outs],
        "texts": [o.outputs[0].text for o in outs],
        "prompt_logprobs": [[None if e is None else next(iter(e.values())).logprob for e in o.prompt_logprobs]
                            for o in outs],  # fmt: skip
    }


def main() -> None:
    from turbofan import LLM

    tp, models = int(sys.argv[1]), sys.argv[2:]
    results = {}
    for model in models:
        llm = LLM(model, tensor_parallel_size=tp, quantization="none", num_kv_blocks=128)
        results[model] = probe(llm)
        close = getattr(llm.engine.runner, "close", None)
        if close is not None:  # one torch.distributed group per process at a time
            close()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
