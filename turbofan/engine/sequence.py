"""Request (what a user asked) and Sequence (one stream of tokens that owns KV blocks).

A request starts as one sequence; with n > 1 it forks into n sequences after the prompt is computed, and the
forks share the prompt's KV blocks.
"""

from __future__ import annotations

import enum
import itertools
import time

from turbofan.engine.constraints import Constraint
from turbofan.engine.outputs import CompletionOutput, Logprob, RequestMetrics
from turbofan.engine.params import SamplingParams

_seq_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request: Request, index: int, token_ids: list[int]):
        self.seq_id = next(_seq_ids)
        self.request = request
        self.index = index
        self.token_ids = token_ids
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.status = Status.WAITING
        # a seeded request's fork `index` samples with seed + index (vLLM's rule); the uniform for each token is a
        # function of (seed, token index) alone (engine/sampler.py: seeded_uniform)
        self.seed: int | None = None if request.params.seed is None else request.params.seed + index
        self.constraint: Constraint | None = None  # the grammar matcher of a request with structured output
        self.output_text = ""
        self.detokenizer = None  # set by the engine's Detokenizer
        self.logprobs: list[dict[int, Logprob]] | None = [] if request.params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        # bookkeeping of the components that keep state across steps
        self.slot: int | None = None  # row of the InputBatch's per-slot tensors while the sequence is live
        self.num_synced_blocks = 0  # block-table entries the InputBatch has copied (the block manager resets it)
        self.block_hashes: list[bytes] = []  # prefix-cache chain of its full blocks, extended as tokens arrive
        self.num_committed_blocks = 0  # blocks already registered in the prefix cache
        self.num_sent_tokens = 0  # what the output processor has emitted
        self.num_sent_chars = 0
        self.spec_token_ids: list[int] = []  # drafts proposed for the next step (speculative decoding)
        self.spec_state = None  # the Speculator's record of this sequence's acceptance and deopts

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return self.request.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def fork(self, index: int, num_computed_tokens: int) -> Sequence:
        child = Sequence(self.request, index, list(self.token_ids))
        child.num_computed_tokens = num_computed_tokens
        child.block_hashes = list(self.block_hashes)
        child.status = self.status
        child.constraint = self.constraint.fork() if self.constraint is not None else None
        return child

    def to_output(self) -> CompletionOutput:
        """Everything so far (for an abort's answer; running requests stream deltas instead)."""
        return CompletionOutput(
            index=self.index,
            text=self.output_text,
            token_ids=list(self.output_token_ids),
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=None if self.logprobs is None else list(self.logprobs),  # the engine keeps appending
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


class Request:
    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.num_prompt_tokens = len(prompt_token_ids)
        self.metrics = RequestMetrics(arrival_time=arrival_time or time.time())
        self.seqs: list[Sequence] = [Sequence(self, 0, list(prompt_token_ids))]
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            [None] if params.prompt_logprobs is not None else None
        )
        self.num_cached_tokens = 0
        self.forked = params.n == 1
        self.prompt_logprobs_sent = False

    @property
    def finished(self) -> bool:
        return self.forked and all(s.finished for s in self.seqs)
