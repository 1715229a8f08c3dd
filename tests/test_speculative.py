"""Speculative decoding (issue 11): exact greedy output, the target's sampling distribution, KV rollback, deopts,
the cost model, and what an operator sees (/metrics, /debug/tiers, LLM.speculative_stats()).

Most tests run a tiny random Llama, whose greedy continuations repeat themselves enough for n-gram lookup to be
right about half the time, so both the accept and the reject paths run on every step. Tests that need a given
accept/reject pattern plug a proposer in (`engine.speculator.proposer`): any deterministic function of the
sequence is verified exactly, so the proposer decides only the speed, never the output.
"""

from __future__ import annotations

import collections
import json
import random

import numpy as np
import pytest
import torch
from test_engine import _assert_greedy_match, _firsts, _greedy, _prompts

from turbofan import LLM, SamplingParams
from turbofan.engine.spec_cost import StepCostModel
from turbofan.engine.speculative import NgramIndex, SpeculativeConfig, ngram_propose

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
FORCED = {**NGRAM, "adaptive": False}  # propose whenever lookup finds something: every step verifies


@pytest.fixture(scope="module")
def vocab(tiny_models) -> int:
    return json.loads((tiny_models["llama"] / "config.json").read_text())["vocab_size"]


@pytest.fixture(scope="module")
def prompts(vocab) -> list[list[int]]:
    return _prompts(vocab, count=8)


@pytest.fixture(scope="module")
def reference(tiny_models, prompts) -> list:
    """Each prompt alone, without speculation: greedy CompletionOutputs with top-2 logprobs."""
    from conftest import assert_no_leaks

    llm = LLM(str(tiny_models["llama"]), num_kv_blocks=256)
    out = [_firsts(llm.generate([p], _greedy(40), use_tqdm=False))[0] for p in prompts]
    assert_no_leaks(llm.engine)
    return out


# -- configuration and the proposer --------------------------------------------------------------------------------
def test_config_follows_vllm_and_refuses_what_it_cannot_do():
    assert SpeculativeConfig.parse(None) is None
    c = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 3})
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (5, 5)  # vLLM's defaults
    c = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4})
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (4, 4)
    c = SpeculativeConfig.parse({"model": "qwen2.5-coder:0.5b", "num_speculative_tokens": 4})
    assert (c.method, c.model, c.prompt_lookup_max) == ("draft_model", "qwen2.5-coder:0.5b", None)
    assert SpeculativeConfig.parse({"method": "draft_model", "model": "d"}).method == "draft_model"
    with pytest.raises(ValueError, match='needs "model"'):
        SpeculativeConfig.parse({"method": "draft_model", "num_speculative_tokens": 4})
    with pytest.raises(ValueError, match='"ngram" takes no "model"'):
        SpeculativeConfig.parse({"method": "ngram", "model": "d"})
    with pytest.raises(ValueError, match="apply to the ngram method"):
        SpeculativeConfig.parse({"model": "d", "prompt_lookup_max": 3})
    with pytest.raises(ValueError, match="unknown keys"):
        SpeculativeConfig.parse({"method": "ngram", "num_speculative_token": 4})
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 0})
    with pytest.raises(ValueError, match="prompt_lookup_min <= prompt_lookup_max"):
        SpeculativeConfig.parse({"method": "ngram", "prompt_lookup_min": 3, "prompt_lookup_max": 2})
    with pytest.raises(ValueError, match="method must be 'ngram' or 'draft_model'"):
        SpeculativeConfig.parse({"method": "eagle"})
    assert SpeculativeConfig.parse({"model": "d", "quantization": "int4_all"}).quantization == "int4_all"
    with pytest.raises(ValueError, match="quantization must be one of"):
        SpeculativeConfig.parse({"model": "d", "quantization": "fp8"})
    with pytest.raises(ValueError, match='"quantization" applies to a draft model'):
        SpeculativeConfig.parse({"method": "ngram", "quantization": "int4"})


def test_ngram_lookup_takes_the_latest_longest_match():
    t = np.array([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3])
    assert ngram_propose(t, 1, 3, 2) == [7, 8]  # "2 3" last occurred at 5..6: its continuation
    assert ngram_propose(t, 1, 3, 10) == [7, 8, 5, 2, 3]  # at most up to the end of the context
    assert ngram_propose(np.array([4, 5, 6]), 1, 3, 2) == []  # nothing repeats
    t = np.array([5, 1, 9, 4, 1, 9, 6, 0, 1, 9])
    assert ngram_propose(t, 2, 2, 1) == [6]  # "1 9": the latest earlier occurrence wins
    assert ngram_propose(np.array([7, 8, 7, 7]), 1, 2, 3) == [7]  # "7": after the 7 at 2 came the 7 at 3
    assert ngram_propose(np.array([3, 3, 3]), 1, 5, 4) == [3]


def test_the_incremental_ngram_index_proposes_what_the_scan_does():
    """NgramIndex (what the engine uses, updated as tokens arrive, several at a time after accepted drafts) gives
    the reference scan's proposal at every length of random sequences over a small alphabet (many repeats)."""
    rng = random.Random(0)
    for n_min, n_max in ((1, 3), (2, 4), (5, 5), (1, 1)):
        for _ in range(20):
            tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 60))]
            index, length = NgramIndex(n_min, n_max), 1
            while length <= len(tokens):
                k = rng.randrange(1, 6)
                assert index.propose(tokens[:length], k) == ngram_propose(np.array(tokens[:length]), n_min, n_max, k)
                length += rng.randrange(1, 4)


def test_cost_model_turns_speculation_off_at_large_batch():
    cost = StepCostModel()
    for tokens in (1, 2, 5, 1, 3, 16, 20, 64, 80):  # a = 10 ms fixed, b = 1 ms per token
        cost.observe(tokens, 0.010 + 0.001 * tokens)
    a, b = cost.coefficients()
    assert a == pytest.approx(0.010, rel=0.05) and b == pytest.approx(0.001, rel=0.05)
    # one stream, a draft costing 1/11 of a step: k drafts yield (1 - 0.8^(k+1)) / 0.2 tokens in 11 + k ms, the
    # most per ms at k = 6 (3.95 tokens in 17 ms; k = 5: 3.69 in 16, k = 7: 4.16 in 18)
    assert cost.draft_budget(0.8, 1, 8) == 6
    assert cost.draft_budget(0.3, 1, 8) == 1  # 1.3 tokens in 12 ms beats 1.1 / 11 ms; 1.39 in 13 ms does not
    assert 0 < cost.draft_budget(0.8, 8, 8) < 8
    assert cost.draft_budget(0.9, 64, 8) == 0  # a token is worth 1.16 ms there, a draft costs 1.1 ms
    assert cost.draft_budget(0.0, 1, 8) == 0
    # a draft model whose step costs 40% of the target's at batch 1 (4.4 ms of 11 ms): fewer drafts pay
    draft = StepCostModel()
    for tokens in (1, 2, 5, 1, 3, 16, 20, 64, 80):  # 4 ms fixed, 0.4 ms per token
        draft.observe(tokens, 0.004 + 0.0004 * tokens)
    assert draft.per_sequence(1) == pytest.approx(0.0044, rel=0.05)
    assert cost.draft_budget(0.8, 1, 8, draft.per_sequence(1)) == 2  # 2.44 tokens in 21.8 ms; k = 3: 2.95 in 27.2
    assert cost.draft_budget(0.5, 1, 8, draft.per_sequence(1)) == 0
    assert cost.draft_budget(0.9, 16, 8, draft.per_sequence(16)) == 0  # n-gram drafts still pay there
    assert cost.draft_budget(0.9, 16, 8) > 0


# -- exactness -------------------------------------------------------------------------------------------------
CONFIGS = {
    "adaptive": ({"speculative_config": NGRAM}, True),
    "forced": ({"speculative_config": FORCED}, True),
    "forced_alone": ({"speculative_config": FORCED}, False),
    "chunked_prefill": ({"speculative_config": FORCED, "max_num_batched_tokens": 8}, True),
    "preemption": ({"speculative_config": FORCED, "num_kv_blocks": 24, "block_size": 4}, True),
    "no_prefix_cache_bs1": ({"speculative_config": FORCED, "block_size": 1, "num_kv_blocks": 2048,
                             "enable_prefix_caching": False}, True),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_identical_with_speculation(name, make_llm, prompts, reference):
    config, batched = CONFIGS[name]
    llm = make_llm(**config)
    if batched:
        outs = _firsts(llm.generate(prompts, _greedy(40), use_tqdm=False))
    else:
        outs = [_firsts(llm.generate([p], _greedy(40), use_tqdm=False))[0] for p in prompts]
    _assert_greedy_match(outs, reference, f"{name} vs no speculation")  # tokens, and logprobs within float noise
    stats = llm.speculative_stats()
    if config["speculative_config"] is FORCED:  # the adaptive one speculates as much as the measured costs allow
        assert stats["num_accepted_tokens"] > 20 and stats["num_draft_tokens"] > stats["num_accepted_tokens"], stats
    if name == "preemption":
        assert llm.engine.stats().num_preemptions > 0


def test_several_tokens_a_step_respect_stop_strings_and_lengths(make_llm, prompts, reference):
    """An oracle proposer (the reference's own continuation) makes every step emit up to 5 tokens; stops and
    max_tokens landing inside such a step end the output exactly where they do without speculation."""
    tok_of = {tuple(p): r.token_ids for p, r in zip(prompts, reference)}
    llm = make_llm(speculative_config=FORCED)

    def oracle(seq, k):
        out = tok_of[tuple(seq.request.prompt_token_ids)]
        done = seq.num_tokens - seq.request.num_prompt_tokens
        return list(out[done : done + k])

    llm.engine.speculator.proposer = oracle
    plain = make_llm()
    decode = llm.get_tokenizer().decode
    for i, (p, r) in enumerate(zip(prompts, reference)):
        text = decode(r.token_ids[:30])
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        for params in (
            SamplingParams(temperature=0, max_tokens=13 + i, ignore_eos=True, logprobs=1),
            SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop], logprobs=1),
        ):
            got = llm.generate([p], params, use_tqdm=False)[0].outputs[0]
            want = plain.generate([p], params, use_tqdm=False)[0].outputs[0]
            assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason)
            assert len(got.logprobs) == len(got.token_ids)
            assert got.cumulative_logprob == pytest.approx(want.cumulative_logprob, abs=1e-3)
    stats = llm.speculative_stats()
    assert stats["mean_acceptance_length"] > 3, stats


def test_n2_and_beam_search_with_speculation(make_llm, prompts, reference):
    llm = make_llm(speculative_config=FORCED)
    outs = llm.generate(prompts[:4], SamplingParams(n=2, temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    for out, ref in zip(outs, reference):
        for c in out.outputs:
            _assert_greedy_match([c], [ref], "n=2")
    beams = llm.beam_search([prompts[0]], beam_width=2, max_tokens=4)
    assert len(beams[0].sequences) == 2


# -- KV rollback and the prefix cache ------------------------------------------------------------------------------
def test_rejected_drafts_give_their_blocks_back(make_llm, prompts, vocab):
    """Always-wrong drafts of 8 tokens at block size 4: after every step a sequence holds no block past its last
    verified token, and the output is what it is without speculation."""
    llm = make_llm(speculative_config={**FORCED, "num_speculative_tokens": 8}, block_size=4)
    llm.engine.speculator.proposer = lambda seq, k: [(seq.token_ids[-1] + 1 + j) % vocab for j in range(k)]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for p in prompts[:4]:
        llm.engine.add_request(str(len(p)), p, params)
    engine = llm.engine
    outs = collections.defaultdict(list)
    while engine.has_unfinished_requests():
        for d in engine.step():
            outs[d.request_id] += d.outputs[0].token_ids
        for seq in engine.scheduler.running:
            assert len(seq.block_table) <= -(-seq.num_tokens // 4), (len(seq.block_table), seq.num_tokens)
    plain = make_llm(block_size=4).generate(prompts[:4], params, use_tqdm=False)
    assert [outs[str(len(p))] for p in prompts[:4]] == [o.outputs[0].token_ids for o in plain]
    assert llm.speculative_stats()["num_draft_tokens"] > 100


def test_prefix_cache_never_holds_rejected_tokens(make_llm, prompts, vocab, reference):
    """A request decoded with mostly-wrong drafts fills and commits blocks; a second request whose prompt is the
    first one's prompt + output then reuses them, and continues exactly as without speculation."""
    llm = make_llm(speculative_config={**FORCED, "num_speculative_tokens": 6}, block_size=4)
    seen = {}

    def half_wrong(seq, k):  # right on even positions of the reference, wrong after
        out = seen.get(tuple(seq.request.prompt_token_ids))
        if out is None:
            return [(seq.token_ids[-1] + 7) % vocab] * k
        done = seq.num_tokens - seq.request.num_prompt_tokens
        return list(out[done : done + 2]) + [(seq.token_ids[-1] + 7) % vocab] * (k - 2)

    llm.engine.speculator.proposer = half_wrong
    p, ref = prompts[3], reference[3]
    seen[tuple(p)] = ref.token_ids
    first = llm.generate([p], _greedy(40), use_tqdm=False)[0]
    _assert_greedy_match(_firsts([first]), [ref], "first")
    second_prompt = p + ref.token_ids[:24]
    got = llm.generate([second_prompt], _greedy(12), use_tqdm=False)[0]
    assert got.num_cached_tokens >= 20  # the decoded blocks were committed and reused
    want = make_llm(block_size=4).generate([second_prompt], _greedy(12), use_tqdm=False)[0]
    _assert_greedy_match(_firsts([got]), _firsts([want]), "second (prefix-cache hit)")


# -- adaptivity ----------------------------------------------------------------------------------------------------
def test_a_request_whose_drafts_keep_failing_deopts(make_llm, prompts, vocab):
    llm = make_llm(speculative_config=NGRAM)
    llm.engine.speculator.proposer = lambda seq, k: [(seq.token_ids[-1] + 3) % vocab] * k
    llm.generate([prompts[2]], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True), use_tqdm=False)
    stats = llm.speculative_stats()
    assert stats["num_deopts"] >= 2, stats
    # three misses, then 16 steps off, three misses, 32 off, ...: most steps never propose
    assert stats["num_drafts"] < 40, stats


def test_large_batch_gates_speculation_off(make_llm, vocab):
    """With a measured per-token cost that makes a draft dearer than what it returns at batch 32, the step
    proposes nothing: the gated steps are counted and no drafts are verified."""
    llm = make_llm(speculative_config=NGRAM, max_num_seqs=64)
    spec = llm.engine.speculator
    for tokens in (1, 4, 8, 32, 64, 96):
        spec.cost.observe(tokens, 0.002 + 0.001 * tokens)
    spec.cost.observe = lambda tokens, seconds: None  # keep the synthetic costs for this test
    prompts = [[(i * 7 + j) % vocab for j in range(6)] * 3 for i in range(32)]  # repetitive: lookup finds drafts
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    stats = llm.speculative_stats()
    assert stats["num_draft_tokens"] == 0 and stats["num_gated_steps"] > 0, stats
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert llm.speculative_stats()["num_draft_tokens"] > 0  # alone, the same drafts pay


# -- the sampling distribution -------------------------------------------------------------------------------------
def _chi_square_p(a: collections.Counter, b: collections.Counter) -> float:
    """p-value of the two-sample chi-square homogeneity test (categories with expected count < 5 pooled)."""
    keys = sorted(set(a) | set(b))
    na, nb = sum(a.values()), sum(b.values())
    rows, pooled = [], [0, 0]
    for k in keys:
        if (a[k] + b[k]) * min(na, nb) / (na + nb) < 5:
            pooled[0] += a[k]
            pooled[1] += b[k]
        else:
            rows.append((a[k], b[k]))
    if sum(pooled):
        rows.append(tuple(pooled))
    stat = 0.0
    for x, y in rows:
        total = x + y
        for obs, n in ((x, na), (y, nb)):
            exp = total * n / (na + nb)
            stat += (obs - exp) ** 2 / exp
    df = len(rows) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))


@pytest.mark.parametrize("proposer_kind", ["oracle", "draft_model"])
def test_sampled_tokens_follow_the_target_distribution(proposer_kind, make_llm, vocab, request):
    """Temperature 1, top-k 4 on a tiny model: 3000 samples of the first 4 output tokens with drafts that are
    the reference's most and second-most frequent continuations (a fifth of them accepted) against 3000
    without speculation. Stated tolerance: the chi-square homogeneity test of each output position's joint
    distribution with the previous one must not reject at the 0.1% level (deterministic seeds: not flaky).
    A verifier that accepted every draft shifts the distribution and is rejected (p < 1e-6) by the same test.
    draft_model: the same with a draft model's greedy guesses (the noisy copy of the target) instead."""
    prompt = [(5 * j + 1) % vocab for j in range(7)]
    params = SamplingParams(temperature=1.0, top_k=4, max_tokens=4, ignore_eos=True)
    n = 3000
    common = dict(max_num_seqs=256, num_kv_blocks=1024, block_size=4)

    def sample(llm, seed):
        torch.manual_seed(seed)
        outs = llm.generate([prompt] * n, params, use_tqdm=False)
        return [tuple(o.outputs[0].token_ids) for o in outs]

    ref = sample(make_llm(**common), 0)
    nxt: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
    for out in ref:
        for j in range(len(out)):
            nxt[out[:j]][out[j]] += 1

    def proposer(seq, k):
        ctx, drafts = tuple(seq.output_token_ids), []
        for j in range(k):
            ranked = [t for t, _ in nxt[ctx].most_common(2)]
            if not ranked:
                break
            drafts.append(ranked[min(j % 2, len(ranked) - 1)])
            ctx += (drafts[-1],)
        return drafts

    def pairs(outs, j):
        return collections.Counter(o[j - 1 : j + 1] for o in outs)

    if proposer_kind == "draft_model":
        draft = str(request.getfixturevalue("drafts")["noisy"])
        spec_llm = make_llm(
            speculative_config={"model": draft, "num_speculative_tokens": 3, "adaptive": False}, **common
        )
    else:
        spec_llm = make_llm(speculative_config=FORCED, **common)
        spec_llm.engine.speculator.proposer = proposer
    got = sample(spec_llm, 1)
    stats = spec_llm.speculative_stats()
    rejected = stats["num_draft_tokens"] - stats["num_accepted_tokens"]
    assert stats["num_accepted_tokens"] > 500 and rejected > 500, stats  # both paths, many times
    for j in (1, 2, 3):
        p = _chi_square_p(pairs(ref, j), pairs(got, j))
        assert p > 1e-3, f"output position {j}: the speculative distribution differs (chi-square p = {p:.2e})"
    if proposer_kind == "draft_model":
        return

    broken = make_llm(speculative_config=FORCED, **common)
    broken.engine.speculator.proposer = proposer
    verify = broken.engine.speculator.verify

    def accept_everything(sched, sampled, blocks):
        i = 0
        while i < len(sched.sample):
            drafts = sched.drafts.get(sched.sample[i][0].seq_id, [])
            sampled.tokens[i : i + len(drafts)] = drafts
            i += len(drafts) + 1
        verify(sched, sampled, blocks)

    broken.engine.speculator.verify = accept_everything
    bad = sample(broken, 1)
    assert min(_chi_square_p(pairs(ref, j), pairs(bad, j)) for j in (1, 2, 3)) < 1e-6


def test_seeded_sampling_is_the_same_with_speculation_on_and_off(make_llm, prompts):
    """A seeded draw is keyed by (seed, token index), so verifying several positions in one step draws exactly
    what decoding them one a step draws: the same tokens with speculation on and off, alone or batched, and for
    each of n = 2 forks (seed + fork index); with accepted drafts, so the verify path really ran."""
    llm = make_llm(speculative_config=FORCED)
    # two tokens share nearly all the mass: a random binary text, where n-gram drafts are proposed all the time
    # and each drafted token survives about half the time
    params = SamplingParams(temperature=1.0, max_tokens=24, seed=7, ignore_eos=True, n=2, logit_bias={100: 12, 200: 12})

    def run(engine, batch):
        return [[c.token_ids for c in o.outputs] for o in engine.generate(batch, params, use_tqdm=False)]

    plain = make_llm()
    want = run(plain, prompts)
    assert run(llm, prompts) == want
    assert run(llm, prompts[::-1])[::-1] == want
    assert [run(llm, [p])[0] for p in prompts] == want
    assert all(forks[0] != forks[1] for forks in want)  # seed + index: the forks differ
    assert llm.speculative_stats()["num_accepted_tokens"] > 0, llm.speculative_stats()


def test_penalised_requests_do_not_speculate_and_stay_exact(make_llm, prompts):
    llm = make_llm(speculative_config=FORCED)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.3, min_tokens=4)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert llm.speculative_stats()["num_draft_tokens"] == 0
    want = [o.outputs[0].token_ids for o in make_llm().generate(prompts, params, use_tqdm=False)]
    assert got == want


# -- the draft-model proposer ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def drafts(tiny_models, tmp_path_factory) -> dict:
    """Drafts for the tiny Llama, sharing its tokenizer: a smaller random model (its guesses are rarely right), the
    target with its weights perturbed (right about half the time), the target itself (always right), and a model
    with another tokenizer (refused)."""
    import shutil

    from safetensors.torch import load_file, save_file
    from tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("drafts")
    target = tiny_models["llama"]
    noisy = root / "noisy"
    shutil.copytree(target, noisy)
    weights = load_file(noisy / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    weights = {k: v + 0.03 * torch.randn(v.shape, generator=g) for k, v in weights.items()}
    save_file(weights, noisy / "model.safetensors", metadata={"format": "pt"})
    return {
        "small": build_tiny_model(root / "small", "llama", seed=1, hidden=32, layers=2),
        "noisy": noisy,
        "same": target,
        "other": build_tiny_model(root / "other-vocab", "llama", vocab_size=300),
    }


def _draft(path, k: int = 4, adaptive: bool = False) -> dict:
    return {"model": str(path), "num_speculative_tokens": k, "adaptive": adaptive}


DRAFT_CASES = {
    "small_batched": ("small", False, True, {}),
    "small_alone": ("small", False, False, {}),
    "noisy_batched": ("noisy", False, True, {}),
    "noisy_alone": ("noisy", False, False, {}),
    "noisy_adaptive": ("noisy", True, True, {}),
    "noisy_chunked_prefill": ("noisy", False, True, {"max_num_batched_tokens": 8}),
    "noisy_preemption": ("noisy", False, True, {"num_kv_blocks": 24, "block_size": 4}),
    "same_batched": ("same", False, True, {}),
}


@pytest.mark.parametrize("name", list(DRAFT_CASES))
def test_greedy_identical_with_a_draft_model(name, make_llm, drafts, prompts, reference):
    which, adaptive, batched, extra = DRAFT_CASES[name]
    llm = make_llm(speculative_config=_draft(drafts[which], adaptive=adaptive), **extra)
    if batched:
        outs = _firsts(llm.generate(prompts, _greedy(40), use_tqdm=False))
    else:
        outs = [_firsts(llm.generate([p], _greedy(40), use_tqdm=False))[0] for p in prompts]
    _assert_greedy_match(outs, reference, f"{name} vs no speculation")
    stats = llm.speculative_stats()
    assert stats["method"] == "draft_model" and stats["draft_forwards"] > 0, stats
    accepted, drafted = stats["num_accepted_tokens"], stats["num_draft_tokens"]
    if which == "same":  # the target drafting for itself: every guess is the target's own greedy token
        assert drafted > 100 and stats["acceptance_rate"] > 0.95, stats
    elif which == "noisy" and not adaptive:  # both the accept and the reject paths, many times
        assert accepted > 20 and drafted - accepted > 20, stats
    elif not adaptive:
        assert drafted > 100, stats
    if name.endswith("preemption"):
        assert llm.engine.stats().num_preemptions > 0


def test_draft_blocks_are_given_back_on_finish_and_abort(make_llm, drafts, prompts):
    """The draft holds KV for each speculating sequence (never more than its tokens plus k), forgets a sequence as
    soon as it is aborted, and holds nothing once every request has ended (make_llm's teardown checks both caches)."""
    from conftest import drive

    k = 4
    llm = make_llm(speculative_config=_draft(drafts["noisy"], k), block_size=4)
    engine = llm.engine
    draft = engine.speculator.proposer
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for i, p in enumerate(prompts[:6]):
        engine.add_request(str(i), p, params)
    for _ in range(5):
        engine.step()
        for seq in engine.scheduler.running:
            state = draft.seqs.get(seq.seq_id)
            if state is not None:
                assert len(state.block_table) <= -(-(seq.num_tokens + k) // 4), (state, seq.num_tokens)
    assert len(draft.seqs) == 6 and draft.blocks.num_free_blocks < draft.blocks.num_blocks
    engine.abort_request("0")
    engine.abort_request("3")
    assert set(draft.seqs) == {s.seq_id for s in engine.scheduler.running} and len(draft.seqs) == 4
    drive(engine)
    assert not draft.seqs and draft.blocks.num_free_blocks == draft.blocks.num_blocks
    assert llm.speculative_stats()["draft_kv_blocks_used"] == 0


def test_a_draft_with_another_tokenizer_is_refused(tiny_models, drafts):
    """Refused before anything is built, as the ValueError itself (like any other bad engine argument), saying
    which token ids differ."""
    with pytest.raises(ValueError, match="does not share the target's tokenizer") as info:
        LLM(str(tiny_models["llama"]), num_kv_blocks=64, speculative_config=_draft(drafts["other"]))
    assert type(info.value) is ValueError and "300 tokens vs the target's 400" in str(info.value)


def test_draft_cost_gates_speculation_where_ngram_would_still_pay(make_llm, drafts, prompts):
    """Measured costs (frozen): target step 10 ms + 1 ms a token, draft step 4 ms + 0.4 ms a token. At batch 8 a
    draft token costs 1 ms to verify plus 0.9 ms to propose against 2.25 ms it saves at best: gated, though an
    n-gram draft (0 ms to propose) would still be scheduled; alone the same draft model pays and speculates."""
    llm = make_llm(speculative_config=_draft(drafts["same"], adaptive=True))
    spec = llm.engine.speculator
    for tokens in (1, 4, 8, 32, 64, 96):
        spec.cost.observe(tokens, 0.010 + 0.001 * tokens)
        spec.proposer.cost.observe(tokens, 0.004 + 0.0004 * tokens)
    spec.cost.observe = spec.proposer.cost.observe = lambda tokens, seconds: None  # keep the synthetic costs
    assert spec.cost.draft_budget(0.6, 8, 4) > 0  # what n-gram speculation would do at batch 8
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    stats = llm.speculative_stats()
    assert stats["num_draft_tokens"] == 0 and stats["num_gated_steps"] > 0, stats
    llm.generate(prompts[:1], params, use_tqdm=False)
    assert llm.speculative_stats()["num_draft_tokens"] > 0


# -- what an operator sees -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_server_speculates_and_shows_it(method, tmp_path_factory):
    """`turbofan serve --speculative-config`: a prompt that repeats the chain model's chain is continued with
    accepted drafts (n-gram lookup, or the chain model drafting for itself); /metrics carries vLLM's spec-decode
    counters and /debug/tiers the speculator's table."""
    from test_server import KEY, NAME, chain_model_path, launch

    root = tmp_path_factory.mktemp("spec-server")
    model, facts = chain_model_path(root)
    if method == "ngram":
        config = json.dumps({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2})
    else:
        config = json.dumps({"model": str(model), "num_speculative_tokens": 3})
    srv = launch(model, root / "server.log", "--served-model-name", NAME, "--max-model-len", "128",
                 "--num-kv-blocks", "64", "--speculative-config", config, "--enable-debug-endpoints", key=KEY)  # fmt: skip
    try:
        chain = facts["chain"]
        prompt = chain[1:-1] + chain[1:3]
        body = {"model": NAME, "prompt": prompt, "max_tokens": 16, "temperature": 0}
        r = srv.post("/v1/completions", body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] == "stop"
        metrics = srv.get("/metrics").text
        values = {
            line.split("{")[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith(("vllm:spec_decode", "turbofan:spec_decode"))
        }
        assert values["vllm:spec_decode_num_draft_tokens_total"] >= 2, metrics
        assert values["vllm:spec_decode_num_accepted_tokens_total"] >= 2, metrics
        assert 0 < values["vllm:spec_decode_draft_acceptance_rate"] <= 1
        assert "turbofan:spec_decode_deopts_total" in values
        spec = srv.get("/debug/tiers").json()["speculative"]
        assert spec["num_accepted_tokens"] == values["vllm:spec_decode_num_accepted_tokens_total"]
        assert srv.get("/debug/engine").json()["speculative"]["method"] == method
        if method == "draft_model":
            assert spec["draft_forwards"] > 0 and spec["draft_kv_blocks_used"] == 0, spec  # freed when it finished
    finally:
        srv.stop()


def test_cli_refuses_a_bad_speculative_config(tmp_path):
    import subprocess
    import sys

    for flag, message in (("{not json", "not JSON"), ('{"method": "draft_model"}', 'needs "model"')):
        proc = subprocess.run(
            [sys.executable, "-m", "turbofan.cli", "serve", "/nonexistent", "--speculative-config", flag],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode != 0
        assert message in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
