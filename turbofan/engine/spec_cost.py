"""The speculation policy's numbers: what a step costs (fitted online), what a draft is expected to return, and how
many drafts a sequence gets.

- `StepCostModel`: step seconds ~ a + b * tokens, for the target's decode/verify steps and for a draft model's.
- `draft_budget`: the k that maximises a sequence's expected tokens per second of step time, given its acceptance
  rate and the measured costs; 0 where no k beats decoding without drafts (large batch, a dear draft, low
  acceptance).
- `AcceptancePool`: the acceptance of all recent verifications, the prior of a fresh sequence. A fixed prior could
  keep a pair that pays from ever drafting (nothing verified, nothing learned); the pool learns from the probes.
"""

from __future__ import annotations

COST_DECAY = 0.98  # weight of past steps in the step-time fit
PRIOR_FIXED_TOKENS = 16.0  # before the fit has spread in token counts: a step's fixed part = 16 tokens' worth
PRIOR_WEIGHT = 8.0  # how many tokens^2 of spread the prior on the per-token cost is worth
MIN_TOKEN_COST_SHARE = 0.25  # the per-token cost never drops below a quarter of the prior's
GAIN_MARGIN = 1.1  # drafting must be expected to yield 10% more tokens per second than not drafting
ALPHA_PRIOR = 0.6  # the pool's starting acceptance, before anything was verified
POOL_DECAY = 0.98  # weight of past verifications in the pool (~50 verifications)


class StepCostModel:
    """Step seconds ~ a + b * tokens, fitted by exponentially weighted least squares over decode/verify steps,
    with a prior on b (a fixed part worth PRIOR_FIXED_TOKENS tokens) until the steps have spread in size."""

    def __init__(self) -> None:
        self.w = self.st = self.stt = self.sy = self.sty = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        d = COST_DECAY
        self.w = d * self.w + 1.0
        self.st = d * self.st + tokens
        self.stt = d * self.stt + tokens * tokens
        self.sy = d * self.sy + seconds
        self.sty = d * self.sty + tokens * seconds

    @property
    def ready(self) -> bool:
        return self.w > 0.0

    def coefficients(self) -> tuple[float, float]:
        """(a, b): fixed seconds per step and seconds per token."""
        mt, my = self.st / self.w, self.sy / self.w
        var = self.stt - self.w * mt * mt
        cov = self.sty - self.w * mt * my
        b_prior = my / (mt + PRIOR_FIXED_TOKENS)
        # floor: a token is never free (a fit drowned in noise from a shared CPU can say so)
        b = max((cov + PRIOR_WEIGHT * b_prior) / (var + PRIOR_WEIGHT), MIN_TOKEN_COST_SHARE * b_prior)
        a = max(my - b * mt, 0.0)
        return a, b

    def per_sequence(self, batch: int) -> float:
        """Seconds of a step of `batch` one-token rows, per row."""
        a, b = self.coefficients()
        return (a + b * batch) / batch

    def draft_budget(self, alpha: float, batch: int, k_max: int, proposal_cost: float = 0.0) -> int:
        """Drafts for one sequence of `batch`: the k in 0..k_max with the most expected tokens per second of its
        share of the step. k drafts yield 1 + alpha + ... + alpha^k tokens (geometric acceptance) and cost its share
        of a one-token step, (a + b B) / B, plus k * (b + proposal_cost): b to verify a draft, `proposal_cost` to
        propose it (a draft model's step share; 0 for n-gram lookup). k = 0 unless drafting beats not drafting by
        GAIN_MARGIN. At batch 1 this is the exact optimum; at large batch b * B dominates the share and no k pays."""
        a, b = self.coefficients()
        share = (a + b * batch) / batch
        per_draft = b + proposal_cost
        best_k, best_rate = 0, GAIN_MARGIN / share
        tokens = 1.0
        for k in range(1, k_max + 1):
            tokens += alpha**k
            rate = tokens / (share + k * per_draft)
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k


class AcceptancePool:
    """Decayed counts of accepted drafts and misses over every verification (a geometric acceptance rate)."""

    def __init__(self) -> None:
        self.accepted, self.missed = ALPHA_PRIOR, 1.0 - ALPHA_PRIOR

    @property
    def alpha(self) -> float:
        return self.accepted / (self.accepted + self.missed)

    def record(self, accepted: int, missed: int) -> None:
        self.accepted = POOL_DECAY * self.accepted + accepted
        self.missed = POOL_DECAY * self.missed + missed
