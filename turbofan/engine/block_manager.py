"""Paged KV-cache bookkeeping: fixed-size blocks, a free list, reference counts, a prefix cache, copy-on-write.

Freed blocks keep their prefix hash and stay findable until the allocator reuses them (least recently freed
first), so a prompt that repeats a recent prefix skips its prefill even after the first request has finished.

A block's key is sha256 over (parent key, its token ids, extra keys), as vLLM keys blocks since advisory
GHSA-rm76-4mrf-v9r8: Python's `hash` of a tuple chain can be made to collide, and a collision would hand one
request another's KV. A hit is also checked token by token against what the block holds, so even a colliding
key (tests force one through `block_key`) never shares a block whose tokens differ.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Sequence as Tokens

from turbofan.engine.sequence import Sequence

ROOT_KEY = bytes(32)


def block_key(parent: bytes, tokens: Tokens[int], extra: bytes = b"") -> bytes:
    """sha256 over the parent block's key, the block's token ids (int64, length-prefixed) and extra keys."""
    h = hashlib.sha256(parent)
    h.update(len(tokens).to_bytes(4, "little"))
    h.update(array("q", tokens).tobytes())
    h.update(extra)
    return h.digest()


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        key_fn: Callable[[bytes, Tokens[int]], bytes] = block_key,
    ):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.key_fn = key_fn
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks  # what a cached block holds
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}  # prefix key -> block id
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found

    # -- accounting ---------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    # -- prefix cache -------------------------------------------------------------------------------------------
    def _chain(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The key chain of `seq`'s first `num_blocks` full blocks; each block is hashed once per sequence."""
        hashes = seq.block_hashes
        if len(hashes) < num_blocks:
            bs, tokens, key = self.block_size, seq.token_ids, self.key_fn
            parent = hashes[-1] if hashes else ROOT_KEY
            for i in range(len(hashes), num_blocks):
                parent = key(parent, tokens[i * bs : (i + 1) * bs])
                hashes.append(parent)
        return hashes

    def match_prefix(self, seq: Sequence) -> int:
        """Point a fresh sequence at cached blocks of its longest cached prefix; returns tokens reused.

        At least one token is always left to compute, because its logits are needed to sample.
        """
        if not self.enable_prefix_caching or seq.block_table or seq.request.prompt_logprobs is not None:
            return 0  # prompt logprobs need the logits of every prompt position, so nothing can be skipped
        bs, tokens = self.block_size, seq.token_ids
        full = (seq.num_tokens - 1) // bs
        for i, h in enumerate(self._chain(seq, full)[:full]):
            block = self.cached.get(h)
            if block is None or self.block_tokens[block] != tuple(tokens[i * bs : (i + 1) * bs]):
                break  # a miss, or a key collision: never share a block holding other tokens
            self._ref(block)
            seq.block_table.append(block)
        hit = len(seq.block_table) * self.block_size
        seq.num_computed_tokens = hit
        seq.num_committed_blocks = len(seq.block_table)
        return hit

    def count_prefix_lookup(self, queried: int, hit: int) -> None:
        """Counted by the scheduler once a sequence is admitted, so retries do not inflate the hit rate."""
        self.prefix_queries += queried
        self.prefix_hits += hit

    def commit(self, seq: Sequence) -> None:
        """Register the blocks of `seq` that became full of computed tokens, so later prompts can share them.

        Only new full blocks are hashed and registered: a decode step costs nothing until a block fills.
        """
        if not self.enable_prefix_caching:
            return
        # (verified speculative tokens are computed before they are appended: only appended ones are hashed)
        full = min(min(seq.num_computed_tokens, seq.num_tokens) // self.block_size, len(seq.block_table))
        start = seq.num_committed_blocks
        if full <= start:
            return
        hashes = self._chain(seq, full)
        bs, tokens = self.block_size, seq.token_ids
        for i in range(start, full):
            block, h = seq.block_table[i], hashes[i]
            if self.block_hash[block] is None and h not in self.cached:
                self.block_hash[block] = h
                self.block_tokens[block] = tuple(tokens[i * bs : (i + 1) * bs])
                self.cached[h] = block
        seq.num_committed_blocks = full

    # -- allocation ---------------------------------------------------------------------------------------------
    def _ref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def _take(self) -> int:
        block, _ = self.free.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:  # evict its prefix entry: the contents are about to be overwritten
            self.cached.pop(h, None)
            self.block_hash[block] = None
            self.block_tokens[block] = None
        self.ref_counts[block] = 1
        return block

    def _unref(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free[block] = None

    def allocate(self, seq: Sequence, num_tokens: int, copies: list[tuple[int, int]]) -> bool:
        """Make `seq` own writable slots for its first `num_tokens` tokens.

        A shared block about to be written (a fork's last partial block) is copied first: (src, dst) goes to
        `copies` for the runner. Returns False, changing nothing, when there are not enough free blocks.
        """
        bs = self.block_size
        first = seq.num_computed_tokens // bs
        cow = first < len(seq.block_table) and self.ref_counts[seq.block_table[first]] > 1
        needed = self.blocks_needed(seq, num_tokens) + int(cow)
        if needed > len(self.free):
            return False
        if cow:
            src = seq.block_table[first]
            dst = self._take()
            self._unref(src)
            seq.block_table[first] = dst
            seq.num_synced_blocks = min(seq.num_synced_blocks, first)
            copies.append((src, dst))
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self._take())
        return True

    def take_scratch(self, num_blocks: int) -> list[int] | None:
        """Blocks for a forward that keeps no KV afterwards (an embedding's prefill: see engine/hidden_states.py),
        never registered in the prefix cache; None, taking nothing, when fewer are free. Give them back with
        free_scratch right after the forward."""
        if num_blocks > len(self.free):
            return None
        return [self._take() for _ in range(num_blocks)]

    def free_scratch(self, blocks: list[int]) -> None:
        for block in blocks:
            self._unref(block)

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the blocks past the first `num_tokens` slots (rejected speculative tokens' KV)."""
        keep = -(-num_tokens // self.block_size)
        while len(seq.block_table) > keep:
            self._unref(seq.block_table.pop())
        seq.num_synced_blocks = min(seq.num_synced_blocks, keep)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        for block in parent.block_table:
            self._ref(block)
        child.block_table = list(parent.block_table)
        child.num_committed_blocks = parent.num_committed_blocks

    def release(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):  # tail blocks are the least likely to be shared: free them first
            self._unref(block)
        seq.block_table = []
        seq.num_synced_blocks = 0
        seq.num_committed_blocks = 0
