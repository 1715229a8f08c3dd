"""Engine invariance, prefix caching, n > 1 forks, aborts, and KV leaks, on a tiny random-weight Llama.

Every LLM here comes from the `make_llm` fixture, which asserts at teardown that all KV blocks are free again.
"""

from __future__ import annotations

import random

import pytest
from conftest import assert_no_leaks

from turbofan import LLM, SamplingParams

MAX_TOKENS = 24


def _prompts(vocab: int, count: int = 16, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 2, 3, 5, 8, 13, 15, 16, 17, 21, 31, 32, 33, 40, 47, 9][:count]
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def _greedy(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def vocab(tiny_models) -> int:
    import json

    return json.loads((tiny_models["llama"] / "config.json").read_text())["vocab_size"]


@pytest.fixture(scope="module")
def prompts(vocab) -> list[list[int]]:
    return _prompts(vocab)


@pytest.fixture(scope="module")
def one_at_a_time(tiny_models, prompts) -> list[list[int]]:
    """The reference: each prompt alone in a fresh-ish engine, greedy."""
    llm = LLM(str(tiny_models["llama"]), num_kv_blocks=256)
    out = [_tokens(llm.generate([p], _greedy(), use_tqdm=False))[0] for p in prompts]
    assert_no_leaks(llm.engine)
    assert all(len(t) == MAX_TOKENS for t in out)
    assert len({tuple(t) for t in out}) > 8, "the tiny model should not say the same thing to every prompt"
    return out


# -- 3. invariance ---------------------------------------------------------------------------------------------
CONFIGS = {
    "all_together": {},
    "chunked_prefill_budget_8": {"max_num_batched_tokens": 8},
    "chunked_prefill_budget_3": {"max_num_batched_tokens": 3, "block_size": 4},
    "max_num_seqs_3": {"max_num_seqs": 3},
    "block_size_1": {"block_size": 1, "num_kv_blocks": 2048},
    "block_size_4": {"block_size": 4},
    "no_prefix_caching": {"enable_prefix_caching": False},
    "preemption_bs16": {"num_kv_blocks": 8},
    "preemption_bs4": {"num_kv_blocks": 24, "block_size": 4},
    "preemption_chunked": {"num_kv_blocks": 20, "block_size": 4, "max_num_batched_tokens": 8},
    "preemption_no_prefix_cache": {"num_kv_blocks": 8, "enable_prefix_caching": False},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_invariant_to_batching_chunking_and_preemption(name, make_llm, prompts, one_at_a_time):
    config = CONFIGS[name]
    llm = make_llm(**config)
    outs = llm.generate(prompts, _greedy(), use_tqdm=False)
    for i, (got, want) in enumerate(zip(_tokens(outs), one_at_a_time)):
        assert got == want, f"{name}: prompt {i} ({len(prompts[i])} tokens) differs from running it alone"
    stats = llm.engine.stats()
    if name.startswith("preemption"):
        assert stats.num_preemptions > 0, "the tiny KV budget was meant to force preemption"
    else:
        assert stats.num_preemptions == 0
    if "max_num_batched_tokens" in config:
        assert stats.steps_total >= sum(len(p) for p in prompts) / config["max_num_batched_tokens"]


def test_requests_joining_mid_flight_match(make_llm, prompts, one_at_a_time):
    """Continuous batching: new requests arrive between steps of running ones."""
    llm = make_llm(max_num_batched_tokens=16)
    engine = llm.engine
    pending = list(enumerate(prompts))
    done: dict[str, list[int]] = {}
    while pending or engine.has_unfinished_requests():
        for _ in range(2):
            if pending:
                i, p = pending.pop(0)
                engine.add_request(str(i), p, _greedy())
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert [done[str(i)] for i in range(len(prompts))] == one_at_a_time


# The tiny models' logits span only ~0.5, so at temperature 1 a sample is almost pure noise and would not notice
# wrong logits; at 0.03 the logits matter and the draw is still random.
TEMP = 0.03


def _seeded(i: int, **kw) -> SamplingParams:
    return SamplingParams(
        temperature=TEMP, top_p=0.9, top_k=50, seed=1000 + i, max_tokens=16, ignore_eos=True, **kw
    )


@pytest.fixture(scope="module")
def seeded_alone(tiny_models, prompts) -> list[list[int]]:
    llm = LLM(str(tiny_models["llama"]), num_kv_blocks=256)
    out = [_tokens(llm.generate([p], _seeded(i), use_tqdm=False))[0] for i, p in enumerate(prompts)]
    assert_no_leaks(llm.engine)
    return out


@pytest.mark.parametrize(
    "config", [{}, {"max_num_batched_tokens": 8}, {"num_kv_blocks": 20, "block_size": 4}], ids=str
)
def test_seeded_sampling_same_alone_and_in_batch(config, make_llm, prompts, seeded_alone):
    llm = make_llm(**config)
    # mix in unseeded sampling and greedy rows: they share every batch with the seeded ones
    batch = prompts + prompts[:6]
    params = [_seeded(i) for i in range(len(prompts))]
    params += [SamplingParams(temperature=TEMP, max_tokens=16, ignore_eos=True)] * 3 + [_greedy(16)] * 3
    outs = llm.generate(batch, params, use_tqdm=False)
    assert _tokens(outs)[: len(prompts)] == seeded_alone
    if "num_kv_blocks" in config:
        assert llm.engine.stats().num_preemptions > 0


def test_seed_changes_the_sample(make_llm, prompts, seeded_alone):
    """Guards the test above: sampling is random, and the seed (not the batch) decides it."""
    llm = make_llm()
    other = _tokens(llm.generate(prompts, [_seeded(i + 1) for i in range(len(prompts))], use_tqdm=False))
    assert other != seeded_alone
    greedy = _tokens(llm.generate(prompts, _greedy(16), use_tqdm=False))
    assert greedy != seeded_alone, "sampling at this temperature should not just be greedy"
    again = _tokens(llm.generate(prompts, [_seeded(i) for i in range(len(prompts))], use_tqdm=False))
    assert again == seeded_alone


# -- 4. prefix caching ---------------------------------------------------------------------------------------------
def test_prefix_cache_hit_gives_identical_output(make_llm, vocab):
    rng = random.Random(42)
    prefix = [rng.randrange(vocab) for _ in range(64)]
    first = prefix + [rng.randrange(vocab) for _ in range(7)]
    second = prefix + [rng.randrange(vocab) for _ in range(5)]
    params = _greedy(20)

    cached = make_llm(enable_prefix_caching=True)
    a = cached.generate([first], params, use_tqdm=False)[0]
    before = cached.engine.stats()
    b = cached.generate([second], params, use_tqdm=False)[0]
    after = cached.engine.stats()
    assert a.num_cached_tokens == 0
    assert b.num_cached_tokens == 64, "the 64-token prefix is 4 full blocks of 16"
    assert after.prefix_hits - before.prefix_hits == 64
    assert after.prefix_queries - before.prefix_queries == len(second)
    # the skipped prefill is not counted as computed prompt work
    assert after.prompt_tokens_total - before.prompt_tokens_total == len(second) - 64

    plain = make_llm(enable_prefix_caching=False)
    a2, b2 = (
        plain.generate([first], params, use_tqdm=False)[0],
        plain.generate([second], params, use_tqdm=False)[0],
    )
    assert b2.num_cached_tokens == 0 and plain.engine.stats().prefix_hits == 0
    assert a.outputs[0].token_ids == a2.outputs[0].token_ids
    assert b.outputs[0].token_ids == b2.outputs[0].token_ids


@pytest.mark.parametrize("block_size", [4, 16])
def test_prefix_cache_repeated_prompt_and_decoded_blocks(make_llm, vocab, block_size):
    """A repeated prompt that is a whole number of blocks still computes its last token; output blocks are
    cached too, so a prompt that continues an earlier completion hits beyond the earlier prompt."""
    rng = random.Random(block_size)
    prompt = [rng.randrange(vocab) for _ in range(64)]
    llm = make_llm(block_size=block_size)
    plain = make_llm(block_size=block_size, enable_prefix_caching=False)
    params = _greedy(20)
    r1 = llm.generate([prompt], params, use_tqdm=False)[0]
    r2 = llm.generate([prompt], params, use_tqdm=False)[0]
    assert r2.num_cached_tokens == 64 - block_size
    assert r1.outputs[0].token_ids == r2.outputs[0].token_ids
    follow = prompt + r1.outputs[0].token_ids[:16]
    r3 = llm.generate([follow], params, use_tqdm=False)[0]
    assert r3.num_cached_tokens == (len(follow) - 1) // block_size * block_size
    assert r3.outputs[0].token_ids == plain.generate([follow], params, use_tqdm=False)[0].outputs[0].token_ids


def test_prefix_cache_under_chunking_and_preemption(make_llm, vocab):
    rng = random.Random(5)
    prefix = [rng.randrange(vocab) for _ in range(64)]
    prompts = [prefix + [rng.randrange(vocab) for _ in range(n)] for n in (1, 3, 9, 17, 2, 30)]
    params = _greedy(12)
    plain = make_llm(enable_prefix_caching=False)
    want = _tokens(plain.generate(prompts, params, use_tqdm=False))
    llm = make_llm(block_size=4, num_kv_blocks=30, max_num_batched_tokens=24)
    llm.generate(prompts[:1], params, use_tqdm=False)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert _tokens(outs) == want
    assert all(o.num_cached_tokens >= 64 for o in outs)
    stats = llm.engine.stats()
    assert stats.prefix_hits > 0 and stats.num_preemptions > 0


# -- 5. leaks, aborts, forks -------------------------------------------------------------------------------------
def test_leak_check_detects_held_blocks(make_llm, prompts):
    llm = make_llm()
    engine = llm.engine
    engine.add_request("r", prompts[10], _greedy())
    engine.step()
    with pytest.raises(AssertionError):
        assert_no_leaks(engine)
    engine.abort_request("r")
    assert_no_leaks(engine)


def test_abort_mid_generation_frees_everything(make_llm, prompts):
    llm = make_llm(block_size=4)
    engine = llm.engine
    for i, p in enumerate(prompts[8:12]):
        engine.add_request(f"r{i}", p, _greedy(50))
    for _ in range(5):
        engine.step()
    stats = engine.stats()
    assert stats.num_free_blocks < stats.num_blocks and stats.num_running == 4
    out = engine.abort_request("r1")
    assert out is not None and out.finished and out.outputs[0].finish_reason == "abort"
    assert len(out.outputs[0].token_ids) == 5  # one from the prefill step, then one per decode step
    assert engine.abort_request("r1") is None and engine.abort_request("nope") is None
    for rid in ("r0", "r2", "r3"):
        engine.abort_request(rid)
    assert_no_leaks(engine)
    # the engine is still usable, and aborted requests' cached blocks do not corrupt new ones
    fresh = make_llm(block_size=4, enable_prefix_caching=False)
    want = fresh.generate([prompts[9]], _greedy(8), use_tqdm=False)[0].outputs[0].token_ids
    assert llm.generate([prompts[9]], _greedy(8), use_tqdm=False)[0].outputs[0].token_ids == want


def test_abort_during_chunked_prefill_and_while_waiting(make_llm, prompts):
    llm = make_llm(block_size=4, max_num_batched_tokens=8, max_num_seqs=1)
    engine = llm.engine
    engine.add_request("long", prompts[13], _greedy())  # 40 tokens: five chunks of 8
    engine.add_request("queued", prompts[0], _greedy())
    engine.step()
    engine.step()
    stats = engine.stats()
    assert stats.num_running == 1 and stats.num_waiting == 1
    assert engine.requests["long"].seqs[0].num_computed_tokens == 16
    engine.abort_request("queued")
    engine.abort_request("long")
    assert_no_leaks(engine)


def test_abort_after_fork(make_llm, prompts):
    llm = make_llm(block_size=4)
    engine = llm.engine
    engine.add_request("f", prompts[9], SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=40))
    for _ in range(4):
        engine.step()
    assert len(engine.requests["f"].seqs) == 3
    out = engine.abort_request("f")
    assert [o.finish_reason for o in out.outputs] == ["abort"] * 3
    assert_no_leaks(engine)


def test_sequence_that_can_never_fit_fails_cleanly(make_llm):
    llm = make_llm(block_size=4, num_kv_blocks=2)
    with pytest.raises(MemoryError, match="does not fit"):
        llm.generate([[5, 6, 7, 8, 9]], _greedy(20), use_tqdm=False)
    # the fixture's teardown asserts nothing leaked


@pytest.mark.parametrize("block_size,prompt_len", [(16, 21), (4, 10), (4, 8)])
def test_n3_seeded_equals_three_separate_seeds(make_llm, vocab, block_size, prompt_len):
    """Forks share the prompt's blocks (copy-on-write on the partial last one) and seed as seed + index."""
    rng = random.Random(prompt_len)
    prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
    seed = 77
    llm = make_llm(block_size=block_size)
    fork = llm.generate(
        [prompt],
        SamplingParams(n=3, temperature=TEMP, seed=seed, max_tokens=20, ignore_eos=True),
        use_tqdm=False,
    )[0]
    assert [o.index for o in fork.outputs] == [0, 1, 2]
    singles = [
        SamplingParams(temperature=TEMP, seed=seed + i, max_tokens=20, ignore_eos=True) for i in range(3)
    ]
    separate = [llm.generate([prompt], p, use_tqdm=False)[0].outputs[0].token_ids for p in singles]
    assert [o.token_ids for o in fork.outputs] == separate
    assert len({tuple(s) for s in separate}) == 3, "three seeds should give three different samples"
    # and again with forks preempted and recomputed
    tight = make_llm(block_size=block_size, num_kv_blocks=-(-(prompt_len + 20) // block_size) + 2)
    again = tight.generate(
        [prompt],
        SamplingParams(n=3, temperature=TEMP, seed=seed, max_tokens=20, ignore_eos=True),
        use_tqdm=False,
    )[0]
    assert [o.token_ids for o in again.outputs] == separate
    assert tight.engine.stats().num_preemptions > 0


def test_n3_shares_prompt_blocks_copy_on_write(make_llm, vocab):
    rng = random.Random(1)
    prompt = [rng.randrange(vocab) for _ in range(37)]  # 2 full blocks of 16 + a partial one
    llm = make_llm(block_size=16, num_kv_blocks=32)
    engine = llm.engine
    engine.add_request("f", prompt, SamplingParams(n=3, temperature=0, max_tokens=5, ignore_eos=True))
    engine.step()  # prefill, fork, first token
    engine.step()  # first decode: each fork writes position 37, in the partial block
    used = engine.stats().num_blocks - engine.stats().num_free_blocks
    assert used == 2 + 3, f"expected 2 shared prompt blocks + 3 private last blocks, {used} blocks in use"
    seqs = engine.requests["f"].seqs
    assert len({s.block_table[0] for s in seqs}) == 1 and len({s.block_table[2] for s in seqs}) == 3
    while engine.has_unfinished_requests():
        outs = engine.step()
    # greedy forks say the same thing as a single greedy request
    alone = make_llm(block_size=16).generate([prompt], _greedy(5), use_tqdm=False)[0].outputs[0].token_ids
    assert [o.token_ids for o in outs[-1].outputs] == [alone] * 3


def test_failed_batch_submission_leaves_nothing_behind(make_llm, prompts, vocab):
    llm = make_llm()
    with pytest.raises(ValueError):
        llm.generate([prompts[3], [vocab + 5]], _greedy(), use_tqdm=False)
    assert_no_leaks(llm.engine)
    assert not llm.engine.scheduler.waiting


def _prompt_lp(outs):
    return [
        [None if e is None else {t: round(lp.logprob, 4) for t, lp in e.items()} for e in o.prompt_logprobs]
        for o in outs
    ]


def test_prompt_logprobs_invariant_to_chunking_and_preemption(make_llm, prompts):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=2, logprobs=1)
    batch = prompts[8:14]
    want = make_llm().generate(batch, params, use_tqdm=False)
    assert all(len(o.prompt_logprobs) == len(p) for o, p in zip(want, batch))
    for config in ({"max_num_batched_tokens": 5}, {"num_kv_blocks": 20, "block_size": 4}):
        llm = make_llm(**config)
        got = llm.generate(batch, params, use_tqdm=False)
        assert _prompt_lp(got) == _prompt_lp(want), config
        assert _tokens(got) == _tokens(want)
        if "num_kv_blocks" in config:
            assert llm.engine.stats().num_preemptions > 0
    # prompt logprobs need every prompt position computed, so the prefix cache must not skip any
    llm = make_llm()
    llm.generate([prompts[13]], _greedy(4), use_tqdm=False)
    again = llm.generate([prompts[13]], params, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0 and _prompt_lp([again]) == _prompt_lp([want[5]])
