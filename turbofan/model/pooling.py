"""Pooling token states into one embedding per text, as sentence-transformers configures it.

`modules.json` lists the pipeline (Transformer -> Pooling -> optional Normalize); `1_Pooling/config.json` (or
whatever path modules.json gives) picks the mode: mean over real tokens, the CLS token, or the last real token
(decoder embedding models). A directory without these files pools by mean for encoders and by last token for
decoders, and normalises (what retrieval expects); `sentence_bert_config.json` gives the maximum sequence length.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

POOLING_TYPE = "sentence_transformers.models.Pooling"
NORMALIZE_TYPE = "sentence_transformers.models.Normalize"


@dataclass(frozen=True)
class Pooling:
    mode: str  # "mean" | "cls" | "lasttoken"
    normalize: bool
    max_seq_length: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("mean", "cls", "lasttoken"):
            raise ValueError(f"pooling mode {self.mode!r} is not supported (mean, cls, lasttoken are)")

    def __call__(self, states: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        """states [T, hidden] of texts laid end to end (`lengths` tokens each, none empty) -> [texts, hidden]."""
        lens = torch.tensor(lengths, dtype=torch.long, device=states.device)
        ends = torch.cumsum(lens, 0)
        if self.mode == "cls":
            pooled = states[ends - lens]
        elif self.mode == "lasttoken":
            pooled = states[ends - 1]
        else:
            text = torch.repeat_interleave(torch.arange(len(lens), device=states.device), lens)
            sums = torch.zeros(len(lens), states.shape[1], dtype=states.dtype, device=states.device)
            pooled = sums.index_add_(0, text, states) / lens[:, None].to(states.dtype)
        return F.normalize(pooled, p=2, dim=-1) if self.normalize else pooled


def _read(file: Path) -> dict | list | None:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_pooling(path: Path, decoder: bool = False) -> Pooling:
    """The pooling sentence-transformers would apply to the model in `path`."""
    path = Path(path)
    st = _read(path / "sentence_bert_config.json") or {}
    max_len = st.get("max_seq_length") if isinstance(st, dict) else None
    modules = _read(path / "modules.json")
    if not isinstance(modules, list):
        return Pooling("lasttoken" if decoder else "mean", True, max_len)
    normalize, mode = False, "lasttoken" if decoder else "mean"
    for module in modules:
        kind = module.get("type", "")
        if kind == NORMALIZE_TYPE:
            normalize = True
        elif kind == POOLING_TYPE:
            cfg = _read(path / module.get("path", "") / "config.json") or {}
            modes = [m for m in ("cls_token", "mean_tokens", "lasttoken") if cfg.get(f"pooling_mode_{m}")]
            others = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v and k[13:] not in
                      ("cls_token", "mean_tokens", "lasttoken")]  # fmt: skip
            if others or len(modes) > 1:
                raise ValueError(
                    f"pooling {others or modes} in {path} is not supported (one of mean, cls, lasttoken)"
                )
            if modes:
                mode = {"cls_token": "cls", "mean_tokens": "mean", "lasttoken": "lasttoken"}[modes[0]]
    return Pooling(mode, normalize, max_len)
