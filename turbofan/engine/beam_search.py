"""Beam search as vLLM v1 does it: a driver over the engine, not a special case inside it.

Each step submits every live beam as a one-token request asking for the top 2 x width logprobs. The beams'
common prompt and shared history hit the prefix cache, so beams share their full KV blocks and only each
beam's last partial block is recomputed.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from turbofan.engine.engine import Engine
from turbofan.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from turbofan.engine.params import SamplingParams

_ids = itertools.count()


@dataclass
class BeamSearchSequence:
    tokens: list[int]
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence] = field(default_factory=list)


def _score(seq: BeamSearchSequence, prompt_len: int, length_penalty: float) -> float:
    return seq.cum_logprob / max(len(seq.tokens) - prompt_len, 1) ** length_penalty


def _run_step(engine: Engine, beams: list[BeamSearchSequence], width: int) -> list[RequestOutput]:
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=2 * width, ignore_eos=True)
    rids = [f"beam-{next(_ids)}" for _ in beams]
    for rid, beam in zip(rids, beams):
        engine.add_request(rid, beam.tokens, params)
    done: dict[str, RequestOutput] = {}
    try:
        while len(done) < len(rids):
            for out in engine.step():
                if out.finished and out.request_id in rids:
                    done[out.request_id] = out
    finally:
        for rid in rids:
            if rid not in done:
                engine.abort_request(rid)
    return [done[r] for r in rids]


def beam_search(
    engine: Engine,
    prompt: str | list[int],
    beam_width: int,
    max_tokens: int,
    length_penalty: float = 1.0,
    ignore_eos: bool = False,
) -> BeamSearchOutput:
    prompt_ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    engine.validate_prompt(prompt_ids, SamplingParams(max_tokens=max_tokens))
    eos = set(engine.sampler.eos_token_ids)
    beams = [BeamSearchSequence(list(prompt_ids))]
    completed: list[BeamSearchSequence] = []
    for _ in range(max_tokens):
        candidates = []
        for beam, out in zip(beams, _run_step(engine, beams, beam_width)):
            for token, lp in out.outputs[0].logprobs[0].items():
                candidates.append(BeamSearchSequence(beam.tokens + [token], beam.cum_logprob + lp.logprob))
        candidates.sort(key=lambda c: c.cum_logprob, reverse=True)
        beams = []
        for cand in candidates[: 2 * beam_width]:
            if not ignore_eos and cand.tokens[-1] in eos:
                cand.finish_reason = "stop"
                completed.append(cand)
            elif len(beams) < beam_width:
                beams.append(cand)
        if not beams:
            break
    for beam in beams:
        beam.finish_reason = "length"
    best = sorted(completed + beams, key=lambda s: _score(s, len(prompt_ids), length_penalty), reverse=True)
    best = best[:beam_width]
    for seq in best:
        seq.text = engine.tokenizer.decode(seq.tokens[len(prompt_ids) :])
    return BeamSearchOutput(best)


def beam_search_output(engine: Engine, prompt: str | list[int], params: SamplingParams) -> RequestOutput:
    """SamplingParams(use_beam_search=True): the n best beams of width best_of, as a RequestOutput."""
    start = time.time()
    result = beam_search(
        engine, prompt, params.beam_width, params.max_tokens or 16, params.length_penalty, params.ignore_eos
    )
    prompt_ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    outputs = [
        CompletionOutput(
            index=i,
            text=s.text or "",
            token_ids=s.tokens[len(prompt_ids) :],
            cumulative_logprob=s.cum_logprob,
            finish_reason=s.finish_reason,
        )
        for i, s in enumerate(result.sequences[: params.n])
    ]
    metrics = RequestMetrics(arrival_time=start, finished_time=time.time())
    return RequestOutput(
        f"beam-{next(_ids)}",
        prompt if isinstance(prompt, str) else None,
        prompt_ids,
        None,
        outputs,
        True,
        metrics,
    )
