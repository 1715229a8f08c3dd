"""The adaptive speculation policy without a model: costs are synthetic, acceptance is drawn from a seeded RNG.

What it must do: a draft pair that pays learns that it does (it starts from a prior that gates it, probes, and then
drafts), a pair that does not pay stops probing (deopts with a growing back-off), and at a batch size where no
acceptance would pay nothing is proposed at all, not even a probe.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from turbofan.engine.spec_cost import ALPHA_PRIOR, AcceptancePool, StepCostModel
from turbofan.engine.speculative import SpecState, SpeculativeConfig, Speculator


def _fitted(fixed: float, per_token: float) -> StepCostModel:
    cost = StepCostModel()
    for tokens in (1, 2, 3, 5, 1, 8, 16, 32):
        cost.observe(tokens, fixed + per_token * tokens)
    return cost


def _speculator(draft_step: float, k: int = 4) -> Speculator:
    """Target: 56 ms + 7.8 ms a token (Qwen2.5-Coder-1.5B on 2 cores); a draft model whose one-token step costs
    `draft_step` seconds (its per-token part a tenth of it)."""
    proposer = SimpleNamespace(cost=_fitted(0.9 * draft_step, 0.1 * draft_step))
    spec = Speculator(SpeculativeConfig(model="draft", num_speculative_tokens=k), 4096, proposer)
    spec.cost = _fitted(0.056, 0.0078)
    return spec


def _drafting_share(draft_step: float, true_alpha: float, seeds: int = 8, steps: int = 200) -> float:
    """The share of decode steps that drafted, over fresh speculators (sequences of `steps` steps, seeded)."""
    return sum(sum(k > 0 for k in _decode(_speculator(draft_step), true_alpha, steps, seed=s)) for s in range(seeds)) / (
        seeds * steps
    )


def _decode(spec: Speculator, true_alpha: float, steps: int, batch: int = 1, seed: int = 0) -> list[int]:
    """One sequence decoding `steps` steps at this batch size; each draft is accepted with probability true_alpha
    (until the first miss). Returns the number of drafts it got each step."""
    rng = random.Random(seed)
    seq = SimpleNamespace(request=SimpleNamespace(request_id="r"), spec_state=SpecState())
    seq.spec_state.reset(spec.pool.alpha)
    extra = spec._proposal_cost(batch)
    ks = []
    for _ in range(steps):
        k = spec._budget(seq.spec_state, spec.config.num_speculative_tokens, batch, extra)
        ks.append(k)
        if k:
            m = 0
            while m < k and rng.random() < true_alpha:
                m += 1
            spec._record(seq, k, m)
    return ks


def test_the_prior_gates_the_measured_pair_but_a_probe_lets_it_learn():
    """The 8-bit 0.5B draft (24 ms a step) and the 1.5B target at acceptance 0.8: the prior (0.6) says no, a
    good record (0.9) says yes, so the sequence probes with one draft, learns, and drafts on most steps."""
    spec = _speculator(0.024)
    extra = spec._proposal_cost(1)
    assert spec.cost.draft_budget(ALPHA_PRIOR, 1, 4, extra) == 0
    assert spec.cost.draft_budget(0.9, 1, 4, extra) > 0
    ks = _decode(spec, 0.8, 200)
    assert ks[0] == 1 and spec.stats.num_probes >= 1
    assert spec.pool.alpha == pytest.approx(0.8, abs=0.15)
    assert _drafting_share(0.024, 0.8) > 0.7  # before the probes: 0 (the prior gated every step)


def test_a_cheaper_draft_drafts_longer():
    """The k picked from the measured costs: a 13 ms draft (4-bit) gets more drafts a step than a 24 ms one."""
    cheap, dear = _speculator(0.013), _speculator(0.024)
    for spec in (cheap, dear):
        _decode(spec, 0.8, 100)
    k_cheap = [k for k in _decode(cheap, 0.8, 200, seed=1) if k]
    k_dear = [k for k in _decode(dear, 0.8, 200, seed=1) if k]
    assert sum(k_cheap) / len(k_cheap) > sum(k_dear) / len(k_dear) + 0.5


def test_a_pair_that_does_not_pay_stops_probing():
    """Acceptance 0.2: its probes fail, each doubling the wait before the next, so it drafts on few steps, and
    the pool it leaves behind starts the next sequence gated."""
    spec = _speculator(0.013)
    _decode(spec, 0.2, 400)
    assert 3 <= spec.stats.num_probes <= 16
    assert _drafting_share(0.013, 0.2) < 0.12
    assert spec.pool.alpha < 0.4
    assert spec.cost.draft_budget(spec.pool.alpha, 1, 4, spec._proposal_cost(1)) == 0


def test_no_probe_where_no_acceptance_would_pay():
    """At batch 64 a draft token costs more than even a perfect record returns: nothing is proposed, no probes,
    no deopts (the batch size, not the sequence, rules it out)."""
    spec = _speculator(0.013)
    assert spec.cost.draft_budget(1.0, 64, 4, spec._proposal_cost(64)) == 0
    assert _decode(spec, 1.0, 50, batch=64) == [0] * 50
    assert spec.stats.num_probes == 0 and spec.stats.num_deopts == 0


def test_a_step_where_nothing_pays_proposes_nothing_and_looks_at_no_sequence():
    """The whole step is gated at once (one cost check, not one per sequence): the proposer is never called and no
    sequence's record is touched, so a large batch pays nothing for speculation being configured."""

    def proposer(seq, k):
        raise AssertionError("proposed at batch 64")

    spec = Speculator(SpeculativeConfig(method="ngram", num_speculative_tokens=4), 4096, proposer)
    spec.cost = _fitted(0.056, 0.0078)
    running = [SimpleNamespace(num_tokens=10, num_computed_tokens=9, spec_token_ids=[1], spec_state=None)
               for _ in range(64)]  # fmt: skip
    spec.propose(running)
    assert all(s.spec_token_ids == [] and s.spec_state is None for s in running)
    assert spec.stats.num_gated_steps == 1


def test_the_pool_seeds_a_fresh_sequence():
    pool = AcceptancePool()
    assert pool.alpha == pytest.approx(ALPHA_PRIOR)
    for _ in range(100):
        pool.record(3, 1)  # three accepted, then a miss: a geometric acceptance of 0.75
    assert pool.alpha == pytest.approx(0.75, abs=0.01)
    state = SpecState()
    state.reset(pool.alpha)
    assert state.alpha == pytest.approx(pool.alpha) and state.probe_wait == 0


def test_a_gguf_draft_is_served_in_4_bits_unless_told_otherwise(tmp_path):
    """A draft converted from GGUF, under the target's "auto" on the CPU: int4_all (LM head included); an explicit
    speculative_config "quantization" wins; a safetensors draft keeps the target's mode (the exact float path)."""
    from turbofan.assembly import _draft_quantization
    from turbofan.config import EngineConfig
    from turbofan.store.manifest import Manifest

    gguf, plain = tmp_path / "gguf", tmp_path / "plain"
    for directory, fmt in ((gguf, "gguf"), (plain, "safetensors")):
        directory.mkdir()
        Manifest(name="d", source="s", format=fmt, architecture="Qwen2ForCausalLM", model_type="qwen2",
                 family="qwen2", parameters=1, context_length=None, quantization=None, dtype="float32",
                 size_bytes=1, digest="0").write(directory)  # fmt: skip
    spec = SpeculativeConfig(model="d")
    auto = EngineConfig(model="t", device="cpu")
    assert _draft_quantization(auto, spec, gguf) == "int4_all"
    assert _draft_quantization(auto, spec, plain) == "auto"
    assert _draft_quantization(EngineConfig(model="t", device="cpu", quantization="int8"), spec, gguf) == "int8"
    assert _draft_quantization(auto, SpeculativeConfig(model="d", quantization="auto"), gguf) == "auto"
