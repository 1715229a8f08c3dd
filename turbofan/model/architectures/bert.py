"""BERT-family encoders (all-MiniLM, bge, e5): bidirectional attention over packed texts, for embeddings.

Not a CausalLM: no KV cache, no sampling. A batch is *packed*: every text's tokens laid end to end, no padding,
so the matmuls (most of the time) compute real tokens only; attention runs once per run of equal-length texts
(the engine sorts by length, so a batch of short texts has a handful of runs). Weights are read from safetensors
under transformers' names (with or without the `bert.` prefix that *ForMaskedLM checkpoints carry); the fused
q/k/v projection is one matmul per layer. The layers may be cast to bfloat16 (see engine/embedding.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

ARCHITECTURES = ("BertModel", "BertForMaskedLM")


@dataclass
class BertArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_config(cls, cfg: dict) -> BertArgs:
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"BERT position embeddings {cfg['position_embedding_type']!r} are not supported")
        act = cfg.get("hidden_act", "gelu")
        if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"BERT activation {act!r} is not supported (gelu, gelu_new are)")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            max_position=cfg.get("max_position_embeddings", 512),
            type_vocab_size=cfg.get("type_vocab_size", 2),
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
            hidden_act=act,
        )


@dataclass(frozen=True)
class Packed:
    """Texts laid out flat without padding, and where the runs of equal length are (attention's batches)."""

    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long: 0.. within each text
    lengths: tuple[int, ...]  # tokens per text, in layout order
    runs: tuple[tuple[int, int, int], ...]  # (first token, texts, length) per run of equal-length neighbours

    @classmethod
    def build(cls, rows: Sequence[Sequence[int]]) -> Packed:
        lengths = tuple(len(r) for r in rows)
        runs, start, i = [], 0, 0
        while i < len(lengths):
            j = i
            while j < len(lengths) and lengths[j] == lengths[i]:
                j += 1
            runs.append((start, j - i, lengths[i]))
            start += (j - i) * lengths[i]
            i = j
        return cls(
            input_ids=torch.tensor([t for r in rows for t in r], dtype=torch.long),
            positions=torch.cat([torch.arange(n) for n in lengths]),
            lengths=lengths,
            runs=tuple(runs),
        )


class BertLayer(nn.Module):
    def __init__(self, a: BertArgs):
        super().__init__()
        h = a.hidden_size
        self.heads = a.num_heads
        self.qkv = nn.Linear(h, 3 * h)
        self.out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=a.layer_norm_eps)
        self.up = nn.Linear(h, a.intermediate_size)
        self.down = nn.Linear(a.intermediate_size, h)
        self.mlp_norm = nn.LayerNorm(h, eps=a.layer_norm_eps)
        self.approximate = "none" if a.hidden_act == "gelu" else "tanh"

    def attention(self, qkv: torch.Tensor, runs: tuple[tuple[int, int, int], ...]) -> torch.Tensor:
        """Bidirectional attention within each text: one unmasked SDPA per run of equal-length texts."""
        h = qkv.shape[1] // 3
        parts = []
        for start, n, length in runs:
            rows = qkv[start : start + n * length].view(n, length, 3, self.heads, h // self.heads)
            q, k, v = rows.permute(2, 0, 3, 1, 4)
            parts.append(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n * length, h))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def forward(self, x: torch.Tensor, runs: tuple[tuple[int, int, int], ...]) -> torch.Tensor:
        x = self.attn_norm(x + self.out(self.attention(self.qkv(x), runs)))
        return self.mlp_norm(x + self.down(F.gelu(self.up(x), approximate=self.approximate)))


class BertEncoder(nn.Module):
    def __init__(self, a: BertArgs):
        super().__init__()
        self.args = a
        self.word = nn.Embedding(a.vocab_size, a.hidden_size)
        self.position = nn.Embedding(a.max_position, a.hidden_size)
        self.token_type = nn.Embedding(a.type_vocab_size, a.hidden_size)
        self.embed_norm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(a) for _ in range(a.num_layers))

    def forward(self, batch: Packed) -> torch.Tensor:
        """Float32 token states [T, hidden] of a packed batch (the layers run in their own dtype)."""
        x = self.embed_norm(
            self.word(batch.input_ids) + self.position(batch.positions) + self.token_type.weight[0]
        )
        x = x.to(self.layers[0].qkv.weight.dtype) if len(self.layers) else x
        for layer in self.layers:
            x = layer(x, batch.runs)
        return x.float()


_LAYER_NAMES = {
    "attention.output.dense": "out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "up",
    "output.dense": "down",
    "output.LayerNorm": "mlp_norm",
}
_TOP_NAMES = {
    "embeddings.word_embeddings.weight": "word.weight",
    "embeddings.position_embeddings.weight": "position.weight",
    "embeddings.token_type_embeddings.weight": "token_type.weight",
    "embeddings.LayerNorm.weight": "embed_norm.weight",
    "embeddings.LayerNorm.bias": "embed_norm.bias",
}


def _our_name(name: str) -> tuple[str, str | None]:
    """(our parameter name, q/k/v slot or None); "" for tensors we do not use (pooler, MLM head)."""
    name = name.removeprefix("bert.").replace(".gamma", ".weight").replace(".beta", ".bias")
    if name in _TOP_NAMES:
        return _TOP_NAMES[name], None
    parts = name.split(".")
    if parts[:2] != ["encoder", "layer"]:
        return "", None
    rest, leaf = ".".join(parts[3:-1]), parts[-1]
    prefix = f"layers.{parts[2]}."
    if rest.startswith("attention.self."):
        return f"{prefix}qkv.{leaf}", rest.removeprefix("attention.self.")
    return (prefix + _LAYER_NAMES[rest] + "." + leaf, None) if rest in _LAYER_NAMES else ("", None)


def load_bert(path: Path, cfg: dict, device: str = "cpu") -> BertEncoder:
    """The encoder from `path`'s safetensors, in float32."""
    model = BertEncoder(BertArgs.from_config(cfg))
    tensors: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                ours, slot = _our_name(name)
                if slot is not None:
                    qkv.setdefault(ours, {})[slot] = f.get_tensor(name)
                elif ours:
                    tensors[ours] = f.get_tensor(name)
    for ours, parts in qkv.items():
        tensors[ours] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise ValueError(f"checkpoint in {path} is missing tensors for: {', '.join(missing[:8])}")
    for name, param in params.items():
        param.data = tensors[name].to(device=device, dtype=torch.float32).contiguous()
    return model.eval()
