"""OutputProcessor: a step's results as one RequestDelta per request it touched — the one place that knows what
each consumer has already been sent, for both APIs and the offline LLM alike.

Each new token is emitted once, with the text it made visible: while a request has stop strings, the last
len(longest stop) - 1 characters are held back so a stream never shows the start of a stop string it will later
remove (a stop string is matched only where the new text could complete it, so the cut never reaches text that
was sent). Logprob dicts (with each candidate's text) are built here, for the rows that asked.
"""

from __future__ import annotations

import contextlib

from turbofan.engine.outputs import CompletionDelta, RequestDelta, RequestOutput
from turbofan.engine.sampler import SamplerOutput, top_logprobs_dict
from turbofan.engine.scheduler import SchedulerOutput
from turbofan.engine.sequence import Request, Sequence
from turbofan.model.tokenizer import Tokenizer


@contextlib.contextmanager
def _isolated(request_id: str, failed: dict[str, Exception]):
    """Record an error of one request's own output work in `failed` instead of raising it (an AssertionError, a
    broken invariant, still propagates)."""
    try:
        yield
    except AssertionError:
        raise
    except Exception as exc:
        failed.setdefault(request_id, exc)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.decode_token = tokenizer.decode_token

    def process(
        self, sched: SchedulerOutput, sampled: SamplerOutput, failed: dict[str, Exception] | None = None
    ) -> list[RequestDelta]:
        """The step's delta of each request it touched. `failed` (request id -> error): requests that already
        failed in this step, left out; a request whose own output work raises (its logprobs, its text) is added
        to it and left out too, and the others still get their deltas."""
        failed = {} if failed is None else failed
        decode = self.decode_token
        for spec, (chosen, ranks, ids, vals) in zip(sched.prompt_logprobs, sampled.prompt_logprobs):
            request = spec.seq.request
            targets = request.prompt_token_ids[spec.start + 1 : spec.start + 1 + spec.count]
            with _isolated(request.request_id, failed):
                request.prompt_logprobs += [
                    top_logprobs_dict(t, lp, r, i, v, decode) for t, lp, r, i, v in zip(targets, chosen, ranks, ids, vals)
                ]
        for j, row in enumerate(sampled.logprob_rows):
            seq = sched.sample[row][0]
            if len(seq.logprobs) >= seq.num_output_tokens:  # dropped after a stop among several verified tokens
                continue
            with _isolated(seq.request.request_id, failed):
                token = sampled.tokens[row]
                lp = sampled.logprobs[j]
                seq.cumulative_logprob += lp
                seq.logprobs.append(top_logprobs_dict(token, lp, sampled.ranks[j], sampled.top_ids[j],
                                                      sampled.top_logprobs[j], decode))  # fmt: skip
        touched: dict[str, list[Sequence]] = {}
        for seq, _ in [*sched.sample, *((s, None) for s in sched.truncated)]:
            touched.setdefault(seq.request.request_id, []).append(seq)
        deltas = []
        for rid, seqs in touched.items():
            if rid in failed:
                continue
            try:
                deltas.append(self._delta(seqs[0].request, seqs))
            except AssertionError:
                raise
            except Exception as exc:  # this request's text or logprobs: it ends, the others go on
                failed[rid] = exc
        return deltas

    def _delta(self, request: Request, seqs: list[Sequence]) -> RequestDelta:
        delta = RequestDelta(
            request_id=request.request_id,
            outputs=[self._completion_delta(s) for s in seqs],
            finished=request.finished,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            metrics=request.metrics,
            num_cached_tokens=request.num_cached_tokens,
        )
        if request.prompt_logprobs is not None and not request.prompt_logprobs_sent:
            request.prompt_logprobs_sent = True
            delta.prompt_logprobs = request.prompt_logprobs
        return delta

    @staticmethod
    def _completion_delta(seq: Sequence) -> CompletionDelta:
        params = seq.request.params
        text = seq.output_text
        visible = len(text)
        if params.stop and not params.include_stop_str_in_output and not seq.finished:
            visible -= max(len(s) for s in params.stop) - 1
        sent = seq.num_sent_chars
        new_text = text[sent:visible] if visible > sent else ""
        seq.num_sent_chars = max(sent, visible)
        n_out = seq.num_tokens - seq.request.num_prompt_tokens
        first = seq.num_sent_tokens
        seq.num_sent_tokens = n_out
        return CompletionDelta(
            index=seq.index,
            text=new_text,
            token_ids=seq.token_ids[seq.num_tokens - (n_out - first) :],
            logprobs=None if seq.logprobs is None else seq.logprobs[first:n_out],
            cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )

    @staticmethod
    def full_output(request: Request) -> RequestOutput:
        """Everything a request has so far, cumulative (what an abort answers with)."""
        seqs = sorted(request.seqs, key=lambda s: s.index)
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=request.prompt_logprobs,
            outputs=[s.to_output() for s in seqs],
            finished=all(s.finished for s in seqs),
            metrics=request.metrics,
            num_cached_tokens=request.num_cached_tokens,
        )
