"""Turns a batch of logits into next tokens: batched tensor ops on the rows that need them, nothing per token.

Order (as in vLLM): grammar bitmask (constrained rows only) → penalties → min_tokens masking → logit bias → logits processors → then greedy rows take the
argmax, and the others go temperature → top-k → top-p → min-p → sample. Greedy rows pay for nothing else.

Top-p is computed inside the top-k candidates (one `topk` of the raw logits, never a full-vocabulary sort; the
temperature scales only the candidates): a row with top_k keeps its k best, renormalised; a row with only top_p
starts from its 128 best and widens (x16) until they hold top_p of its mass, so its nucleus is found exactly and
identically whatever the width. A row without either samples the whole vocabulary through a two-level CDF (block
sums, then one block). Every draw inverts the kept distribution's CDF with one uniform per row; a seeded row's
uniform is a function of its seed and the index of the token it draws, so its tokens never depend on its batch
mates, on which path its mates took, or on speculation verifying several of its positions in one step. Logprobs
are of the raw model distribution (vLLM's default), computed only for the rows that ask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from turbofan import kernels
from turbofan.engine.constraints import GrammarMasks, narrow_top_k
from turbofan.engine.errors import RequestFailedError
from turbofan.engine.input_batch import Penalties, SamplingBatch
from turbofan.engine.outputs import Logprob

P_ONLY_FIRST_WIDTH = 128  # candidates a top-p-only row starts from
P_ONLY_WIDEN = 16


@dataclass
class SamplerOutput:
    tokens: list[int]
    # for the rows that asked for logprobs (`logprob_rows`, in order): the sampled token's logprob and rank, and
    # the row's own top-k (ids, logprobs)
    logprob_rows: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)
    # per PromptLogprobRows of the batch: (chosen logprobs, ranks, top ids, top logprobs), one entry per position
    prompt_logprobs: list[tuple[list[float], list[int], list[list[int]], list[list[float]]]] = field(
        default_factory=list
    )


class Sampler:
    def __init__(self, eos_token_ids: list[int], logits_processors: list | None = None):
        self.eos_token_ids = list(eos_token_ids)
        # Engine-wide processors (from plugins) run on every row after the request's own.
        self.logits_processors = list(logits_processors or [])
        self.grammar_masks = GrammarMasks()

    def start_grammar_masks(self, batch: SamplingBatch, vocab: int) -> None:
        """Begin filling the constrained rows' bitmasks, so they are computed while the forward runs."""
        if batch.constrained_rows:
            self.grammar_masks.start(_constraints(batch), vocab)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """`logits` holds every logits row of the step; `batch.rows` are the ones sampled (a fork shares its
        parent's), and the sampled rows may be modified in place."""
        n = batch.num_rows
        prompt_lp = [self._prompt_logprobs(logits, r) for r in batch.prompt_logprobs]
        if batch.rows != list(range(logits.shape[0])):
            logits = logits[batch.rows]
        raw = logits[batch.logprob_rows].log_softmax(-1) if batch.logprob_rows else None
        if batch.constrained_rows:  # before everything else, so penalties and bias cannot revive a banned token
            allowed = self.grammar_masks.apply(logits, _constraints(batch), batch.constrained_rows)
            narrow_top_k(batch, batch.constrained_rows, allowed)
        if batch.penalties is not None:
            _penalise(logits, batch.penalties)
        if batch.banned:
            for row, eos, stops in batch.banned:
                logits[row, (self.eos_token_ids if eos else []) + stops] = float("-inf")
        if batch.bias_ids is not None:
            logits.scatter_add_(1, batch.bias_ids, batch.bias_values.to(logits.dtype))
        if batch.processor_rows or self.logits_processors:
            self._processors(logits, batch)
        if not batch.random_rows:
            tokens = argmax(logits)
        elif not batch.greedy_rows:
            tokens = self._random(logits, batch)
        else:
            tokens = torch.empty(n, dtype=torch.long)
            greedy = torch.tensor(batch.greedy_rows)
            rand = torch.tensor(batch.random_rows)
            tokens[greedy] = argmax(logits[greedy])
            tokens[rand] = self._random(logits[rand], batch)
        out = SamplerOutput(tokens=tokens.tolist(), prompt_logprobs=prompt_lp)
        if raw is not None:
            self._logprobs(raw, tokens[batch.logprob_rows], batch, out)
        if batch.forced:
            _merge_forced(out, batch)
        return out

    def _processors(self, logits: torch.Tensor, batch: SamplingBatch) -> None:
        rows = range(batch.num_rows) if self.logits_processors else batch.processor_rows
        for i in rows:
            seq = batch.seqs[i]
            outputs = seq.output_token_ids
            own = seq.request.params.logits_processors
            try:  # a request's own processor that raises ends that request only
                for proc in own:
                    logits[i] = proc(outputs, logits[i])
            except Exception as exc:
                raise RequestFailedError([seq.request.request_id], exc) from exc
            for proc in self.logits_processors:
                logits[i] = proc(outputs, logits[i])

    @staticmethod
    def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, batch: SamplingBatch, out: SamplerOutput) -> None:
        chosen = raw.gather(1, tokens[:, None])
        out.logprob_rows = batch.logprob_rows
        out.logprobs = chosen[:, 0].tolist()
        out.ranks = ((raw > chosen).sum(-1) + 1).tolist()
        k = max(batch.logprob_k)
        if k:
            vals, ids = raw.topk(k, dim=-1)
            out.top_ids = [r[:kr] for r, kr in zip(ids.tolist(), batch.logprob_k)]
            out.top_logprobs = [r[:kr] for r, kr in zip(vals.tolist(), batch.logprob_k)]
        else:
            out.top_ids = [[] for _ in batch.logprob_rows]
            out.top_logprobs = [[] for _ in batch.logprob_rows]

    @staticmethod
    def _prompt_logprobs(logits: torch.Tensor, spec) -> tuple:
        rows = logits[spec.row : spec.row + spec.count].log_softmax(-1)
        prompt = spec.seq.request.prompt_token_ids
        targets = torch.tensor(prompt[spec.start + 1 : spec.start + 1 + spec.count])[:, None]
        chosen = rows.gather(1, targets)
        ranks = ((rows > chosen).sum(-1) + 1).tolist()
        k = spec.seq.request.params.prompt_logprobs or 0
        if k:
            vals, ids = rows.topk(k, dim=-1)
            return chosen[:, 0].tolist(), ranks, ids.tolist(), vals.tolist()
        return chosen[:, 0].tolist(), ranks, [[] for _ in ranks], [[] for _ in ranks]

    # -- the random rows ------------------------------------------------------------------------------------------
    def _random(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Tokens for rows that sample (all of `logits`, which this may overwrite)."""
        vocab = logits.shape[-1]
        u = _uniforms(batch.seeds)
        temp, top_k, top_p, min_p = batch.temperature, batch.top_k.clamp(max=vocab), batch.top_p, batch.min_p
        truncated = (top_k < vocab) | (top_p < 1)
        if bool(truncated.all()):
            return _sample_truncated_by_width(logits, temp, top_k, top_p, min_p, u)
        if not bool(truncated.any()):
            return _sample_full(logits, temp, min_p, u)
        tokens = torch.empty(logits.shape[0], dtype=torch.long)
        t = truncated.nonzero()[:, 0]
        f = (~truncated).nonzero()[:, 0]
        tokens[t] = _sample_truncated_by_width(logits[t], temp[t], top_k[t], top_p[t], min_p[t], u[t])
        tokens[f] = _sample_full(logits[f], temp[f], min_p[f], u[f])
        return tokens


def _constraints(batch: SamplingBatch) -> list:
    """The grammar matchers of the batch's constrained rows, in row order."""
    return [batch.seqs[i].constraint for i in batch.constrained_rows]


def _merge_forced(out: SamplerOutput, batch: SamplingBatch) -> None:
    """Put the forced tokens between the sampled ones, so the output has one token per row of the step's sample
    list (the batch's row j is its position `batch.positions[j]`)."""
    tokens = [0] * (len(batch.positions) + len(batch.forced))
    for position, token in zip(batch.positions, out.tokens):
        tokens[position] = token
    for position, token in batch.forced.items():
        tokens[position] = token
    out.tokens = tokens
    out.logprob_rows = [batch.positions[r] for r in out.logprob_rows]


def _penalise(logits: torch.Tensor, p: Penalties) -> None:
    """In place on `logits`; repetition as transformers does (divide positive logits, multiply negative ones)."""
    every = p.rows.shape[0] == logits.shape[0] and bool((p.rows == torch.arange(logits.shape[0])).all())
    sub = logits if every else logits[p.rows]
    if p.rep_ids is not None:
        vals = sub.gather(1, p.rep_ids)
        r = p.rep[:, None].to(sub.dtype)
        sub.scatter_(1, p.rep_ids, torch.where(vals > 0, vals / r, vals * r))
    if p.out_ids is not None:
        counts = torch.zeros_like(sub).scatter_add_(1, p.out_ids, p.out_valid.to(sub.dtype))
        sub -= p.frequency[:, None].to(sub.dtype) * counts + p.presence[:, None].to(sub.dtype) * (counts > 0)
    if not every:
        logits[p.rows] = sub


MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def _mix64(z: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit integers with full avalanche."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def seeded_uniform(seed: int, index: int) -> float:
    """The uniform in [0, 1) that a seeded sequence draws for its token number `index`: output `index` of a
    SplitMix64 stream keyed by the seed. A function of (seed, index) alone, not of how many draws came before, so
    a seeded request's tokens are the same whether its positions are sampled one a step or several in one
    speculative verify step (a draft survives iff the target's own draw equals it)."""
    state = _mix64((seed ^ GOLDEN) & MASK64)
    return (_mix64((state + (index + 1) * GOLDEN) & MASK64) >> 11) * 2.0**-53


def _uniforms(seeds: list[tuple[int, int] | None]) -> torch.Tensor:
    """One uniform in [0, 1) per row: a seeded row's from (its seed, the index of the token it draws), the
    others' from the global generator."""
    u = torch.rand(len(seeds), dtype=torch.float64)
    for i, s in enumerate(seeds):
        if s is not None:
            u[i] = seeded_uniform(*s)
    return u


def _last_positive(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's last entry > 0."""
    return x.shape[-1] - 1 - (x > 0).flip(-1).to(torch.uint8).argmax(-1)


def _invert(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Column where u * total falls in each row's CDF over the unnormalised, non-negative `probs` (never a column
    of probability 0, even where u * total rounds up to the total)."""
    cdf = probs.cumsum(-1, dtype=torch.float64)
    col = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return torch.minimum(col, _last_positive(probs))


BLOCK = 256


def _invert_blocks(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """_invert for a whole vocabulary in two levels (per-block sums, then one block's CDF): a vectorised sum
    instead of a sequential scan over the vocabulary."""
    m, v = probs.shape
    nb = -(-v // BLOCK)
    if nb * BLOCK != v:
        probs = torch.nn.functional.pad(probs, (0, nb * BLOCK - v))
    blocks = probs.view(m, nb, BLOCK)
    sums = blocks.sum(-1)
    cdf = sums.cumsum(-1, dtype=torch.float64)
    target = u * cdf[:, -1]
    b = torch.minimum(torch.searchsorted(cdf, target[:, None], right=True)[:, 0], _last_positive(sums))
    before = torch.where(b > 0, cdf.gather(1, (b - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    inner = blocks[torch.arange(m), b]
    icdf = inner.cumsum(-1, dtype=torch.float64)
    j = torch.searchsorted(icdf, (target - before)[:, None], right=True)[:, 0]
    return b * BLOCK + torch.minimum(j, _last_positive(inner))


SMALL_TOP_K = 64


def _sample_truncated_by_width(
    logits: torch.Tensor, temp: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
    u: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """_sample_truncated over rows of small top-k and the others apart: one `topk` as wide as the widest row would
    make every row pay for it (a grammar-constrained row allowing 1,000 tokens beside rows forced to one token).
    A row's token does not depend on the width it is drawn at: columns past its own k have probability 0."""
    small = top_k <= SMALL_TOP_K
    if bool(small.all()) or not bool(small.any()):
        return _sample_truncated(logits, temp, top_k, top_p, min_p, u)
    tokens = torch.empty(logits.shape[0], dtype=torch.long)
    for rows in (small.nonzero()[:, 0], (~small).nonzero()[:, 0]):
        tokens[rows] = _sample_truncated(logits[rows], temp[rows], top_k[rows], top_p[rows], min_p[rows], u[rows])
    return tokens


def _sample_truncated(
    logits: torch.Tensor, temp: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
    u: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """Rows with top-k and/or top-p: only their best candidates are ever looked at past one `topk`."""
    vocab = logits.shape[-1]
    has_k = top_k < vocab
    p_only = ~has_k & (top_p < 1)
    any_p_only = bool(p_only.any())
    width = int(top_k[has_k].max()) if bool(has_k.any()) else 0
    inv_t = (1.0 / temp)[:, None].to(logits.dtype)
    if any_p_only:  # a top-p-only row measures its nucleus against its whole distribution
        width = max(width, P_ONLY_FIRST_WIDTH)
        rows = p_only.nonzero()[:, 0]
        full_lse = torch.zeros(logits.shape[0], dtype=logits.dtype)
        full_lse[rows] = _logsumexp(logits[rows] * inv_t[rows])
    while True:
        width = min(width, vocab)
        vals, ids = logits.topk(width, dim=-1)  # temperature keeps the order: scale only the candidates
        vals = vals * inv_t
        in_k = torch.arange(width)[None, :] < torch.where(has_k, top_k, width)[:, None]
        vals = vals.masked_fill(~in_k, float("-inf"))
        lse = vals.logsumexp(-1)
        if any_p_only:
            lse = torch.where(p_only, full_lse, lse)
        probs = (vals - lse[:, None]).exp()
        cum = probs.cumsum(-1)
        short = p_only & (cum[:, -1] < top_p)  # the nucleus reaches past these candidates: widen
        if width == vocab or not bool(short.any()):
            break
        width *= P_ONLY_WIDEN
    keep = in_k & (((cum - probs) <= top_p[:, None]) | (top_p >= 1)[:, None])  # always keeps the top token
    if bool((min_p > 0).any()):
        keep &= probs >= probs[:, :1] * min_p[:, None]
    col = _invert(probs.masked_fill(~keep, 0.0), u)
    return ids.gather(1, col[:, None])[:, 0]


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dimension, in place on `x` (no full-size temporaries)."""
    m = x.amax(-1, keepdim=True)
    return (m + x.sub_(m).exp_().sum(-1, keepdim=True).log_())[:, 0]


def _sample_full(logits: torch.Tensor, temp: torch.Tensor, min_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Rows sampling from the whole vocabulary (temperature, maybe min-p): unnormalised probabilities in place
    (the best token's is 1), then a two-level inversion."""
    probs = logits.div_(temp[:, None].to(logits.dtype))
    probs = probs.sub_(probs.amax(-1, keepdim=True)).exp_()
    if bool((min_p > 0).any()):
        probs.masked_fill_(probs < min_p[:, None].to(probs.dtype), 0.0)  # min-p relative to the best token: 1
    return _invert_blocks(probs, u)


def top_logprobs_dict(
    token: int, logprob: float, rank: int, top_ids: list[int], top_vals: list[float], decode
) -> dict[int, Logprob]:
    """vLLM's per-position shape: the chosen token plus the top-k, each with its rank and text."""
    entry = {token: Logprob(logprob, rank, decode(token))}
    for r, (tid, val) in enumerate(zip(top_ids, top_vals), start=1):
        entry.setdefault(tid, Logprob(val, r, decode(tid)))
    return entry


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Greedy tokens: the own row argmax where it serves (the same indices as torch.argmax, ~10x faster on a large
    vocabulary), else torch's."""
    if logits.dtype == torch.float32 and logits.device.type == "cpu" and kernels.available():
        return torch.ops.turbofan.argmax_rows(logits)
    return logits.argmax(-1)
