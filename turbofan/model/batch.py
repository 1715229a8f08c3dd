"""ForwardBatch: what one engine step asks of the model, as plain tensors (the model never sees requests)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] long: the new tokens of every scheduled sequence, concatenated
    positions: torch.Tensor  # [T] long: their absolute positions
    slot_mapping: torch.Tensor  # [T] long: KV-cache slot each new token is written to
    query_lens: torch.Tensor  # [B] long: new tokens per sequence
    context_lens: torch.Tensor  # [B] long: tokens in the KV cache per sequence after this step
    block_tables: torch.Tensor  # [B, max_blocks] long, padded with 0
    logits_indices: torch.Tensor  # [N] long: rows of the flat batch to project to the vocabulary
    block_size: int
    # [B] long: each sequence's prompt length; rows at later positions are generated tokens, which the attention
    # kernel computes exactly as a decode step would (batch invariance); None: unknown (a short chunk counts as such)
    prompt_lens: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> ForwardBatch:
        """The same batch with every tensor on `device` (the InputBatch builds it on the host)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return ForwardBatch(**{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                               for k, v in moved.items()})  # fmt: skip

    @property
    def is_decode(self) -> bool:
        """Every sequence adds exactly one token (the shape hot loops live in)."""
        return self.input_ids.shape[0] == self.query_lens.shape[0]

    @classmethod
    def build(
        cls,
        token_chunks: list[list[int]],
        start_positions: list[int],
        block_tables: list[list[int]],
        logits_rows: list[list[int]],
        block_size: int,
    ) -> ForwardBatch:
        """Lay out sequences flat. `logits_rows[i]` are offsets inside sequence i's chunk that need logits."""
        query_lens = torch.tensor([len(c) for c in token_chunks], dtype=torch.long)
        starts = torch.tensor(start_positions, dtype=torch.long)
        seq_index = torch.repeat_interleave(torch.arange(len(token_chunks)), query_lens)
        offsets = torch.cumsum(query_lens, 0) - query_lens
        positions = starts[seq_index] + torch.arange(int(query_lens.sum())) - offsets[seq_index]
        width = max(1, max((len(t) for t in block_tables), default=1))
        tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long)
        blocks = tables[seq_index, positions // block_size]
        logits_indices = [int(offsets[i]) + r for i, rows in enumerate(logits_rows) for r in rows]
        return cls(
            input_ids=torch.tensor([t for c in token_chunks for t in c], dtype=torch.long),
            positions=positions,
            slot_mapping=blocks * block_size + positions % block_size,
            query_lens=query_lens,
            context_lens=starts + query_lens,
            block_tables=tables,
            logits_indices=torch.tensor(logits_indices, dtype=torch.long),
            block_size=block_size,
        )

    def padded_decode(self, batch_size: int, trash_block: int) -> ForwardBatch:
        """A decode batch grown to `batch_size` sequences with one-token dummies that write to the trash block.

        Shapes then depend only on the bucket, which is what a compiled entry is specialised for.
        """
        extra = batch_size - self.query_lens.shape[0]
        if extra <= 0:
            return self
        zeros = torch.zeros(extra, dtype=torch.long)
        ones = torch.ones(extra, dtype=torch.long)
        table = torch.full((extra, self.block_tables.shape[1]), trash_block, dtype=torch.long)
        return ForwardBatch(
            input_ids=torch.cat([self.input_ids, zeros]),
            positions=torch.cat([self.positions, zeros]),
            slot_mapping=torch.cat([self.slot_mapping, zeros + trash_block * self.block_size]),
            query_lens=torch.cat([self.query_lens, ones]),
            context_lens=torch.cat([self.context_lens, ones]),
            block_tables=torch.cat([self.block_tables, table]),
            logits_indices=self.logits_indices,
            block_size=self.block_size,
            prompt_lens=None if self.prompt_lens is None else torch.cat([self.prompt_lens, zeros]),
        )
