"""Turns a batch of logits into next tokens, one vectorised pass for all rows.

Order (as in vLLM): penalties → min_tokens masking → logits processors → temperature → top-k → top-p → min-p →
sample. Sampling is an exponential race (argmax of p / q with q ~ Exp(1)), which equals sampling from p and
lets every seeded row draw its noise from its own generator, so a request's tokens never depend on its batch.
Logprobs are of the raw model distribution (vLLM's default), computed only when some row asks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from turbofan.engine.outputs import Logprob
from turbofan.engine.sequence import Sequence


@dataclass
class SamplerOutput:
    tokens: list[int]
    logprobs: list[float] | None = None  # of each sampled token
    ranks: list[int] | None = None
    top_ids: torch.Tensor | None = None  # [N, k_max]
    top_logprobs: torch.Tensor | None = None


def _padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0) or 1
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows])
    return ids, torch.arange(width)[None, :] < lengths[:, None]


class Sampler:
    def __init__(self, eos_token_ids: list[int], logits_processors: list | None = None):
        self.eos_token_ids = list(eos_token_ids)
        # Engine-wide processors (from plugins) run on every row after the request's own.
        self.logits_processors = list(logits_processors or [])

    def _penalise(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [s.request.params for s in seqs]
        rep = torch.tensor([p.repetition_penalty for p in params])
        pres = torch.tensor([p.presence_penalty for p in params])
        freq = torch.tensor([p.frequency_penalty for p in params])
        if bool((rep != 1).any()):
            windows = []
            for s, p in zip(seqs, params):
                n = p.repeat_last_n
                windows.append([] if n == 0 else s.token_ids[-n:] if n > 0 else s.token_ids)
            ids, valid = _padded(windows)
            seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, ids, valid)
            r = rep[:, None]
            penalised = torch.where(logits > 0, logits / r, logits * r)
            logits = torch.where(seen, penalised, logits)
        if bool((pres != 0).any() or (freq != 0).any()):
            ids, valid = _padded([s.output_token_ids for s in seqs])
            counts = torch.zeros_like(logits).scatter_add_(1, ids, valid.to(logits.dtype))
            logits = logits - freq[:, None] * counts - pres[:, None] * (counts > 0).to(logits.dtype)
        return logits

    def _suppress_stops(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        for i, s in enumerate(seqs):  # only rows still below min_tokens: rare, so a short loop
            p = s.request.params
            if s.num_output_tokens < p.min_tokens:
                banned = ([] if p.ignore_eos else self.eos_token_ids) + p.stop_token_ids
                logits[i, banned] = float("-inf")
        return logits

    def _processors(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        for i, s in enumerate(seqs):
            for proc in [*s.request.params.logits_processors, *self.logits_processors]:
                logits[i] = proc(s.output_token_ids, logits[i])
        return logits

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        params = [s.request.params for s in seqs]
        want_logprobs = [p.logprobs for p in params if p.logprobs is not None]
        raw = logits.log_softmax(-1) if want_logprobs else None
        logits = self._penalise(logits, seqs)
        if any(p.min_tokens for p in params):
            logits = self._suppress_stops(logits.clone(), seqs)
        if self.logits_processors or any(p.logits_processors for p in params):
            logits = self._processors(logits.clone(), seqs)
        greedy = torch.tensor([p.greedy for p in params])
        tokens = logits.argmax(-1)
        if not bool(greedy.all()):
            tokens = torch.where(greedy, tokens, self._random(logits, params, seqs))
        out = SamplerOutput(tokens=tokens.tolist())
        if raw is not None:
            chosen = raw.gather(1, tokens[:, None])
            out.logprobs = chosen[:, 0].tolist()
            out.ranks = ((raw > chosen).sum(-1) + 1).tolist()
            k = max(want_logprobs)
            if k:
                out.top_logprobs, out.top_ids = raw.topk(k, dim=-1)
        return out

    def _random(self, logits: torch.Tensor, params: list, seqs: list[Sequence]) -> torch.Tensor:
        vocab = logits.shape[-1]
        temp = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], dtype=logits.dtype)
        logits = logits / temp[:, None]
        top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params])
        if bool((top_k < vocab).any()):
            kmax = int(top_k[top_k < vocab].max())
            kth = logits.topk(kmax, dim=-1).values.gather(1, (top_k.clamp(max=kmax) - 1)[:, None])
            kth = torch.where((top_k < vocab)[:, None], kth, float("-inf"))
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        top_p = torch.tensor([p.top_p for p in params], dtype=probs.dtype)
        if bool((top_p < 1).any()):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            drop = (sorted_probs.cumsum(-1) - sorted_probs) > top_p[:, None]  # always keeps the top token
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
        min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype)
        if bool((min_p > 0).any()):
            floor = probs.max(-1, keepdim=True).values * min_p[:, None]
            probs = probs.masked_fill(probs < floor, 0.0)
        noise = torch.empty_like(probs).exponential_()
        for i, s in enumerate(seqs):
            if s.generator is not None:
                noise[i].exponential_(generator=s.generator)
        return (probs / noise).argmax(-1)


def top_logprobs_dict(
    token: int, logprob: float, rank: int, top_ids: list[int], top_vals: list[float], decode
) -> dict[int, Logprob]:
    """vLLM's per-position shape: the chosen token plus the top-k, each with its rank and text."""
    entry = {token: Logprob(logprob, rank, decode(token))}
    for r, (tid, val) in enumerate(zip(top_ids, top_vals), start=1):
        entry.setdefault(tid, Logprob(val, r, decode(tid)))
    return entry
