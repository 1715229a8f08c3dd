"""Embeddings from a text-generation model: prefill-only forwards that return hidden states instead of sampling.

Ollama's /api/embed (and OpenAI's /v1/embeddings) take any model; for a decoder the embedding is its final hidden
state (after the final norm) at the last token, normalised, unless the model's sentence-transformers files say
otherwise (model/pooling.py: Qwen3-Embedding, for one, says exactly that). AsyncEngine runs these jobs on its
thread between engine steps, so they share the CPU, the weights and the KV pool with generation: a job's texts are
packed into forwards of at most the scheduler's token budget, each on KV blocks taken from the free pool for that
forward alone and returned right after it (BlockManager.take_scratch / free_scratch). No sequence, no sampling, no
prefix-cache entry: nothing outlives the forward. While running requests hold the blocks a forward needs, the job
waits for a step to free some. AsyncEngine runs one forward (a *slice*) of a job between two steps, so a large job
delays a running stream by one forward at a time, never by the whole job; a job whose client left is `cancelled`
and its remaining slices never run.

Not through the scheduler: a prefill that samples nothing and ends at once needs none of its bookkeeping
(chunking, preemption, deltas), and the step's forward is tiered and compiled for logits.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from turbofan.model.batch import ForwardBatch
from turbofan.model.pooling import Pooling, read_pooling


@dataclass
class EmbedJob:
    """One embedding request: its token lists, the caller's future, the rows done so far."""

    rows: list[list[int]]
    future: Any  # an asyncio.Future, settled on the event loop
    out: list[torch.Tensor] = field(default_factory=list)
    done: int = 0
    cancelled: bool = False  # set on the event loop when the caller stops waiting; read on the engine thread


class HiddenStateEmbedder:
    def __init__(self, runner, blocks, pooling: Pooling, max_tokens: int):
        self.runner = runner
        self.blocks = blocks
        self.pooling = pooling
        self.max_tokens = max_tokens
        self.texts_total = 0
        self.forwards_total = 0

    @classmethod
    def for_engine(cls, engine) -> HiddenStateEmbedder:
        pooling = read_pooling(engine.model_path, decoder=True)
        return cls(engine.runner, engine.blocks, pooling, engine.scheduler.max_num_batched_tokens)

    def blocks_for(self, n: int) -> int:
        return -(-n // self.blocks.block_size)

    def advance(self, job: EmbedJob, max_forwards: int | None = None) -> bool:
        """Embed as many of the job's remaining rows as the free KV blocks allow, in at most `max_forwards` forwards
        (None: no limit); True once all are done. No progress (job.done unchanged) means its next row needs more
        blocks than are free now."""
        forwards = 0
        while job.done < len(job.rows) and (max_forwards is None or forwards < max_forwards):
            group, tokens, need = [], 0, 0
            free = self.blocks.num_free_blocks
            for row in itertools.islice(job.rows, job.done, None):
                more = self.blocks_for(len(row))
                if group and (tokens + len(row) > self.max_tokens or need + more > free):
                    break
                group.append(row)
                tokens, need = tokens + len(row), need + more
            scratch = self.blocks.take_scratch(need)
            if scratch is None:  # not even its first row fits now: wait for running requests to free blocks
                return False
            try:
                job.out.append(self.forward(group, scratch))
            finally:
                self.blocks.free_scratch(scratch)
            job.done += len(group)
            forwards += 1
        return job.done == len(job.rows)

    def forward(self, rows: list[list[int]], scratch: list[int]) -> torch.Tensor:
        tables, start = [], 0
        for row in rows:
            n = self.blocks_for(len(row))
            tables.append(scratch[start : start + n])
            start += n
        batch = ForwardBatch.build(rows, [0] * len(rows), tables, [[] for _ in rows], self.blocks.block_size)
        pooled = self.pooling(self.runner.hidden_states(batch), [len(r) for r in rows])
        self.forwards_total += 1
        self.texts_total += len(rows)
        return pooled

    @staticmethod
    def result(job: EmbedJob) -> torch.Tensor:
        return torch.cat(job.out) if job.out else torch.empty(0, 0)
