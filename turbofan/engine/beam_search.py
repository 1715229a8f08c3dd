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
from turbofan.engine.outputs import (
    CompletionDelta,
    OutputBuilder,
    RequestDelta,
    RequestMetrics,
    RequestOutput,
)
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


def _beam_params(width: int) -> SamplingParams:
    return SamplingParams(max_tokens=1, temperature=0.0, logprobs=2 * width, ignore_eos=True)


def _run_step(engine: Engine, beams: list[BeamSearchSequence], width: int) -> list[RequestDelta]:
    """One token for every beam; each request's single delta carries it with its top 2 x width logprobs."""
    rids = [f"beam-{next(_ids)}" for _ in beams]
    for rid, beam in zip(rids, beams):
        engine.add_request(rid, beam.tokens, _beam_params(width))
    done: dict[str, RequestDelta] = {}
    try:
        while len(done) < len(rids):
            for delta in engine.step():
                if delta.finished and delta.request_id in rids:
                    done[delta.request_id] = delta
    finally:
        for rid in rids:
            if rid not in done:
                engine.abort_request(rid)
    return [done[r] for r in rids]


class _Search:
    """The beam bookkeeping, shared by the offline (engine.step) and the server (AsyncEngine) drivers."""

    def __init__(
        self, prompt_ids: list[int], width: int, length_penalty: float, ignore_eos: bool, eos: set[int]
    ):
        self.prompt_ids = list(prompt_ids)
        self.prompt_len = len(prompt_ids)
        self.width, self.length_penalty, self.ignore_eos, self.eos = width, length_penalty, ignore_eos, eos
        self.beams = [BeamSearchSequence(list(prompt_ids))]
        self.completed: list[BeamSearchSequence] = []

    def advance(self, outs: list[RequestDelta]) -> bool:
        """Extend every beam by its candidates, keep the best `width`; False once no beam is live."""
        candidates = []
        for beam, out in zip(self.beams, outs):
            for token, lp in out.outputs[0].logprobs[0].items():
                candidates.append(BeamSearchSequence(beam.tokens + [token], beam.cum_logprob + lp.logprob))
        candidates.sort(key=lambda c: c.cum_logprob, reverse=True)
        self.beams = []
        for cand in candidates[: 2 * self.width]:
            if not self.ignore_eos and cand.tokens[-1] in self.eos:
                cand.finish_reason = "stop"
                self.completed.append(cand)
            elif len(self.beams) < self.width:
                self.beams.append(cand)
        return bool(self.beams)

    def request_output(self, request_id: str, prompt, n: int, start: float, tokenizer) -> RequestDelta:
        """The n best beams as one final delta (what a stream of them holds)."""
        result = self.result(tokenizer)
        outputs = [
            CompletionDelta(
                index=i,
                text=s.text or "",
                token_ids=s.tokens[self.prompt_len :],
                cumulative_logprob=s.cum_logprob,
                finish_reason=s.finish_reason,
            )
            for i, s in enumerate(result.sequences[:n])
        ]
        metrics = RequestMetrics(arrival_time=start, first_scheduled_time=start, finished_time=time.time())
        metrics.first_token_time = metrics.finished_time
        text = prompt if isinstance(prompt, str) else None
        return RequestDelta(request_id, outputs, True, text, self.prompt_ids, metrics)

    def result(self, tokenizer) -> BeamSearchOutput:
        for beam in self.beams:
            beam.finish_reason = "length"
        best = sorted(
            self.completed + self.beams, key=lambda s: _score(s, self.prompt_len, self.length_penalty)
        )
        best = best[::-1][: self.width]
        for seq in best:
            seq.text = tokenizer.decode(seq.tokens[self.prompt_len :])
        return BeamSearchOutput(best)


def _start(engine: Engine, prompt: str | list[int], width: int, max_tokens: int, lp: float, ignore_eos: bool):
    prompt_ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    engine.validate_prompt(prompt_ids, SamplingParams(max_tokens=max_tokens))
    return _Search(prompt_ids, width, lp, ignore_eos, set(engine.sampler.eos_token_ids))


def beam_search(
    engine: Engine,
    prompt: str | list[int],
    beam_width: int,
    max_tokens: int,
    length_penalty: float = 1.0,
    ignore_eos: bool = False,
) -> BeamSearchOutput:
    search = _start(engine, prompt, beam_width, max_tokens, length_penalty, ignore_eos)
    _drive(engine, search, max_tokens)
    return search.result(engine.tokenizer)


def _drive(engine: Engine, search: _Search, max_tokens: int) -> None:
    for _ in range(max_tokens):
        if not search.advance(_run_step(engine, search.beams, search.width)):
            return


async def beam_search_async(async_engine, prompt: str | list[int], params: SamplingParams, request_id: str):
    """The same search driven through an AsyncEngine: each step's beams run as concurrent requests."""
    import asyncio

    engine = async_engine.engine
    width, max_tokens = params.beam_width, params.max_tokens or 16
    search = _start(engine, prompt, width, max_tokens, params.length_penalty, params.ignore_eos)
    start = time.time()

    async def one(beam: BeamSearchSequence, i: int) -> RequestDelta:
        rid = f"{request_id}-b{i}-{next(_ids)}"
        builder = OutputBuilder()
        async for delta in async_engine.generate(beam.tokens, _beam_params(width), rid):
            builder.add(delta)
        out = builder.output()
        c = out.outputs[0]
        return RequestDelta(rid, [CompletionDelta(0, c.text, c.token_ids, c.logprobs)], True, None,
                            out.prompt_token_ids, out.metrics)  # fmt: skip

    for _ in range(max_tokens):
        outs = await asyncio.gather(*(one(b, i) for i, b in enumerate(search.beams)))
        if not search.advance(outs):
            break
    yield search.request_output(request_id, prompt, params.n, start, engine.tokenizer)


def beam_search_output(engine: Engine, prompt: str | list[int], params: SamplingParams) -> RequestOutput:
    """SamplingParams(use_beam_search=True): the n best beams of width max(best_of, n), as a RequestOutput."""
    start = time.time()
    width, max_tokens = params.beam_width, params.max_tokens or 16
    search = _start(engine, prompt, width, max_tokens, params.length_penalty, params.ignore_eos)
    _drive(engine, search, max_tokens)
    delta = search.request_output(f"beam-{next(_ids)}", prompt, params.n, start, engine.tokenizer)
    return OutputBuilder().add(delta).output()
