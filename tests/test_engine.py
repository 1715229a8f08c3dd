"""Engine invariance, prefix caching, n > 1 forks, aborts, and KV leaks, on a tiny random-weight Llama.

Every LLM here comes from the `make_llm` fixture, which asserts at teardown that all KV blocks are free again.

What the engine promises, and so what these tests compare (issue 14):

* Exact, bit for bit: a row's results never depend on its batch mates' *values*. With the same step shapes, other
  tokens in the other rows leave a row's tokens, logprobs and prompt logprobs bitwise unchanged
  (`test_a_row_never_sees_its_batch_mates_values`), and the sampler turns one logits row into one token whatever
  the other rows hold (test_sampling).
* Within FLOAT_ATOL: one request run under another batching, chunking, preemption, block size or prefix-cache
  hit. Every such change alters the GEMM shapes (all tokens of a step are one [tokens, hidden] matrix), and the
  BLAS picks kernels and reduction orders by shape, AVX-512 differently from AVX2, so logits move in the last bits.
  The kernels are not chunk-invariant, so bit equality here would test the BLAS, not the engine.
* Greedy tokens: identical wherever the reference's top-1/top-2 margin is above FLOAT_ATOL; at a closer tie either
  token is right, the rest of that row follows from the choice, and the row is compared only up to there.
* Seeded samples: compared exactly. The exponential race only flips where two candidates' scores are within
  noise / temperature (about 2e-5 at TEMP) of each other, a chance of about 2e-5 per draw; these tests make about a
  thousand draws, and a host either always or never hits one, so an exact check is kept over a weaker one.

`test_invariance_checks_catch_a_leak` guards the tolerant checks: a batch-mate leak far smaller than any real mixing
bug still fails them.
"""

from __future__ import annotations

import random

import pytest
from conftest import assert_no_leaks

from turbofan import LLM, SamplingParams
from turbofan.engine import OutputBuilder

MAX_TOKENS = 24

# Measured on Zen 4, AVX-512 and forced AVX2: a logprob computed under different chunkings or batches differs by at
# most 4.8e-7 (prompt) and under 1e-6 (decode, after the KV cache was filled in other shapes): one or two float32
# ulps near -6, where the tiny vocabulary's logprobs sit (-log 400). 5e-5 leaves 50x headroom for other BLAS builds,
# yet a batch-mate leak of 1e-4 of the mates' logits already moves logprobs by about 5e-5, and one of 1e-3 by 5e-4
# (see test_invariance_checks_catch_a_leak).
FLOAT_ATOL = 5e-5


def _prompts(vocab: int, count: int = 16, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 2, 3, 5, 8, 13, 15, 16, 17, 21, 31, 32, 33, 40, 47, 9][:count]
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def _greedy(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    """Greedy with the top-2 logprobs: the margin tells a near-tie (either token right) from a real difference."""
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def _firsts(outs) -> list:
    return [o.outputs[0] for o in outs]


def _assert_greedy_match(got: list, want: list, what: str = "") -> None:
    """Greedy CompletionOutputs `got` equal the reference `want` (which has logprobs >= 2): the same tokens, and the
    same chosen-token logprobs within FLOAT_ATOL, up to the first position where the reference's top-2 were tied
    within FLOAT_ATOL and `got` took the other one; what follows that position depends on the choice."""
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert w.logprobs is not None, "the reference needs logprobs=2"
        assert len(g.token_ids) == len(w.token_ids), f"{what}: row {i} has {len(g.token_ids)} tokens"
        for j, (a, b) in enumerate(zip(g.token_ids, w.token_ids)):
            ranked = sorted(w.logprobs[j].items(), key=lambda kv: -kv[1].logprob)
            if a != b:
                (_, first), (second, runner_up) = ranked[0], ranked[1]
                margin = first.logprob - runner_up.logprob
                assert a == second and margin <= FLOAT_ATOL, (
                    f"{what}: row {i} says {a} instead of {b} at output {j}, where the reference's top-2 margin "
                    f"is {margin:.2e}: not a float-noise tie"
                )
                break
            if g.logprobs is not None:
                got_lp, want_lp = g.logprobs[j][a].logprob, w.logprobs[j][b].logprob
                assert abs(got_lp - want_lp) <= FLOAT_ATOL, (
                    f"{what}: row {i} output {j}: logprob {got_lp} vs {want_lp}"
                )


def _assert_logprobs_close(got: list, want: list, what: str = "") -> None:
    """Per-position logprob dicts (prompt_logprobs or a completion's logprobs) agree within FLOAT_ATOL. A top-k entry
    may be another token only where the two tie within FLOAT_ATOL at the cut (the k-th best)."""
    assert len(got) == len(want), what
    for j, (g, w) in enumerate(zip(got, want)):
        if g is None or w is None:
            assert g is None and w is None, f"{what}: position {j}"
            continue
        for t in g.keys() & w.keys():
            assert abs(g[t].logprob - w[t].logprob) <= FLOAT_ATOL, (
                f"{what}: position {j} token {t}: {g[t].logprob} vs {w[t].logprob}"
            )
        for one, other in ((g, w), (w, g)):
            cut = min(lp.logprob for lp in other.values())
            for t in one.keys() - other.keys():
                assert abs(one[t].logprob - cut) <= FLOAT_ATOL, (
                    f"{what}: position {j}: token {t} ({one[t].logprob}) is in one top-k only, not tied at the cut"
                )


def _assert_request_outputs_close(got: list, want: list, what: str = "") -> None:
    """Greedy RequestOutputs with prompt logprobs: the prompt logprobs close, the completions a greedy match."""
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        _assert_logprobs_close(g.prompt_logprobs, w.prompt_logprobs, f"{what}: prompt {i}")
    _assert_greedy_match(_firsts(got), _firsts(want), what)


def _exact(out) -> tuple:
    """Everything a RequestOutput says about its numbers, at full precision: for bit-for-bit comparisons."""

    def lps(entries):
        return (
            None
            if entries is None
            else [None if e is None else {t: lp.logprob for t, lp in e.items()} for e in entries]
        )

    return lps(out.prompt_logprobs), [
        (c.token_ids, lps(c.logprobs), c.cumulative_logprob) for c in out.outputs
    ]


def _leak_batch_mates(llm, share: float) -> None:
    """A deliberate bug for the guard tests: every logits row gets `share` of the sum of the step's other rows
    (nothing, for a row that runs alone)."""
    runner = llm.engine.runner
    forward = runner.forward_fn

    def leaky(batch):
        logits = forward(batch)
        return logits + share * (logits.sum(0, keepdim=True) - logits)

    runner.forward_fn = leaky


@pytest.fixture(scope="module")
def vocab(tiny_models) -> int:
    import json

    return json.loads((tiny_models["llama"] / "config.json").read_text())["vocab_size"]


@pytest.fixture(scope="module")
def prompts(vocab) -> list[list[int]]:
    return _prompts(vocab)


@pytest.fixture(scope="module")
def one_at_a_time(tiny_models, prompts) -> list:
    """The reference: each prompt alone in a fresh-ish engine, greedy; CompletionOutputs with top-2 logprobs."""
    llm = LLM(str(tiny_models["llama"]), num_kv_blocks=256)
    out = [_firsts(llm.generate([p], _greedy(), use_tqdm=False))[0] for p in prompts]
    assert_no_leaks(llm.engine)
    assert all(len(o.token_ids) == MAX_TOKENS for o in out)
    assert len({tuple(o.token_ids) for o in out}) > 8, (
        "the tiny model should not say the same thing to every prompt"
    )
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
    _assert_greedy_match(_firsts(outs), one_at_a_time, f"{name} vs each prompt alone")
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
    builders: dict[str, OutputBuilder] = {}
    done: dict[str, object] = {}
    while pending or engine.has_unfinished_requests():
        for _ in range(2):
            if pending:
                i, p = pending.pop(0)
                engine.add_request(str(i), p, _greedy())
        for delta in engine.step():
            builder = builders.setdefault(delta.request_id, OutputBuilder()).add(delta)
            if delta.finished:
                done[delta.request_id] = builder.output().outputs[0]
    _assert_greedy_match([done[str(i)] for i in range(len(prompts))], one_at_a_time, "joining mid-flight")


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
    _assert_greedy_match(_firsts([a, b]), _firsts([a2, b2]), "prefix cache vs none")


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
    _assert_greedy_match(_firsts([r2]), _firsts([r1]), "repeated prompt")
    follow = prompt + r1.outputs[0].token_ids[:16]
    r3 = llm.generate([follow], params, use_tqdm=False)[0]
    assert r3.num_cached_tokens == (len(follow) - 1) // block_size * block_size
    _assert_greedy_match(
        _firsts([r3]), _firsts(plain.generate([follow], params, use_tqdm=False)), "continuation"
    )


def test_prefix_cache_under_chunking_and_preemption(make_llm, vocab):
    rng = random.Random(5)
    prefix = [rng.randrange(vocab) for _ in range(64)]
    prompts = [prefix + [rng.randrange(vocab) for _ in range(n)] for n in (1, 3, 9, 17, 2, 30)]
    params = _greedy(12)
    plain = make_llm(enable_prefix_caching=False)
    want = _firsts(plain.generate(prompts, params, use_tqdm=False))
    llm = make_llm(block_size=4, num_kv_blocks=30, max_num_batched_tokens=24)
    llm.generate(prompts[:1], params, use_tqdm=False)
    outs = llm.generate(prompts, params, use_tqdm=False)
    _assert_greedy_match(_firsts(outs), want, "prefix cache under chunking and preemption")
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
    want = _firsts(fresh.generate([prompts[9]], _greedy(8), use_tqdm=False))
    _assert_greedy_match(
        _firsts(llm.generate([prompts[9]], _greedy(8), use_tqdm=False)), want, "after aborts"
    )


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
    """The context is capped to what the cache holds (8 tokens), so the request is refused up front."""
    llm = make_llm(block_size=4, num_kv_blocks=2)
    assert llm.engine.max_model_len == 8
    with pytest.raises(ValueError, match="maximum context length is 8 tokens.*25 tokens"):
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
    builder = OutputBuilder()
    for delta in engine.step():  # prefill, fork, first token
        builder.add(delta)
    for delta in engine.step():  # first decode: each fork writes position 37, in the partial block
        builder.add(delta)
    used = engine.stats().num_blocks - engine.stats().num_free_blocks
    assert used == 2 + 3, f"expected 2 shared prompt blocks + 3 private last blocks, {used} blocks in use"
    seqs = engine.requests["f"].seqs
    assert len({s.block_table[0] for s in seqs}) == 1 and len({s.block_table[2] for s in seqs}) == 3
    while engine.has_unfinished_requests():
        for delta in engine.step():
            builder.add(delta)
    assert builder.finished
    # greedy forks say the same thing as a single greedy request
    alone = _firsts(make_llm(block_size=16).generate([prompt], _greedy(5), use_tqdm=False))[0]
    _assert_greedy_match(builder.output().outputs, [alone] * 3, "greedy forks")


def test_failed_batch_submission_leaves_nothing_behind(make_llm, prompts, vocab):
    llm = make_llm()
    with pytest.raises(ValueError):
        llm.generate([prompts[3], [vocab + 5]], _greedy(), use_tqdm=False)
    assert_no_leaks(llm.engine)
    assert not llm.engine.scheduler.waiting


PROMPT_LP = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=2, logprobs=2)


def test_prompt_logprobs_invariant_to_chunking_and_preemption(make_llm, prompts):
    """Other chunkings run other GEMM shapes: equal within FLOAT_ATOL, not bit for bit (see the module docstring)."""
    batch = prompts[8:14]
    want = make_llm().generate(batch, PROMPT_LP, use_tqdm=False)
    assert all(len(o.prompt_logprobs) == len(p) for o, p in zip(want, batch))
    for config in ({"max_num_batched_tokens": 5}, {"num_kv_blocks": 20, "block_size": 4}):
        llm = make_llm(**config)
        got = llm.generate(batch, PROMPT_LP, use_tqdm=False)
        _assert_request_outputs_close(got, want, str(config))
        if "max_num_batched_tokens" in config:
            assert llm.engine.stats().steps_total >= sum(len(p) for p in batch) / 5
        if "num_kv_blocks" in config:
            assert llm.engine.stats().num_preemptions > 0
    # prompt logprobs need every prompt position computed, so the prefix cache must not skip any
    llm = make_llm()
    llm.generate([prompts[13]], _greedy(4), use_tqdm=False)
    again = llm.generate([prompts[13]], PROMPT_LP, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0
    _assert_request_outputs_close([again], [want[5]], "after a prefix-cache fill")


# -- guards: the comparisons above can fail ------------------------------------------------------------------------
def test_a_row_never_sees_its_batch_mates_values(make_llm, prompts, vocab):
    """Exact: with the same step shapes, other tokens in the batch mate leave the row bitwise unchanged, while
    other tokens in the row itself change it, and so does a deliberate leak of a thousandth of the mate's logits."""
    row, mate = prompts[12], prompts[13]  # 33 and 40 tokens, chunked by 16: they share every step
    other_mate = [(t + 1) % vocab for t in mate]
    other_row = [(row[0] + 1) % vocab, *row[1:]]

    def run(batch, leak: float = 0.0):
        llm = make_llm(max_num_batched_tokens=16)
        if leak:
            _leak_batch_mates(llm, leak)
        return llm.generate(batch, PROMPT_LP, use_tqdm=False)

    base = run([row, mate])
    swapped = run([row, other_mate])
    assert _exact(swapped[1]) != _exact(base[1])
    assert _exact(swapped[0]) == _exact(base[0]), "a batch mate's tokens changed another row's numbers"
    changed = run([other_row, mate])[0]
    with pytest.raises(AssertionError):
        _assert_request_outputs_close([changed], base[:1])
    leaky = run([row, mate], 1e-3)[0], run([row, other_mate], 1e-3)[0]
    with pytest.raises(AssertionError):
        _assert_request_outputs_close([leaky[1]], [leaky[0]])


def test_invariance_checks_catch_a_leak(make_llm, prompts, one_at_a_time):
    """The tolerant checks are not blind: a row that runs alone is unchanged by the deliberate leak, so the bug
    only shows in batches, and there both the greedy and the prompt-logprob comparisons fail on it."""
    alone = make_llm()
    _leak_batch_mates(alone, 0.01)
    for i in (4, 13):
        _assert_greedy_match(
            _firsts(alone.generate([prompts[i]], _greedy(), use_tqdm=False)), one_at_a_time[i : i + 1]
        )
    leaky = make_llm()
    _leak_batch_mates(leaky, 0.01)  # a hundredth of the batch mates' logits
    with pytest.raises(AssertionError, match="not a float-noise tie"):
        _assert_greedy_match(_firsts(leaky.generate(prompts, _greedy(), use_tqdm=False)), one_at_a_time)
    batch = prompts[8:14]
    want = make_llm().generate(batch, PROMPT_LP, use_tqdm=False)
    chunked = make_llm(max_num_batched_tokens=5)
    _leak_batch_mates(chunked, 1e-3)  # a thousandth: still ten times FLOAT_ATOL in the logprobs
    with pytest.raises(AssertionError, match="position"):
        _assert_request_outputs_close(chunked.generate(batch, PROMPT_LP, use_tqdm=False), want)


# -- 6. the lean step: deltas, incremental state ----------------------------------------------------------------------
def test_deltas_carry_each_token_once_and_fold_into_the_output(make_llm, prompts):
    """Streaming deltas (n=2, sampled, logprobs, a stop string) concatenate to exactly what generate() returns."""
    params = SamplingParams(n=2, temperature=TEMP, seed=3, max_tokens=12, logprobs=1, ignore_eos=True, stop=["zz"])
    llm = make_llm()
    want = llm.generate([prompts[9]], params, use_tqdm=False)[0]
    engine = llm.engine
    engine.add_request("d", prompts[9], params)
    seen: dict[int, list] = {0: [], 1: []}
    texts: dict[int, str] = {0: "", 1: ""}
    finished = 0
    while engine.has_unfinished_requests():
        for delta in engine.step():
            for c in delta.outputs:
                assert len(c.token_ids) <= 1, "a step adds one token per sequence"
                assert len(c.logprobs) == len(c.token_ids)
                seen[c.index] += c.token_ids
                texts[c.index] += c.text
                finished += c.finished
    assert finished == 2
    for c in want.outputs:
        assert seen[c.index] == c.token_ids and texts[c.index] == c.text and len(c.logprobs) == 12


def test_penalty_history_is_kept_across_steps_and_preemption(make_llm, prompts):
    """The InputBatch appends each token to a penalised slot's history; at every step the processed logits equal
    transformers' repetition penalty over the window of prompt + outputs, and OpenAI's penalties over outputs."""
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    seen: list = []

    def capture(output_ids, row):
        seen.append((list(output_ids), row.clone()))
        return row

    raw: list = []
    llm = make_llm(num_kv_blocks=8)  # tight: the batch below is preempted and recomputed
    forward = llm.engine.runner.forward_fn

    def keep_raw(batch):
        logits = forward(batch)
        raw.append(logits.clone())
        return logits

    llm.engine.runner.forward_fn = keep_raw
    prompt = prompts[10]
    for window in (-1, 5):
        seen.clear()
        raw.clear()
        p = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, repetition_penalty=1.7,
                           repeat_last_n=window, presence_penalty=0.3, frequency_penalty=0.2,
                           logits_processors=[capture])  # fmt: skip
        out = llm.generate([prompt], p, use_tqdm=False)[0].outputs[0]
        assert len(seen) == 20 == len(raw)
        for (outputs, row), logits in zip(seen, raw):
            context = prompt + outputs
            ids = torch.tensor([context if window < 0 else context[-window:]])
            want = RepetitionPenaltyLogitsProcessor(1.7)(ids, logits[-1:].clone())[0]
            counts = torch.bincount(torch.tensor(outputs, dtype=torch.long), minlength=want.shape[0]).float()
            want = want - 0.2 * counts - 0.3 * (counts > 0).float()
            torch.testing.assert_close(row, want, atol=1e-5, rtol=0)
        assert seen[-1][0] == out.token_ids[:-1]
    # the same requests in a batch that is preempted: the histories survive the recompute
    batch = [prompts[10], prompts[11], prompts[12]]
    p = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, repetition_penalty=1.7, repeat_last_n=5)
    alone = [llm.generate([q], p, use_tqdm=False)[0].outputs[0] for q in batch]
    llm.engine.runner.forward_fn = forward
    together = llm.generate(batch, p, use_tqdm=False)
    assert llm.engine.stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in together] == [a.token_ids for a in alone]


def test_prefix_cache_hashes_each_full_block_once(make_llm, prompts, monkeypatch):
    """commit() hashes only blocks that became full: a 40-token prompt plus 48 decoded tokens in blocks of 4 hash
    22 blocks in all, not the whole chain again at every step."""
    import turbofan.engine.block_manager as bm

    calls = []

    def counting_key(*args):
        calls.append(1)
        return bm.block_key(*args)

    llm = make_llm(block_size=4)
    monkeypatch.setattr(llm.engine.blocks, "key_fn", counting_key)
    llm.generate([prompts[13]], _greedy(48), use_tqdm=False)
    assert len(prompts[13]) == 40
    assert len(calls) == (40 + 48 - 1) // 4, len(calls)  # the last token's KV is never written


def test_logit_bias_equals_the_same_bias_as_a_logits_processor(make_llm, prompts):
    """SamplingParams.logit_bias (one scatter_add for the batch) acts exactly like a per-row processor."""
    import torch

    llm = make_llm()
    first = llm.generate(prompts[:4], _greedy(8), use_tqdm=False)
    banned = {o.outputs[0].token_ids[0]: -100.0 for o in first} | {3: 5.0}

    def processor(_ids, row):
        return row.index_add(0, torch.tensor(list(banned)), torch.tensor(list(banned.values())))

    base = dict(temperature=0, max_tokens=8, ignore_eos=True)
    by_field = llm.generate(prompts[:4], SamplingParams(**base, logit_bias=banned), use_tqdm=False)
    by_proc = llm.generate(prompts[:4], SamplingParams(**base, logits_processors=[processor]), use_tqdm=False)
    assert _tokens(by_field) == _tokens(by_proc)
    assert all(t not in banned or banned[t] > 0 for toks in _tokens(by_field) for t in toks[:1])
    with pytest.raises(ValueError, match="logit_bias token id"):
        llm.generate(prompts[:1], SamplingParams(logit_bias={10**6: 1.0}), use_tqdm=False)
