"""Speculative decoding: guess tokens cheaply, verify them in one forward, fall back where the guesses keep failing.

On a CPU one decode stream is bound by reading the weights, so scoring 1 + k tokens of a sequence in one forward
costs little more than scoring one. V8's speculation, applied to tokens:

- **guess** (the proposer): n-gram prompt lookup finds the latest earlier occurrence of the context's last n
  tokens (n from prompt_lookup_max down to prompt_lookup_min) and proposes the k tokens that followed it; or a
  draft model sharing the target's tokenizer proposes its k greedy tokens (turbofan/engine/draft_model.py);
- **guard** (verification in the step): the scheduler gives a decoding sequence 1 + k query tokens, the sampler
  samples every one of the k + 1 positions with the request's own parameters, and the longest prefix of drafts
  equal to what the target sampled is kept, plus the target's token at the first miss (or after the last draft).
  A draft is a point mass, so this *is* rejection sampling: the draft x survives with probability p(x), and on a
  miss the target's token is distributed as p without x, renormalised — the residual. Greedy output is exactly
  the non-speculative one; sampled output has exactly the target's distribution;
- **deoptimise**: rejected drafts are rolled back (their KV slots released, never committed to the prefix
  cache); a sequence whose proposals keep failing stops speculating for a while (a counted deopt, with a longer
  back-off each time);
- **cost model** (turbofan/engine/spec_cost.py): step time is fitted online as a + b * tokens over decode/verify
  steps. A sequence with acceptance rate alpha and k drafts yields 1 + alpha + ... + alpha^k tokens for its share
  of a step, (a + b * B) / B at B decoding sequences, plus k * b to verify the drafts; a draft model's own steps
  are fitted the same way and each draft also costs its share of a draft step. A sequence gets the k with the most
  tokens per second, 0 unless that beats not drafting by 10%, so a large batch (where b * B dominates) or a dear
  draft stops speculating by itself;
- **learning the acceptance**: a fresh sequence starts from the acceptance of every recent verification (the
  pool, 0.6 before any); where its record rules drafting out but a good one (0.9) would pay at this batch size, it
  is probed with one draft now and then (the wait doubling after each rejected probe), so a pair that pays learns
  that it does and one that does not stops paying for probes.

Requests whose next token depends on the tokens before it in ways the sampler keeps per step (penalties, logits
processors, min_tokens not reached yet) do not speculate; everything else does, including n > 1, logprobs, stop
strings and seeds (a seeded request's tokens are the same with speculation on or off: its uniform for a position
is a function of its seed and the token's index, engine/sampler.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, fields

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from turbofan.engine.sequence import Sequence
from turbofan.engine.spec_cost import AcceptancePool, StepCostModel

log = logging.getLogger("turbofan.engine")

DEOPT_AFTER = 3  # consecutive proposals with nothing accepted before a sequence stops speculating
BACKOFF_STEPS = 16  # decode steps of the first back-off; doubled with each further deopt of the sequence
MAX_BACKOFF_STEPS = 1024
ALPHA_DECAY = 0.9  # weight of past verifications in a sequence's acceptance estimate
PROBE_ALPHA = 0.9  # the acceptance a probe hopes for: where even that would not pay, nothing is probed
PROBE_INTERVAL = 8  # gated steps between probes of a sequence whose record rules drafting out; doubled per probe
MAX_PROBE_INTERVAL = 256


@dataclass
class SpeculativeConfig:
    """vLLM's `speculative_config`: {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": n,
    "prompt_lookup_min": m}, or {"model": "<draft model name or path>", "num_speculative_tokens": k} (method
    "draft_model", implied by "model"; the draft must share the target's tokenizer, checked at load)."""

    method: str | None = None  # "ngram", or "draft_model" (the default when "model" is given)
    num_speculative_tokens: int = 4
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    model: str | None = None
    # vLLM's key: how the draft's weights are served (a --quantization mode; default: int4_all for a GGUF draft
    # under the target's "auto", else the target's mode; see assembly._draft_quantization)
    quantization: str | None = None
    adaptive: bool = True  # turbofan's: deopts and the cost model (off = always propose k tokens, for tests)

    def __post_init__(self) -> None:
        if self.method is None:
            self.method = "ngram" if self.model is None else "draft_model"
        if self.method not in ("ngram", "draft_model"):
            raise ValueError(f"speculative_config: method must be 'ngram' or 'draft_model', got {self.method!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 32:
            raise ValueError(f"speculative_config: num_speculative_tokens must be an integer in [1, 32], got {k!r}")
        if self.quantization is not None and self.method != "draft_model":
            raise ValueError('speculative_config: "quantization" applies to a draft model, not the ngram method')
        if self.quantization is not None:
            from turbofan.model.quant import MODES

            if self.quantization not in MODES:
                raise ValueError(
                    f"speculative_config: quantization must be one of {', '.join(MODES)}, got {self.quantization!r}"
                )
        if self.method == "draft_model":
            if not isinstance(self.model, str) or not self.model.strip():
                raise ValueError(
                    'speculative_config: method "draft_model" needs "model": the draft model\'s name or path '
                    "(it must share the target's tokenizer)"
                )
            if self.prompt_lookup_max is not None or self.prompt_lookup_min is not None:
                raise ValueError(
                    "speculative_config: prompt_lookup_max/min apply to the ngram method, not a draft model"
                )
            return
        if self.model is not None:
            raise ValueError('speculative_config: method "ngram" takes no "model" (drop "method" for a draft model)')
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if lo is None and hi is None:  # vLLM's defaults
            lo = hi = 5
        lo = hi if lo is None else lo
        hi = lo if hi is None else hi
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise ValueError(
                f"speculative_config: need 1 <= prompt_lookup_min <= prompt_lookup_max, got {lo!r} and {hi!r}"
            )
        self.prompt_lookup_min, self.prompt_lookup_max = lo, hi

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict | None) -> SpeculativeConfig | None:
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**value)


def ngram_propose(tokens: np.ndarray, n_min: int, n_max: int, k: int) -> list[int]:
    """The k tokens that followed the latest earlier occurrence of the last n tokens (longest n first)."""
    length = tokens.shape[0]
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        windows = sliding_window_view(tokens[: length - 1], n)  # every start whose n-gram has a next token
        hits = np.flatnonzero((windows == tokens[length - n :]).all(1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start : start + k].tolist()
    return []


def draft_room(seq: Sequence, max_model_len: int, k_max: int) -> int:
    """How many draft tokens a decoding sequence may have verified this step, at most k_max (0: none). Penalties,
    logits processors and min_tokens see the tokens before each position, so such a sequence samples one row a
    step; the drafts plus the token after them must fit max_tokens and the context."""
    if seq.num_tokens - seq.num_computed_tokens != 1:  # prefilling
        return 0
    if not seq.request.forked:  # the prompt's last token (a chunked prefill): that step forks an n > 1 request,
        return 0  # and its forks share the prompt's KV only, not drafts scored after it
    p = seq.request.params
    if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty or p.logits_processors:
        return 0
    num_out = seq.num_tokens - seq.request.num_prompt_tokens
    if num_out < p.min_tokens:
        return 0
    room = min(p.max_tokens - num_out, max_model_len - seq.num_tokens) - 1  # the bonus token fits too
    return max(0, min(k_max, room))


class NgramIndex:
    """The latest earlier occurrence of every n-gram (n_min..n_max) of a sequence's growing token list, updated as
    tokens arrive, so a lookup is one dict probe per n; `ngram_propose` (the reference) scans the whole context
    with numpy each step, ~0.3 ms at batch 1 on a 150-token context: 4% of a SmolLM2 step, which free text, where
    lookups rarely find anything, paid for nothing."""

    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max
        self.latest: dict[tuple[int, ...], int] = {}  # n-gram -> position of the token that followed it last
        self.indexed = 1  # the n-grams followed by a token at a position below this are recorded

    def propose(self, tokens: list[int], k: int) -> list[int]:
        length, latest = len(tokens), self.latest
        for end in range(self.indexed, length):  # a token at `end` follows the n-grams that end just before it
            for n in range(self.n_min, min(self.n_max, end) + 1):
                latest[tuple(tokens[end - n : end])] = end
        self.indexed = max(self.indexed, length)
        for n in range(min(self.n_max, length - 1), self.n_min - 1, -1):
            start = latest.get(tuple(tokens[length - n :]))
            if start is not None:
                return tokens[start : start + k]
        return []


class NgramProposer:
    """Prompt lookup over the sequence's own tokens (prompt and output); no model."""

    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max

    def __call__(self, seq: Sequence, k: int) -> list[int]:
        state = seq.spec_state
        if state.proposer_state is None:
            state.proposer_state = NgramIndex(self.n_min, self.n_max)
        return state.proposer_state.propose(seq.token_ids, k)


@dataclass
class SpecState:
    """A sequence's speculation record: its acceptance, its deopts, and what its proposer keeps about it."""

    proposer_state: object = None  # the n-gram proposer's NgramIndex
    accepted: float = 0.0  # decayed counts of accepted drafts and of misses (a geometric acceptance)
    missed: float = 0.0
    misses_in_a_row: int = 0
    deopts: int = 0
    backoff: int = 0  # decode steps left without speculation
    probe_wait: int = 0  # gated decode steps left before the next k = 1 probe
    probe_interval: int = PROBE_INTERVAL  # the wait after a probe that did not bring the record back; doubles
    probing: bool = False  # the drafts being verified are a probe
    accepted_since_deopt: int = 0

    def reset(self, alpha: float) -> None:
        """A fresh record worth one verification, at the acceptance the pool has seen (V8 re-collects feedback)."""
        self.accepted, self.missed = alpha, 1.0 - alpha
        self.probe_wait, self.probe_interval = 0, PROBE_INTERVAL

    @property
    def alpha(self) -> float:
        return self.accepted / (self.accepted + self.missed)


@dataclass
class SpecStats:
    num_drafts: int = 0  # verifications of a sequence with at least one draft
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    num_deopts: int = 0  # sequences that stopped speculating for a while
    num_gated_steps: int = 0  # decode steps where the cost model left every sequence without drafts
    num_probes: int = 0  # k = 1 proposals to a sequence whose record ruled drafting out (to learn its acceptance)
    num_spec_steps: int = 0  # steps that verified drafts
    propose_seconds: float = 0.0  # time spent proposing (a draft model's forwards; n-gram lookups)
    verify_seconds: float = 0.0  # time of the target's forwards + sampling in steps that verified drafts


class Speculator:
    """Proposes drafts for the running sequences before a step, and verifies them after it is sampled.

    The proposer is a callable (sequence, k) -> at most k draft tokens; any deterministic function of the sequence
    verifies exactly. One with `propose_batch([(seq, k), ...])` proposes for all sequences at once (a draft model
    batches its forwards), one with `cost` (a StepCostModel of its own steps) has its cost weighed against what
    the drafts return, and one with `release(seq)` is told when a sequence gives its KV back.
    """

    def __init__(self, config: SpeculativeConfig, max_model_len: int, proposer=None):
        self.config = config
        self.proposer = proposer or NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        self.max_model_len = max_model_len
        self.cost = StepCostModel()
        self.pool = AcceptancePool()  # every verification's outcome: a fresh sequence's prior
        self.stats = SpecStats(accepted_per_position=[0] * config.num_speculative_tokens)

    # -- before the step --------------------------------------------------------------------------------------------
    def _eligible(self, seq: Sequence) -> int:
        """How many drafts the sequence may take at most (0: it does not speculate this step)."""
        if seq.constraint is not None:  # its drafts are its grammar's forced tokens (engine/jump_forward.py)
            return 0
        return draft_room(seq, self.max_model_len, self.config.num_speculative_tokens)

    def _proposal_cost(self, batch: int) -> float:
        """Seconds one draft token of one sequence costs the proposer at this batch size (0 without a model)."""
        cost = getattr(self.proposer, "cost", None)
        return cost.per_sequence(batch) if cost is not None and cost.ready else 0.0

    def propose(self, running: list[Sequence]) -> None:
        """Set `spec_token_ids` of every running sequence (empty where it does not speculate this step)."""
        decoding = [s for s in running if s.num_tokens - s.num_computed_tokens == 1]
        any_drafts = gated = False
        for seq in running:
            seq.spec_token_ids = []
        extra = self._proposal_cost(len(decoding)) if self.config.adaptive and decoding else 0.0
        if self._nothing_pays(len(decoding), extra):
            self.stats.num_gated_steps += 1
            return
        wanted: list[tuple[Sequence, int]] = []
        for seq in decoding:
            k = self._eligible(seq)
            state = seq.spec_state
            if state is None:
                state = seq.spec_state = SpecState()
                state.reset(self.pool.alpha)
            if k == 0:
                continue
            if self.config.adaptive:
                k = self._budget(state, k, len(decoding), extra)
                gated = gated or k == 0
                if k == 0:
                    continue
            wanted.append((seq, k))
        if wanted:
            start = time.perf_counter()
            batch = getattr(self.proposer, "propose_batch", None)
            proposals = batch(wanted) if batch is not None else [self.proposer(seq, k) for seq, k in wanted]
            self.stats.propose_seconds += time.perf_counter() - start
            for (seq, k), drafts in zip(wanted, proposals):
                seq.spec_token_ids = list(drafts[:k])
                any_drafts = any_drafts or bool(seq.spec_token_ids)
        if gated and not any_drafts:
            self.stats.num_gated_steps += 1

    def _nothing_pays(self, batch: int, extra: float) -> bool:
        """At this batch size even a perfect record would not make drafts pay: the step proposes nothing, probes
        nothing and spends nothing per sequence (large batches, where b * B dominates a sequence's share)."""
        if not (self.config.adaptive and batch and self.cost.ready):
            return False
        return self.cost.draft_budget(1.0, batch, self.config.num_speculative_tokens, extra) == 0

    def _budget(self, state: SpecState, k: int, batch: int, extra: float) -> int:
        """Drafts the cost model gives the sequence this step. Where its record rules drafting out but a good
        record would pay at this batch size, it gets a k = 1 probe now and then, so a pair that pays learns that
        it does (a record of what was never tried stays the prior forever). An accepted probe is followed by the
        next at once, until the record pays again; a rejected one doubles the wait before the next, so a pair that
        does not pay stops paying for probes."""
        if state.backoff > 0:
            state.backoff -= 1
            if state.backoff == 0:
                state.reset(self.pool.alpha)
            return 0
        if not self.cost.ready:
            return k
        budget = self.cost.draft_budget(state.alpha, batch, k, extra)
        if budget > 0:
            state.probe_wait, state.probe_interval = 0, PROBE_INTERVAL
            return budget
        if self.cost.draft_budget(PROBE_ALPHA, batch, k, extra) == 0:
            return 0  # no record would make drafts pay at this batch size and these costs
        if state.probe_wait > 0:
            state.probe_wait -= 1
            return 0
        state.probe_wait = state.probe_interval
        state.probe_interval = min(2 * state.probe_interval, MAX_PROBE_INTERVAL)
        state.probing = True
        self.stats.num_probes += 1
        return 1

    def release(self, seq: Sequence) -> None:
        """A sequence finished, was aborted or preempted: the proposer forgets it (a draft frees its KV blocks)."""
        release = getattr(self.proposer, "release", None)
        if release is not None:
            release(seq)

    # -- after the step ---------------------------------------------------------------------------------------------
    def observe(self, sched, seconds: float) -> None:
        """Feed the cost model with a decode/verify step (prefill chunks follow another cost curve)."""
        drafts = sched.drafts
        if drafts:
            self.stats.verify_seconds += seconds
        for seq, n in sched.scheduled:
            if n != 1 + len(drafts.get(seq.seq_id, ())):
                return
        self.cost.observe(sched.num_tokens, seconds)

    def verify(self, sched, sampled, blocks) -> None:
        """Keep each speculating sequence's accepted drafts plus the target's next token; roll the rest back.

        `sched.sample` holds k + 1 consecutive rows for a sequence with k drafts; after this it holds only the
        rows whose tokens are emitted, `sampled` is cut to match, and the sequence's scheduled count shrinks by
        its rejected drafts, so update_from_output computes and commits only verified positions.
        """
        tokens = sampled.tokens
        keep: list[int] = []
        rejected: dict[int, int] = {}
        stats = self.stats
        i = 0
        while i < len(sched.sample):
            seq = sched.sample[i][0]
            drafts = sched.drafts.get(seq.seq_id)
            if drafts and seq.constraint is not None:  # forced tokens: the sampler emitted exactly them
                keep.extend(range(i, i + len(drafts) + 1))
                i += len(drafts) + 1
                continue
            if not drafts:
                keep.append(i)
                i += 1
                continue
            k = len(drafts)
            m = 0
            while m < k and tokens[i + m] == drafts[m]:
                m += 1
            keep.extend(range(i, i + m + 1))
            rejected[seq.seq_id] = k - m
            self._record(seq, k, m)
            i += k + 1
        stats.num_spec_steps += 1
        _keep_rows(sched, sampled, keep)
        scheduled = []
        for seq, n in sched.scheduled:
            r = rejected.get(seq.seq_id, 0)
            if r:
                n -= r
                blocks.truncate(seq, seq.num_computed_tokens + n)
            scheduled.append((seq, n))
        sched.scheduled = scheduled

    def _record(self, seq: Sequence, k: int, m: int) -> None:
        stats = self.stats
        stats.num_drafts += 1
        stats.num_draft_tokens += k
        stats.num_accepted_tokens += m
        for j in range(m):
            stats.accepted_per_position[j] += 1
        state = seq.spec_state
        state.accepted_since_deopt += m
        state.accepted = ALPHA_DECAY * state.accepted + m
        state.missed = ALPHA_DECAY * state.missed + (1 if m < k else 0)
        self.pool.record(m, 1 if m < k else 0)
        if state.probing:
            state.probing = False
            if m:
                state.probe_wait, state.probe_interval = 0, PROBE_INTERVAL
        if m:
            state.misses_in_a_row = 0
            return
        state.misses_in_a_row += 1
        if self.config.adaptive and state.misses_in_a_row >= DEOPT_AFTER:
            self._deopt(seq)

    def _deopt(self, seq: Sequence) -> None:
        """Stop speculating for this sequence for a while; each further deopt doubles the while."""
        state = seq.spec_state
        if state.accepted_since_deopt >= BACKOFF_STEPS:  # it paid for a while since the last: no pattern, no doubling
            state.deopts = 0
        state.accepted_since_deopt = 0
        state.backoff = min(BACKOFF_STEPS << state.deopts, MAX_BACKOFF_STEPS)
        state.deopts += 1
        state.misses_in_a_row = 0
        self.stats.num_deopts += 1
        log.debug("speculation deopt", extra={"request_id": seq.request.request_id, "backoff": state.backoff})

    # -- visibility -------------------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        s = self.stats
        a, b = self.cost.coefficients() if self.cost.ready else (None, None)
        return {
            "method": self.config.method,
            "num_speculative_tokens": self.config.num_speculative_tokens,
            "num_drafts": s.num_drafts,
            "num_draft_tokens": s.num_draft_tokens,
            "num_accepted_tokens": s.num_accepted_tokens,
            "acceptance_rate": s.num_accepted_tokens / s.num_draft_tokens if s.num_draft_tokens else None,
            "mean_acceptance_length": 1 + s.num_accepted_tokens / s.num_drafts if s.num_drafts else None,
            "accepted_per_position": list(s.accepted_per_position),
            "num_deopts": s.num_deopts,
            "num_gated_steps": s.num_gated_steps,
            "num_probes": s.num_probes,
            "pool_acceptance": round(self.pool.alpha, 4),
            "num_spec_steps": s.num_spec_steps,
            "step_fixed_ms": None if a is None else round(a * 1e3, 4),
            "step_per_token_ms": None if b is None else round(b * 1e3, 4),
            "propose_seconds_total": round(s.propose_seconds, 4),
            "verify_seconds_total": round(s.verify_seconds, 4),
            **(describe() if (describe := getattr(self.proposer, "describe", None)) else {}),
        }


def _keep_rows(sched, sampled, keep: list[int]) -> None:
    """Cut the step's sample rows (and the sampler's per-row results) down to `keep`, in order."""
    if len(keep) == len(sched.sample):
        return
    sched.sample = [sched.sample[i] for i in keep]
    sampled.tokens = [sampled.tokens[i] for i in keep]
    if sampled.logprob_rows:
        new_index = {old: new for new, old in enumerate(keep)}
        picked = [j for j, row in enumerate(sampled.logprob_rows) if row in new_index]
        sampled.logprob_rows = [new_index[sampled.logprob_rows[j]] for j in picked]
        sampled.logprobs = [sampled.logprobs[j] for j in picked]
        sampled.ranks = [sampled.ranks[j] for j in picked]
        sampled.top_ids = [sampled.top_ids[j] for j in picked]
        sampled.top_logprobs = [sampled.top_logprobs[j] for j in picked]
