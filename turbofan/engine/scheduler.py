"""Iteration-level scheduling: who runs this step, and how many tokens each.

Each step has a token budget. Running sequences go first (a decode costs one token, an unfinished prefill
takes what the budget leaves), so a long prompt arriving never stalls the streams already running: it is
prefilled in chunks across steps. When the KV cache runs out, the newest running sequence is preempted and
recomputed later (vLLM's recompute policy).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from turbofan.engine.block_manager import BlockManager
from turbofan.engine.sequence import Sequence, Status


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens this step)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write block pairs
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    blocks: BlockManager  # injected by the container (the two refer to each other's decisions)

    def __init__(self, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A fork joins its parent among the running sequences."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n <= 0:
                continue
            while not self.blocks.allocate(seq, seq.num_computed_tokens + n, out.copies):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                out.scheduled.append((seq, n))
                scheduled.add(seq.seq_id)
                budget -= n
        if out.preempted:  # the cache is full: admitting new work now would only thrash
            return self._drop_preempted(out)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hit = self.blocks.match_prefix(seq)  # a waiting sequence holds no blocks
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.blocks.allocate(seq, seq.num_computed_tokens + n, out.copies):
                self.blocks.release(seq)  # give back the prefix blocks it was about to share
                seq.num_computed_tokens = 0
                if not self.running:  # nothing will ever free blocks: fail loudly rather than spin
                    raise MemoryError(
                        f"a sequence of {seq.num_tokens} tokens does not fit in the KV cache "
                        f"({self.blocks.num_blocks} blocks of {self.blocks.block_size} tokens)"
                    )
                break
            self.blocks.count_prefix_lookup(seq.num_tokens, hit)
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.num_cached_tokens = hit
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n
        return out

    def _drop_preempted(self, out: SchedulerOutput) -> SchedulerOutput:
        gone = {s.seq_id for s in out.preempted}
        out.scheduled = [(s, n) for s, n in out.scheduled if s.seq_id not in gone]
        return out

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence from the queues and give its blocks back."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.FINISHED
