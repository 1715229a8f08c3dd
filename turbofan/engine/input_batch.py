"""InputBatch: the live sequences' per-slot state, kept across steps, and each step's tensors built from it.

A sequence takes a slot the first time it is scheduled and keeps it until it finishes (through preemption too).
Its sampling parameters, logit bias, block table and, for penalised sequences, its token history live in the
slot's row of persistent tensors, written when the sequence joins and as its blocks and tokens grow, not rebuilt
from Python lists every step. A step gathers the rows it needs: a `ForwardBatch` for the model (the decode-only
step, the hot one, takes a handful of small tensor ops) and a `SamplingBatch` for the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from turbofan.engine.jump_forward import forced_rows
from turbofan.engine.scheduler import PromptLogprobRows, SchedulerOutput
from turbofan.engine.sequence import Sequence
from turbofan.model.batch import ForwardBatch


@dataclass
class Penalties:
    """Repetition, presence and frequency penalties for some rows of the logits, in tensor form."""

    rows: torch.Tensor  # [P] rows of the logits
    rep: torch.Tensor | None = None  # [P] repetition penalty (1 = none)
    rep_ids: torch.Tensor | None = None  # [P, W] tokens in each row's window (padding repeats the last token)
    presence: torch.Tensor | None = None  # [P]
    frequency: torch.Tensor | None = None  # [P]
    out_ids: torch.Tensor | None = None  # [P, W'] output tokens so far
    out_valid: torch.Tensor | None = None  # [P, W'] which of out_ids are real


@dataclass
class SamplingBatch:
    """What the sampler needs for the rows it samples this step (row i of the logits is `seqs[i]`)."""

    seqs: list[Sequence]
    rows: list[int]  # the step's logits row each sequence samples from
    greedy_rows: list[int] = field(default_factory=list)
    random_rows: list[int] = field(default_factory=list)
    temperature: torch.Tensor | None = None  # [M] for random_rows
    top_k: torch.Tensor | None = None  # [M] (vocab size when off)
    top_p: torch.Tensor | None = None  # [M]
    min_p: torch.Tensor | None = None  # [M]
    seeds: list[tuple[int, int] | None] = field(default_factory=list)  # [M]: (seed, index of the token drawn)
    logprob_rows: list[int] = field(default_factory=list)
    logprob_k: list[int] = field(default_factory=list)
    penalties: Penalties | None = None
    bias_ids: torch.Tensor | None = None  # [N, B] token ids, padded with (token 0, bias 0)
    bias_values: torch.Tensor | None = None  # [N, B]
    # rows below min_tokens: (row, whether EOS is banned too, stop token ids)
    banned: list[tuple[int, bool, list[int]]] = field(default_factory=list)
    processor_rows: list[int] = field(default_factory=list)  # rows with their own logits processors
    constrained_rows: list[int] = field(default_factory=list)  # rows whose sequence follows a grammar
    # a grammar's forced drafts (jump_forward.py): {position in the step's sample list: token}; those positions are
    # not rows of this batch, and `positions` says where each row of the batch goes among them
    forced: dict[int, int] = field(default_factory=dict)
    positions: list[int] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprobRows] = field(default_factory=list)  # rows of the full step's logits

    @property
    def num_rows(self) -> int:
        return len(self.seqs)


@dataclass
class StepBatch:
    forward: ForwardBatch
    sampling: SamplingBatch


def _token_indices(sample: list[tuple[Sequence, int]]) -> list[int]:
    """The index in its sequence's token list of the token each sample position draws: num_tokens, and for the
    k + 1 consecutive positions of a sequence with k drafts, num_tokens + 1, ... after it."""
    out: list[int] = []
    prev, j = None, 0
    for seq, _ in sample:
        j = j + 1 if seq is prev else 0
        out.append(seq.num_tokens + j)
        prev = seq
    return out


def _grow(t: torch.Tensor, rows: int, cols: int | None = None, fill: float = 0) -> torch.Tensor:
    """`t` enlarged to `rows` (and, for a matrix, `cols`) with `fill` in the new places."""
    shape = (rows,) if t.dim() == 1 else (rows, t.shape[1] if cols is None else cols)
    out = torch.full(shape, fill, dtype=t.dtype)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


class InputBatch:
    def __init__(self, vocab_size: int, block_size: int, max_model_len: int, capacity: int = 16):
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.capacity = 0
        self.free: list[int] = []
        # per-slot sampling parameters
        self.temperature = torch.ones(0)
        self.top_k = torch.zeros(0, dtype=torch.long)
        self.top_p = torch.ones(0)
        self.min_p = torch.zeros(0)
        self.rep = torch.ones(0)
        self.presence = torch.zeros(0)
        self.frequency = torch.zeros(0)
        self.block_tables = torch.zeros(0, 1, dtype=torch.long)
        self.bias_ids = torch.zeros(0, 0, dtype=torch.long)
        self.bias_values = torch.zeros(0, 0)
        self.history: torch.Tensor | None = None  # [capacity, max_model_len] tokens of penalised slots
        # per-slot facts the Python side branches on
        self.seqs: list[Sequence | None] = []
        self.greedy: list[bool] = []
        self.penalised: list[bool] = []
        self.history_len: list[int] = []
        self.has_bias: list[bool] = []
        self.num_biased = 0
        self._grow_slots(capacity)

    # -- slots ----------------------------------------------------------------------------------------------------
    def _grow_slots(self, capacity: int) -> None:
        old = self.capacity
        self.temperature = _grow(self.temperature, capacity, fill=1.0)
        self.top_k = _grow(self.top_k, capacity, fill=self.vocab_size)
        self.top_p = _grow(self.top_p, capacity, fill=1.0)
        self.min_p = _grow(self.min_p, capacity)
        self.rep = _grow(self.rep, capacity, fill=1.0)
        self.presence = _grow(self.presence, capacity)
        self.frequency = _grow(self.frequency, capacity)
        self.block_tables = _grow(self.block_tables, capacity)
        self.bias_ids = _grow(self.bias_ids, capacity)
        self.bias_values = _grow(self.bias_values, capacity)
        if self.history is not None:
            self.history = _grow(self.history, capacity)
        extra = capacity - old
        self.seqs += [None] * extra
        self.greedy += [True] * extra
        self.penalised += [False] * extra
        self.history_len += [0] * extra
        self.has_bias += [False] * extra
        self.free += list(range(capacity - 1, old - 1, -1))
        self.capacity = capacity

    def add(self, seq: Sequence) -> int:
        """Give `seq` a slot and write its sampling parameters there."""
        if not self.free:
            self._grow_slots(2 * self.capacity)
        slot = self.free.pop()
        seq.slot = slot
        seq.num_synced_blocks = 0
        self.seqs[slot] = seq
        p = seq.request.params
        self.greedy[slot] = p.greedy
        self.temperature[slot] = 1.0 if p.greedy else p.temperature
        self.top_k[slot] = p.top_k if 0 < p.top_k < self.vocab_size else self.vocab_size
        self.top_p[slot] = p.top_p
        self.min_p[slot] = p.min_p
        self.rep[slot] = p.repetition_penalty
        self.presence[slot] = p.presence_penalty
        self.frequency[slot] = p.frequency_penalty
        self.block_tables[slot] = 0
        rep = p.repetition_penalty != 1.0 and p.repeat_last_n != 0
        self.penalised[slot] = rep or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
        self.history_len[slot] = 0
        if self.penalised[slot] and self.history is None:
            self.history = torch.zeros(self.capacity, self.max_model_len, dtype=torch.long)
        bias = p.logit_bias
        self.has_bias[slot] = bool(bias)
        if bias:
            self.num_biased += 1
            if len(bias) > self.bias_ids.shape[1]:
                self.bias_ids = _grow(self.bias_ids, self.capacity, len(bias))
                self.bias_values = _grow(self.bias_values, self.capacity, len(bias))
            self.bias_ids[slot] = 0
            self.bias_values[slot] = 0.0
            self.bias_ids[slot, : len(bias)] = torch.tensor(list(bias), dtype=torch.long)
            self.bias_values[slot, : len(bias)] = torch.tensor(list(bias.values()))
        return slot

    def remove(self, seq: Sequence) -> None:
        slot = seq.slot
        if slot is None:
            return
        seq.slot = None
        self.seqs[slot] = None
        if self.has_bias[slot]:
            self.num_biased -= 1
            self.has_bias[slot] = False
        self.free.append(slot)

    @property
    def num_live(self) -> int:
        return self.capacity - len(self.free)

    # -- a step ---------------------------------------------------------------------------------------------------
    def prepare(self, sched: SchedulerOutput) -> StepBatch | None:
        """The step's model input and sampling rows; None when nothing is scheduled."""
        for seq in sched.finished:
            self.remove(seq)
        if not sched.scheduled:
            return None
        for seq, _ in sched.scheduled:
            if seq.slot is None:
                self.add(seq)
            self._sync_blocks(seq)
        for seq, _ in sched.sample:
            if seq.slot is None:  # a fork, sampling for the first time
                self.add(seq)
        sampling = self.sampling_batch(sched.sample, sched.prompt_logprobs, forced_rows(sched.sample, sched.drafts))
        return StepBatch(self._forward(sched), sampling)

    def _sync_blocks(self, seq: Sequence) -> None:
        table = seq.block_table
        start = seq.num_synced_blocks
        if start >= len(table):
            return
        if len(table) > self.block_tables.shape[1]:
            width = max(len(table), 2 * self.block_tables.shape[1])
            self.block_tables = _grow(self.block_tables, self.capacity, width)
        row = self.block_tables[seq.slot]
        if start == 0:
            row.zero_()  # a fresh or released table: nothing stale may follow its entries
        row[start : len(table)] = torch.tensor(table[start:], dtype=torch.long)
        seq.num_synced_blocks = len(table)

    def _forward(self, sched: SchedulerOutput) -> ForwardBatch:
        bs = self.block_size
        seqs = [s for s, _ in sched.scheduled]
        width = max(1, max(len(s.block_table) for s in seqs))
        slots = torch.tensor([s.slot for s in seqs], dtype=torch.long)
        tables = self.block_tables[slots, :width]
        b = len(seqs)
        if len(sched.sample) == b and all(n == 1 for _, n in sched.scheduled) and all(
            o == [0] for o in sched.logits_offsets
        ):  # decode: one token per sequence, each sampled
            starts = [s.num_computed_tokens for s in seqs]
            positions = torch.tensor(starts, dtype=torch.long)
            input_ids = torch.tensor([s.token_ids[p] for s, p in zip(seqs, starts)], dtype=torch.long)
            blocks = tables.gather(1, (positions // bs)[:, None])[:, 0]
            return ForwardBatch(
                input_ids=input_ids,
                positions=positions,
                slot_mapping=blocks * bs + positions % bs,
                query_lens=torch.ones(b, dtype=torch.long),
                context_lens=positions + 1,
                block_tables=tables,
                logits_indices=torch.arange(b),
                block_size=bs,
                prompt_lens=torch.tensor([s.request.num_prompt_tokens for s in seqs], dtype=torch.long),
            )
        ids: list[int] = []
        lens: list[int] = []
        starts = []
        logits_indices: list[int] = []
        for (seq, n), offsets in zip(sched.scheduled, sched.logits_offsets):
            start = seq.num_computed_tokens
            logits_indices += [len(ids) + o for o in offsets]
            ids += seq.token_ids[start : start + n]
            if sched.drafts:
                ids += sched.drafts.get(seq.seq_id, ())  # speculative tokens follow the sequence's last one
            lens.append(n)
            starts.append(start)
        query_lens = torch.tensor(lens, dtype=torch.long)
        start_t = torch.tensor(starts, dtype=torch.long)
        seq_index = torch.repeat_interleave(torch.arange(b), query_lens)
        offsets_t = torch.cumsum(query_lens, 0) - query_lens
        positions = start_t[seq_index] + torch.arange(len(ids)) - offsets_t[seq_index]
        blocks = tables[seq_index, positions // bs]
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long),
            positions=positions,
            slot_mapping=blocks * bs + positions % bs,
            query_lens=query_lens,
            context_lens=start_t + query_lens,
            block_tables=tables,
            logits_indices=torch.tensor(logits_indices, dtype=torch.long),
            block_size=bs,
            prompt_lens=torch.tensor([s.request.num_prompt_tokens for s in seqs], dtype=torch.long),
        )

    def sampling_batch(
        self,
        sample: list[tuple[Sequence, int]],
        prompt_logprobs: list[PromptLogprobRows] = (),
        forced: dict[int, int] | None = None,
    ) -> SamplingBatch:
        """The sampler's view of (sequence, logits row) pairs; every sequence must hold a slot. `forced`: positions
        of `sample` whose token is already known (a grammar's forced drafts), left out of the rows sampled."""
        positions: list[int] = []
        token_index = _token_indices(sample) if any(s.seed is not None for s, _ in sample) else []
        if forced:
            positions = [i for i in range(len(sample)) if i not in forced]
            sample = [sample[i] for i in positions]
        seqs = [s for s, _ in sample]
        batch = SamplingBatch(seqs, [r for _, r in sample], prompt_logprobs=list(prompt_logprobs))
        batch.forced, batch.positions = forced or {}, positions
        if not seqs:
            return batch
        slots = [s.slot for s in seqs]
        greedy = self.greedy
        for i, slot in enumerate(slots):
            (batch.greedy_rows if greedy[slot] else batch.random_rows).append(i)
        if batch.random_rows:
            idx = torch.tensor([slots[i] for i in batch.random_rows], dtype=torch.long)
            batch.temperature = self.temperature[idx]
            batch.top_k = self.top_k[idx]
            batch.top_p = self.top_p[idx]
            batch.min_p = self.min_p[idx]
            at = positions or range(len(seqs))  # row -> its position in the step's sample list
            batch.seeds = [None if seqs[i].seed is None else (seqs[i].seed, token_index[at[i]]) for i in batch.random_rows]
        if self.num_biased:
            idx = torch.tensor(slots, dtype=torch.long)
            batch.bias_ids = self.bias_ids[idx]
            batch.bias_values = self.bias_values[idx]
        penalised = [i for i, slot in enumerate(slots) if self.penalised[slot]]
        if penalised:
            batch.penalties = self._penalties(seqs, penalised)
        for i, seq in enumerate(seqs):
            p = seq.request.params
            if p.logprobs is not None:
                batch.logprob_rows.append(i)
                batch.logprob_k.append(p.logprobs)
            if p.min_tokens and seq.num_tokens - seq.request.num_prompt_tokens < p.min_tokens:
                batch.banned.append((i, not p.ignore_eos, p.stop_token_ids))
            if p.logits_processors:
                batch.processor_rows.append(i)
            if seq.constraint is not None and seq.constraint.active:
                batch.constrained_rows.append(i)
        return batch

    def _penalties(self, seqs: list[Sequence], rows: list[int]) -> Penalties:
        """Bring the penalised rows' token histories up to date and lay out their windows."""
        hist = self.history
        assert hist is not None
        width = hist.shape[1]
        flat_pos: list[int] = []
        flat_tok: list[int] = []
        for i in rows:
            seq = seqs[i]
            slot = seq.slot
            have, n = self.history_len[slot], seq.num_tokens
            if have < n:
                flat_pos += range(slot * width + have, slot * width + n)
                flat_tok += seq.token_ids[have:n]
                self.history_len[slot] = n
        if flat_pos:
            hist.view(-1)[torch.tensor(flat_pos, dtype=torch.long)] = torch.tensor(flat_tok, dtype=torch.long)
        slots = torch.tensor([seqs[i].slot for i in rows], dtype=torch.long)
        out = Penalties(rows=torch.tensor(rows, dtype=torch.long))
        params = [seqs[i].request.params for i in rows]
        lens = [seqs[i].num_tokens for i in rows]
        rep_rows = [p.repetition_penalty != 1.0 and p.repeat_last_n != 0 for p in params]
        if any(rep_rows):
            windows = [
                0 if not r else n if p.repeat_last_n < 0 else min(n, p.repeat_last_n)
                for r, p, n in zip(rep_rows, params, lens)
            ]
            out.rep = torch.tensor([p.repetition_penalty if r else 1.0 for r, p in zip(rep_rows, params)])
            out.rep_ids = self._window(slots, lens, windows)[0]
        if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params):
            outputs = [n - seqs[i].request.num_prompt_tokens for i, n in zip(rows, lens)]
            out.presence = torch.tensor([p.presence_penalty for p in params])
            out.frequency = torch.tensor([p.frequency_penalty for p in params])
            out.out_ids, out.out_valid = self._window(slots, lens, outputs)
        return out

    def _window(self, slots: torch.Tensor, lens: list[int], windows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The last `windows[i]` tokens of each slot's history as [P, max window]; padding repeats the last token
        (so a scatter writes it twice with the same value) and is marked invalid."""
        width = self.history.shape[1]
        w = max(1, max(windows))
        lens_t = torch.tensor(lens, dtype=torch.long)
        win_t = torch.tensor(windows, dtype=torch.long)
        col = torch.arange(w)
        valid = col[None, :] < win_t[:, None]
        pos = torch.where(valid, (lens_t - win_t)[:, None] + col[None, :], (lens_t - 1)[:, None])
        ids = self.history.view(-1)[slots[:, None] * width + pos]
        return ids, valid
