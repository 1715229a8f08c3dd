"""Megatron-style tensor parallelism for CausalLM: which slice of every matrix a rank keeps, and the collectives
that put the slices back together.

Column-parallel: the fused q/k/v rows (by KV-head groups, each with its query heads) and the fused gate/up rows
(by intermediate channels). Row-parallel: o_proj and down_proj by the matching input columns; their partial
outputs are summed by one all-reduce each. Vocabulary-parallel: each rank embeds the token ids in its vocabulary
range (zeros elsewhere, then an all-reduce) and projects onto its rows of the LM head (then an all-gather).

Heads are split by KV-head groups, as evenly as they go (SmolLM2-135M's 3 KV heads over 2 ranks: 2 + 1), so a
rank's query heads always read its own KV heads and the KV cache is sharded by KV heads. With fewer KV heads than
ranks (Gemma 3 270M: 1 KV head) each KV head is replicated on world/kv ranks, as vLLM does; then the query heads
must split evenly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from turbofan.model.args import ModelArgs
from turbofan.model.layers import CausalLM

# The forward's collectives fail after this long (a dead rank); waiting for the next step never times out.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
IDLE_TIMEOUT = timedelta(days=3650)


def _split(n: int, rank: int, world: int) -> range:
    """The rank-th of `world` contiguous, near-equal parts of range(n)."""
    return range(n * rank // world, n * (rank + 1) // world)


@dataclass(frozen=True)
class Partition:
    """What one rank keeps, as ranges of global indices."""

    rank: int
    world: int
    q_heads: range
    kv_heads: range
    intermediate: range
    vocab: range
    vocab_width: int  # the widest rank's vocabulary range: all-gather needs equal shapes


def partition(args: ModelArgs, rank: int, world: int) -> Partition:
    h, kv = args.num_heads, args.num_kv_heads
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad tensor-parallel rank {rank} of {world}")
    if kv >= world:
        kv_heads = _split(kv, rank, world)
        group = h // kv
        q_heads = range(kv_heads.start * group, kv_heads.stop * group)
    else:
        if world % kv or h % world:
            raise ValueError(
                f"tensor_parallel_size {world} does not fit this model's heads ({h} query, {kv} KV): with fewer KV "
                "heads than ranks, the ranks must be a multiple of the KV heads and divide the query heads"
            )
        kv_index = rank * kv // world
        kv_heads = range(kv_index, kv_index + 1)
        q_heads = _split(h, rank, world)
    if args.intermediate_size < world:
        raise ValueError(f"tensor_parallel_size {world} exceeds the MLP width {args.intermediate_size}")
    return Partition(
        rank=rank,
        world=world,
        q_heads=q_heads,
        kv_heads=kv_heads,
        intermediate=_split(args.intermediate_size, rank, world),
        vocab=_split(args.vocab_size, rank, world),
        vocab_width=-(-args.vocab_size // world),
    )


def check_partition(args: ModelArgs, world: int) -> None:
    """Raise the clear error before any process is started."""
    for rank in range(world):
        partition(args, rank, world)


class TensorParallelGroup:
    """This process's place in the group, and the collectives the sharded model and the runners use."""

    def __init__(self, rank: int, world: int, init_method: str, backend: str = "gloo"):
        self.rank, self.world = rank, world
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialised in this process: one tensor-parallel "
                               "engine per process")  # fmt: skip
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                timeout=COLLECTIVE_TIMEOUT)  # fmt: skip
        # Commands (each step's batch) go through their own gloo group that waits forever: an idle server is fine.
        self.control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def all_gather_columns(self, x: torch.Tensor, widths: list[int], width: int) -> torch.Tensor:
        """[n, own width] on every rank -> [n, sum(widths)], ranks' columns side by side."""
        if x.shape[-1] < width:
            x = F.pad(x, (0, width - x.shape[-1]))
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat([p[:, :w] for p, w in zip(parts, widths)], dim=-1)

    def broadcast(self, obj=None):
        """Rank 0's object, on every rank (pickled; used for each step's command)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def agree_kv_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.broadcast(dtype)

    def sum(self, n: int) -> int:
        t = torch.tensor([n], dtype=torch.long)
        dist.all_reduce(t, group=self.control)
        return int(t.item())

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class VocabParallel:
    """The embedding and LM head of a rank that holds rows `vocab` of both."""

    def __init__(self, part: Partition, args: ModelArgs, group: TensorParallelGroup):
        self.start, self.stop = part.vocab.start, part.vocab.stop
        self.widths = [len(_split(args.vocab_size, r, part.world)) for r in range(part.world)]
        self.width = part.vocab_width
        self.group = group

    def embed(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        inside = (ids >= self.start) & (ids < self.stop)
        local = torch.where(inside, ids - self.start, 0)
        x = F.embedding(local, weight) * inside[:, None].to(weight.dtype)
        return self.group.all_reduce(x)

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        return self.group.all_gather_columns(logits, self.widths, self.width)


def _rows(heads: range, head_dim: int, offset: int = 0) -> torch.Tensor:
    return torch.arange(offset + heads.start * head_dim, offset + heads.stop * head_dim)


class Shard:
    """Cuts a freshly loaded (float) CausalLM down to one rank's part; quantization, if any, comes after."""

    def __init__(self, rank: int, world: int, group: TensorParallelGroup):
        self.rank, self.world, self.group = rank, world, group

    def __call__(self, model: CausalLM) -> None:
        a = model.args
        part = partition(a, self.rank, self.world)
        d = a.head_dim
        local = dataclasses.replace(a, num_heads=len(part.q_heads), num_kv_heads=len(part.kv_heads))
        qkv = torch.cat([
            _rows(part.q_heads, d),
            _rows(part.kv_heads, d, a.num_heads * d),
            _rows(part.kv_heads, d, (a.num_heads + a.num_kv_heads) * d),
        ])  # fmt: skip
        cols = _rows(part.q_heads, d)
        inter = torch.arange(part.intermediate.start, part.intermediate.stop)
        gate_up = torch.cat([inter, inter + a.intermediate_size])
        for layer in model.layers:
            layer.qkv_weight.data = layer.qkv_weight.data.index_select(0, qkv)
            if layer.qkv_bias is not None:
                layer.qkv_bias.data = layer.qkv_bias.data.index_select(0, qkv)
            layer.o_weight.data = layer.o_weight.data.index_select(1, cols)
            layer.gate_up_weight.data = layer.gate_up_weight.data.index_select(0, gate_up)
            layer.down_weight.data = layer.down_weight.data.index_select(1, inter)
            layer.args = local
            layer.q_size, layer.kv_size = local.num_heads * d, local.num_kv_heads * d
            layer.all_reduce = self.group.all_reduce
        tied = model.lm_head.data_ptr() == model.embed.data_ptr()
        embed = model.embed.data[part.vocab.start : part.vocab.stop].clone()
        model.embed.data = embed
        model.lm_head.data = embed if tied else model.lm_head.data[part.vocab.start : part.vocab.stop].clone()
        model.vocab_parallel = VocabParallel(part, a, self.group)

    def agree_kv_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.group.agree_kv_dtype(dtype)

    def sum(self, n: int) -> int:
        return self.group.sum(n)
