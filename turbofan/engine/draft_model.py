"""Draft-model proposer: a smaller model with the target's tokenizer guesses each sequence's next k tokens.

The draft is a second ModelRunner in the engine's process (the same model code, its own weights and paged KV
cache) with a BlockManager of its own, so its KV blocks are allocated, grown and freed by the same code as the
target's. Per sequence it keeps a `DraftSeq`: its block table and how many of the sequence's tokens its KV holds.

Before a step, for every sequence that speculates:
1. catch up: the tokens the draft has not seen (the prompt the first time; later the bonus token and any draft
   it had not written itself) go through the draft in one forward, batched with the other sequences' catch-ups,
   and the logits of the last one give the first draft token;
2. draft: k - 1 more one-token forwards, batched across the sequences, each taking the draft's argmax.
The drafts are greedy, a deterministic function of the sequence, so the Speculator's verification keeps the
target's output exact under greedy and the target's distribution under sampling. The KV the draft wrote for its
own guesses is kept: the guesses the target accepted need no recompute next time, the rejected positions are
overwritten by the next catch-up. A sequence that finishes, is aborted or preempted gives its draft blocks back
(`release`, called by the scheduler through the Speculator).

`cost` is a StepCostModel of the draft's forwards (seconds ~ a + b * tokens): the Speculator charges each draft
token its share of a draft step, so speculation turns itself off where the draft costs more than it returns.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from turbofan.engine.block_manager import BlockManager
from turbofan.engine.sequence import Sequence
from turbofan.engine.spec_cost import StepCostModel
from turbofan.model.batch import ForwardBatch
from turbofan.model.runner import ModelRunner
from turbofan.model.tokenizer import Tokenizer

log = logging.getLogger("turbofan.engine")


def check_same_tokenizer(target: Tokenizer, draft: Tokenizer, draft_name: str) -> None:
    """Refuse a draft whose token ids mean other text than the target's: its guesses would be noise."""
    t_vocab, d_vocab = target.hf.get_vocab(), draft.hf.get_vocab()
    if t_vocab == d_vocab:
        return
    t_by_id = {i: s for s, i in t_vocab.items()}
    d_by_id = {i: s for s, i in d_vocab.items()}
    differ = next((i for i in sorted(set(t_by_id) | set(d_by_id)) if t_by_id.get(i) != d_by_id.get(i)), None)
    raise ValueError(
        f"speculative_config: the draft model {draft_name!r} does not share the target's tokenizer "
        f"({len(d_vocab)} tokens vs the target's {len(t_vocab)}; token id {differ} is "
        f"{d_by_id.get(differ)!r} in the draft and {t_by_id.get(differ)!r} in the target). "
        "A draft model must use the target's vocabulary (e.g. a smaller model of the same family)."
    )


@dataclass
class DraftSeq:
    """What the draft holds of one sequence. It has the fields BlockManager reads (block_table,
    num_computed_tokens, ...), so the draft's blocks are managed by the target's block-manager code."""

    num_computed_tokens: int = 0  # the sequence's tokens whose KV the draft holds
    block_table: list[int] = field(default_factory=list)
    num_synced_blocks: int = 0
    num_committed_blocks: int = 0
    written: list[int] = field(default_factory=list)  # draft tokens whose KV sits just past num_computed_tokens


class DraftModelProposer:
    """Greedy k-token proposals from a draft model, batched across the sequences that speculate."""

    def __init__(self, runner: ModelRunner, target_vocab_size: int, name: str = "draft"):
        self.runner = runner
        self.name = name
        # the draft's own KV blocks; prefix caching off: draft KV is cheap to recompute and never shared
        self.blocks = BlockManager(runner.num_blocks, runner.block_size, enable_prefix_caching=False)
        self.vocab = min(target_vocab_size, runner.args.vocab_size)  # never propose an id the target lacks
        self.max_len = runner.args.max_position
        self.seqs: dict[int, DraftSeq] = {}
        self.cost = StepCostModel()
        self.num_forwards = 0
        self.num_tokens = 0  # tokens the draft has run (catch-up and drafts)

    def __call__(self, seq: Sequence, k: int) -> list[int]:
        return self.propose_batch([(seq, k)])[0]

    def release(self, seq: Sequence) -> None:
        state = self.seqs.pop(seq.seq_id, None)
        if state is not None:
            self.blocks.release(state)

    def _catch_up_start(self, seq: Sequence, state: DraftSeq) -> int:
        """Skip the drafts the draft wrote last time that the sequence has since accepted (their KV is right)."""
        n, last = (
            state.num_computed_tokens,
            seq.num_tokens - 1,
        )  # the last token is always run: its logits draft
        tokens = seq.token_ids
        for token in state.written:
            if n >= last or tokens[n] != token:
                break
            n += 1
        state.written = []
        return min(n, last)

    def propose_batch(self, wanted: list[tuple[Sequence, int]]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in wanted]
        live: list[tuple[int, Sequence, DraftSeq, int]] = []  # (index in wanted, seq, state, k)
        for i, (seq, k) in enumerate(wanted):
            k = min(k, self.max_len - seq.num_tokens + 1)  # the draft writes positions up to num_tokens + k - 2
            if k <= 0:
                continue
            state = self.seqs.get(seq.seq_id)
            if state is None:
                state = self.seqs[seq.seq_id] = DraftSeq()
            state.num_computed_tokens = self._catch_up_start(seq, state)
            if not self.blocks.allocate(state, seq.num_tokens + k - 1, []):
                continue  # the draft's cache is full: this sequence goes without drafts this step
            live.append((i, seq, state, k))
        if not live:
            return out
        # 1. catch up (and the first draft token from the last position's logits)
        chunks = [seq.token_ids[state.num_computed_tokens :] for _, seq, state, _ in live]
        starts = [state.num_computed_tokens for _, _, state, _ in live]
        tokens = self._forward(chunks, starts, [state.block_table for _, _, state, _ in live])
        for (i, seq, state, _), token in zip(live, tokens):
            state.num_computed_tokens = seq.num_tokens
            out[i].append(token)
        # 2. one token at a time for the sequences that want more
        for j in range(1, max(k for *_, k in live)):
            rows = [(i, seq, state) for i, seq, state, k in live if k > j]
            chunks = [[out[i][-1]] for i, _, _ in rows]
            starts = [seq.num_tokens + j - 1 for _, seq, _ in rows]
            tokens = self._forward(chunks, starts, [state.block_table for _, _, state in rows])
            for (i, _, state), token in zip(rows, tokens):
                state.written.append(out[i][-1])
                out[i].append(token)
        return out

    def _forward(self, chunks: list[list[int]], starts: list[int], tables: list[list[int]]) -> list[int]:
        """One draft forward; the argmax of each chunk's last position."""
        begin = time.perf_counter()
        batch = ForwardBatch.build(chunks, starts, tables, [[len(c) - 1] for c in chunks], self.runner.block_size)
        logits = self.runner.execute(batch)
        tokens = torch.argmax(logits[:, : self.vocab], dim=-1).tolist()
        self.cost.observe(batch.num_tokens, time.perf_counter() - begin)
        self.num_forwards += 1
        self.num_tokens += batch.num_tokens
        return tokens

    def describe(self) -> dict:
        """For the Speculator's snapshot (/debug/tiers, LLM.speculative_stats())."""
        a, b = self.cost.coefficients() if self.cost.ready else (None, None)
        return {
            "draft_model": self.name,
            "draft_weights": self.runner.quantization,  # what the draft is served as, e.g. "q4: 97"
            "draft_forwards": self.num_forwards,
            "draft_tokens_run": self.num_tokens,
            "draft_step_fixed_ms": None if a is None else round(a * 1e3, 4),
            "draft_step_per_token_ms": None if b is None else round(b * 1e3, 4),
            "draft_kv_blocks_used": self.blocks.num_blocks - self.blocks.num_free_blocks,
        }
