"""The scheduler: the one owner of request state. It decides who runs each step, and updates them after it.

Each step has a token budget. Running sequences go first (a decode costs one token, an unfinished prefill
takes what the budget leaves), so a long prompt arriving never stalls the streams already running: it is
prefilled in chunks across steps. When the KV cache runs out, the newest running sequence is preempted and
recomputed later (vLLM's recompute policy). A sequence that cannot continue even with the whole cache to itself
(possible only with an oversized context; `default_max_model_len` caps it to the cache) finishes with "length"
instead of stopping the engine.

`schedule()` also lays out which rows of the step need logits (the last token of a finished prefill, every
prompt position whose logprobs were asked for) and which sequence samples from which row; an n > 1 request forks
into its n sequences on the step that completes its prompt, the forks sampling from their parent's row.
`update_from_output()` applies what the sampler drew: it appends each token, detokenizes it, and finishes a
sequence on EOS, a stop token, a stop string or its length.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from turbofan.engine.block_manager import BlockManager
from turbofan.engine.detokenizer import Detokenizer
from turbofan.engine.sequence import Request, Sequence, Status


@dataclass
class PromptLogprobRows:
    """Prompt positions [start, start + count) of `seq` want logprobs; their logits are rows [row, row + count)."""

    seq: Sequence
    row: int
    start: int
    count: int


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens this step)
    logits_offsets: list[list[int]] = field(default_factory=list)  # per scheduled sequence: chunk offsets with logits
    sample: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, logits row) to sample this step
    prompt_logprobs: list[PromptLogprobRows] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write block pairs
    preempted: list[Sequence] = field(default_factory=list)
    truncated: list[Sequence] = field(default_factory=list)  # ended "length": the KV cache cannot hold them
    finished: list[Sequence] = field(default_factory=list)  # finished or aborted since the previous schedule
    drafts: dict[int, list[int]] = field(default_factory=dict)  # seq_id -> speculative tokens scheduled after it

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    blocks: BlockManager  # injected by the container (the two refer to each other's decisions)

    def __init__(
        self,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        detokenizer: Detokenizer | None = None,
        eos_token_ids: list[int] | None = None,
        max_model_len: int = 1 << 30,
    ):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.detokenizer = detokenizer
        self.eos_token_ids = frozenset(eos_token_ids or ())
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}
        self.failed: dict[str, Exception] = {}  # the last update's requests whose own work raised (Engine.step ends them)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._finished: list[Sequence] = []
        self.num_preemptions = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.steps_total = 0
        # told when a sequence gives its KV blocks back (finished, aborted, preempted): a draft model frees its own
        self.release_listeners: list[Callable[[Sequence], None]] = []

    # -- requests -----------------------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.add(request.seqs[0])

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def abort_request(self, request_id: str) -> Request | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.finished:
                seq.finish_reason = "abort"
                self.finish(seq)
        request.metrics.finished_time = time.time()
        return request

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence from the queues and give its blocks back."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = Status.FINISHED
        self._finished.append(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        for listener in self.release_listeners:
            listener(seq)

    # -- deciding -----------------------------------------------------------------------------------------------
    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished=self._finished)
        self._finished = []
        budget = self.max_num_batched_tokens
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            drafts, seq.spec_token_ids = seq.spec_token_ids, []
            n = min(seq.num_tokens + len(drafts) - seq.num_computed_tokens, budget)
            if n <= 0:
                continue
            while not self.blocks.allocate(seq, seq.num_computed_tokens + n, out.copies):
                if n > 1 and drafts:  # drop the speculative tokens before preempting anyone
                    n, drafts = 1, []
                    continue
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                out.scheduled.append((seq, n))
                budget -= n
                if n > 1 and drafts:
                    out.drafts[seq.seq_id] = drafts[: n - 1]
        if out.preempted:  # the cache is full: admitting new work now would only thrash
            gone = {s.seq_id for s in out.preempted}
            out.scheduled = [(s, n) for s, n in out.scheduled if s.seq_id not in gone]
        else:
            self._admit(out, budget)
        if out.scheduled:
            self._layout(out)
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hit = self.blocks.match_prefix(seq)  # a waiting sequence holds no blocks
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.blocks.allocate(seq, seq.num_computed_tokens + n, out.copies):
                self.blocks.release(seq)  # give back the prefix blocks it was about to share
                seq.num_computed_tokens = 0
                if self.running:  # blocks free up as running sequences finish
                    return
                seq.finish_reason = "length"  # alone and still too long: nothing will ever free blocks for it
                self.finish(seq)
                self._end_request(seq.request, time.time())
                out.truncated.append(seq)
                continue
            self.blocks.count_prefix_lookup(seq.num_tokens, hit)
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.num_cached_tokens = hit
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n

    def _layout(self, out: SchedulerOutput) -> None:
        """Which rows of the step need logits, who samples from which, and the forks of n > 1 requests."""
        now = time.time()
        self.steps_total += 1
        row = 0
        for seq, n in out.scheduled:
            start = seq.num_computed_tokens
            request = seq.request
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now
            done = start + n >= seq.num_tokens
            num_drafts = start + n - seq.num_tokens  # speculative tokens: each position is sampled
            n_prompt = request.num_prompt_tokens
            if start < n_prompt:
                self.prompt_tokens_total += min(n, n_prompt - start)
            if request.prompt_logprobs is not None and start < n_prompt - 1:
                computed = len(request.prompt_logprobs) - 1  # a recompute after preemption must not add them twice
                first, stop = max(start, computed), min(start + n, n_prompt - 1)
                if first < stop:
                    out.prompt_logprobs.append(PromptLogprobRows(seq, row + first - start, first, stop - first))
                offsets = list(range(n))
            else:
                offsets = list(range(n - 1 - num_drafts, n)) if done else []
            out.logits_offsets.append(offsets)
            if done:
                sample_row = row + len(offsets) - 1
                out.sample += [(seq, r) for r in range(sample_row - num_drafts, sample_row + 1)]
                if not request.forked:
                    self._fork(seq, start + n, sample_row, out)
            row += len(offsets)

    def _fork(self, seq: Sequence, num_computed: int, row: int, out: SchedulerOutput) -> None:
        """n > 1: the step that completes the prompt forks the request into n sequences sharing its KV blocks."""
        request = seq.request
        request.forked = True
        for index in range(1, request.params.n):
            child = seq.fork(index, num_computed)
            self.blocks.fork(seq, child)
            child.status = Status.RUNNING
            self.running.append(child)
            request.seqs.append(child)
            out.sample.append((child, row))

    # -- updating -----------------------------------------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, tokens: list[int]) -> list[Request]:
        """Apply a step's sampled tokens (one per `out.sample` row); returns the requests that finished.

        A request whose own work raises (its stop scan, its detokenization, its grammar) is recorded in
        `self.failed` and skipped, and the step goes on for the others: Engine.step then ends it with an error. The
        bookkeeping around it (counts, KV blocks) is not guarded, nor is an AssertionError: those are the engine's
        invariants, and a broken one propagates."""
        now = time.time()
        self.failed = {}
        for seq, n in out.scheduled:
            seq.num_computed_tokens += n
            self.blocks.commit(seq)
        finished: list[Request] = []
        for (seq, _), token in zip(out.sample, tokens):
            if seq.status is Status.FINISHED:  # a stop among several verified tokens: the rest are dropped
                continue
            self.generation_tokens_total += 1
            request = seq.request
            metrics = request.metrics
            seq.token_ids.append(token)
            if seq.seq_id in out.drafts:
                self.blocks.commit(seq)
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            metrics.last_token_time = now
            if request.request_id in self.failed:  # a sibling (n > 1) failed already: the request ends
                continue
            try:
                self._check_finish(seq, token)
            except AssertionError:
                raise
            except Exception as exc:  # this request's own work: it ends, the others go on
                self.failed[request.request_id] = exc
                continue
            if seq.finish_reason is not None:
                self.finish(seq)
                if self._end_request(request, now):
                    finished.append(request)
        return finished

    def _check_finish(self, seq: Sequence, token: int) -> None:
        """Detokenize the new token, scan for stop strings, advance the grammar; set why the sequence ends, if
        it does."""
        request = seq.request
        params = request.params
        stop = self.detokenizer.append(seq, token)
        num_out = seq.num_tokens - request.num_prompt_tokens
        enough = num_out >= params.min_tokens
        complete = seq.constraint is not None and seq.constraint.accept(token)  # the grammar allows no more
        if stop is not None:
            seq.finish_reason, seq.stop_reason = "stop", stop
        elif enough and not params.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif enough and token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif complete:
            seq.finish_reason = "stop"
        elif num_out >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"

    def _end_request(self, request: Request, now: float) -> bool:
        """Forget a request whose sequences have all finished; True if it just ended."""
        if request.finished and self.requests.pop(request.request_id, None) is not None:
            request.metrics.finished_time = now
            return True
        return False
