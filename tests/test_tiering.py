"""Tiered execution of the forward pass (issue 5): tier 0 eager, background tier 1, guards, deopts, never-optimise.

torch.compile of even the tiny model takes 10-40 s on a small CPU box, so there is ONE real compilation here:
the module-scoped `hot` fixture runs a tiering-on LLM with a low threshold until decode[b=4] (three sequences,
padded to the bucket of 4) tiers up, and records what happened on the way; the tests after it read those records
or reuse the compiled entry. Everything about failures and timing uses `TieredForward(..., compile_fn=...)`, the
injection point for the compiler, with fakes that raise or sleep instead of compiling.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_no_leaks

from turbofan import LLM, SamplingParams
from turbofan.model import tiering
from turbofan.model.batch import ForwardBatch
from turbofan.model.tiering import BUCKETS, TieredForward, bucket_for

THRESHOLD = 4
MAX_TOKENS = 12
NUM_BLOCKS = 64
KEY = "decode[b=4]"  # three prompts decode together: batch 3, padded to the bucket of 4
COMPILE_TIMEOUT = 600
GUARD_REASON = "guard failed: dtype, device or weights changed"


def _greedy(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def _gen(llm, prompts) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, _greedy(), use_tqdm=False)]


def _texts(llm, prompts) -> list[str]:
    return [o.outputs[0].text for o in llm.generate(prompts, _greedy(), use_tqdm=False)]


def _unique_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far (any thread)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@pytest.fixture(scope="module", autouse=True)
def no_judging():
    """These tests pin which tier runs; whether compiled code pays is judged only where a test asks for it
    (timings of a tiny model on a shared machine would make the tier flip at random)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiering, "JUDGE_AFTER", 10**9)
        yield


def test_buckets_are_at_most_a_quarter_apart_from_8_on():
    assert bucket_for(33) == 40 and bucket_for(3) == 4 and bucket_for(9) == 10 and bucket_for(65) == 80
    assert all(b / a <= 1.25 for a, b in zip(BUCKETS, BUCKETS[1:]) if a >= 8)


@pytest.fixture(scope="module")
def tiny_dir(tiny_models) -> str:
    return str(tiny_models["llama"])


@pytest.fixture(scope="module")
def vocab(tiny_dir) -> int:
    return json.loads((Path(tiny_dir) / "config.json").read_text())["vocab_size"]


@pytest.fixture(scope="module")
def prompts(vocab) -> list:
    rng = random.Random(5)
    return [[rng.randrange(vocab) for _ in range(n)] for n in (3, 18)] + ["Paged attention stores keys"]


@pytest.fixture(scope="module")
def eager_llm(tiny_dir):
    llm = LLM(tiny_dir, num_kv_blocks=NUM_BLOCKS)  # tiering off: the reference
    assert llm.engine.runner.forward_fn == llm.engine.runner.eager_forward
    yield llm
    assert_no_leaks(llm.engine)


@pytest.fixture(scope="module")
def reference(eager_llm, prompts) -> dict:
    tokens = _gen(eager_llm, prompts)
    assert all(len(t) == MAX_TOKENS for t in tokens)
    assert len({tuple(t) for t in tokens}) == len(prompts), (
        "the tiny model should answer each prompt differently"
    )
    return {"tokens": tokens, "texts": _texts(eager_llm, prompts)}


@pytest.fixture(scope="module")
def tiered_llm(tiny_dir):
    llm = LLM(tiny_dir, num_kv_blocks=NUM_BLOCKS, tiering="on", tier_threshold=THRESHOLD)
    assert isinstance(llm.engine.runner.forward_fn, TieredForward)
    yield llm
    llm.engine.runner.forward_fn.close()
    assert_no_leaks(llm.engine)


class StepTimer:
    """Wraps engine.step on one engine instance: duration of every step and the key's state when it began."""

    def __init__(self, engine, forward_fn: TieredForward, key: str = KEY):
        self.engine, self.ff, self.key = engine, forward_fn, key
        self.records: list[tuple[str, float]] = []
        self._step = engine.step
        engine.step = self

    def __call__(self):
        entry = self.ff.entries.get(self.key)
        state = entry.state if entry else "absent"
        start = time.perf_counter()
        try:
            return self._step()
        finally:
            self.records.append((state, time.perf_counter() - start))

    def restore(self) -> None:
        del self.engine.step

    def durations(self, state: str) -> list[float]:
        return [d for s, d in self.records if s == state]


@pytest.fixture(scope="module")
def hot(tiered_llm, prompts, reference) -> dict:
    """Drive decode[b=4] hot with real torch.compile; record outputs and step times before, during and after."""
    llm, ff = tiered_llm, tiered_llm.engine.runner.forward_fn
    rec: dict = {"outputs_tier0": [], "outputs_while_compiling": []}
    timer = StepTimer(llm.engine, ff)
    try:
        rec["outputs_tier0"].append(_gen(llm, prompts))  # the key gets hot here and the compile is submitted
        entry = ff.entries[KEY]
        rec["state_after_first_run"] = entry.state
        # Serving while the real compile runs on the background thread: requests keep completing.
        deadline = time.monotonic() + COMPILE_TIMEOUT
        while (
            entry.state == "compiling"
            and time.monotonic() < deadline
            and len(rec["outputs_while_compiling"]) < 50
        ):
            rec["outputs_while_compiling"].append(_gen(llm, prompts))
        rec["idle"] = ff.wait_idle(COMPILE_TIMEOUT)
        rec["compiling_steps"] = timer.durations("compiling")
        rec["tier1_before"] = ff.tier_calls["1"]
        timer.records.clear()
        graphs = _unique_graphs()
        rec["outputs_tier1"] = _gen(llm, prompts)  # the first run on the compiled entry
        rec["graphs_compiled_while_serving"] = _unique_graphs() - graphs
        rec["ready_steps"] = timer.durations("ready")
        rec["tier1_after"] = ff.tier_calls["1"]
        rec["texts_tier1"] = _texts(llm, prompts)
    finally:
        timer.restore()
    rec["table"] = ff.table()
    return rec


def _ensure_ready(llm, prompts) -> None:
    ff = llm.engine.runner.forward_fn
    entry = ff.entries.get(KEY)
    if entry is None or entry.state != "ready":
        _gen(llm, prompts)
        assert ff.wait_idle(COMPILE_TIMEOUT), "tier-up did not finish"
    assert ff.entries[KEY].state == "ready", ff.table()


# -- outputs identical across tiers -----------------------------------------------------------------------------
def test_greedy_identical_with_tiering_off_and_on_and_tier1_is_used(hot, reference, tiered_llm):
    ff = tiered_llm.engine.runner.forward_fn
    assert hot["state_after_first_run"] in ("compiling", "ready"), (
        "a key past the threshold must be submitted"
    )
    assert hot["idle"], "the background compile did not finish"
    assert hot["outputs_tier0"][0] == reference["tokens"]
    for out in hot["outputs_while_compiling"]:
        assert out == reference["tokens"]
    assert hot["outputs_tier1"] == reference["tokens"]
    assert hot["texts_tier1"] == reference["texts"]
    assert hot["tier1_after"] > hot["tier1_before"], "after tier-up the decode steps must run on tier 1"
    assert ff.tier_calls["1"] > 0
    rows = {r["key"]: r for r in hot["table"]}
    assert rows[KEY]["tier"] == 1 and rows[KEY]["state"] == "ready", rows[KEY]
    assert rows[KEY]["compiled_calls"] >= MAX_TOKENS - 1 and rows[KEY]["compile_seconds"] > 0
    assert all(r["tier"] == 0 for k, r in rows.items() if k.startswith("prefill")), "prefill stays on tier 0"


def test_serving_continues_while_the_real_compile_runs(hot):
    steps = hot["compiling_steps"]
    compile_s = {r["key"]: r for r in hot["table"]}[KEY]["compile_seconds"]
    assert len(hot["outputs_while_compiling"]) >= 1, "no request completed while the key compiled"
    assert len(steps) >= 10
    # A step that waited for the compiler would take about the whole compile; a loaded machine slows steps too,
    # so the bound is relative to the compile, not a wall-clock constant.
    assert max(steps) < compile_s / 5, f"a step stalled on the compiler: {max(steps):.2f} s of {compile_s:.1f} s"


def test_first_compiled_steps_do_not_compile_on_the_serving_thread(hot):
    """Once an entry is ready, using it must not trigger a (re)compile inside the step: the warm-up on the
    compiler thread has to compile exactly what serving calls (same shapes, same kind of tensors)."""
    steps = hot["ready_steps"]
    assert steps, "no step ran on the ready entry"
    assert hot["graphs_compiled_while_serving"] == 0, (
        f"{hot['graphs_compiled_while_serving']} graph(s) compiled during serving on a ready entry; "
        f"slowest step {max(steps):.2f} s"
    )
    assert max(steps) < 0.5, f"a step on the ready entry took {max(steps):.2f} s"


# -- logits: eager vs compiled, per bucket ------------------------------------------------------------------------
def _free_blocks(engine, count: int) -> list[int]:
    """Blocks from the top of the cache that hold nothing the prefix cache could hand out later."""
    bm = engine.blocks
    blocks = [
        b for b in range(bm.num_blocks - 1, -1, -1) if bm.ref_counts[b] == 0 and bm.block_hash[b] is None
    ]
    assert len(blocks) >= count
    return blocks[:count]


def _decode_batch(runner, blocks: list[int], vocab: int, seed: int, lengths: list[int]) -> ForwardBatch:
    """Prefill each sequence (eager) into its own blocks, then return the decode batch of its next token."""
    rng = random.Random(seed)
    bs = runner.block_size
    tables, chunks = [], []
    for i, n in enumerate(lengths):
        per = -(-(n + 1) // bs)
        tables.append(blocks[i * 4 : i * 4 + per])
        chunks.append([rng.randrange(vocab) for _ in range(n)])
    prefill = ForwardBatch.build(chunks, [0] * len(lengths), tables, [[n - 1] for n in lengths], bs)
    runner.eager_forward(prefill)
    nxt = [[rng.randrange(vocab)] for _ in lengths]
    return ForwardBatch.build(nxt, lengths, tables, [[0]] * len(lengths), bs)


@pytest.mark.parametrize("lengths", [[5, 17, 30, 9], [2, 33, 16]], ids=["b4-exact", "b3-padded"])
def test_logits_eager_vs_compiled_within_1e4(hot, tiered_llm, prompts, vocab, lengths):
    engine = tiered_llm.engine
    runner, ff = engine.runner, engine.runner.forward_fn
    _ensure_ready(tiered_llm, prompts)
    blocks = _free_blocks(engine, 16)
    batch = _decode_batch(runner, blocks, vocab, seed=len(lengths), lengths=lengths)
    assert batch.is_decode
    eager = runner.eager_forward(batch)
    tier1 = ff.tier_calls["1"]
    compiled = runner.execute(batch)  # the engine's path: TieredForward picks the compiled entry
    assert ff.tier_calls["1"] == tier1 + 1, "this batch must have run on tier 1"
    assert compiled.shape == eager.shape == (len(lengths), runner.args.vocab_size)
    assert compiled.dtype == eager.dtype == torch.float32
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)
    assert torch.equal(compiled.argmax(-1), eager.argmax(-1))


def test_logits_one_sequence_padded_to_the_bucket(hot, tiered_llm, prompts, vocab):
    """One sequence through the bucket-4 entry: three padding rows that must not leak into the real row."""
    engine = tiered_llm.engine
    runner, ff = engine.runner, engine.runner.forward_fn
    _ensure_ready(tiered_llm, prompts)
    batch = _decode_batch(runner, _free_blocks(engine, 4), vocab, seed=9, lengths=[21])
    eager = runner.eager_forward(batch)
    with torch.inference_mode():
        compiled = ff._compiled(ff.entries[KEY], batch)
    assert compiled is not None
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)


# -- guards and deopts ---------------------------------------------------------------------------------------------
def test_guard_miss_deopts_then_reoptimises(hot, tiered_llm, prompts, reference):
    engine = tiered_llm.engine
    runner, ff = engine.runner, engine.runner.forward_fn
    _ensure_ready(tiered_llm, prompts)
    entry = ff.entries[KEY]
    assert entry.guard == (runner.dtype, str(runner.device), runner.model_version)

    tier1 = ff.tier_calls["1"]
    assert _gen(tiered_llm, prompts) == reference["tokens"]
    assert ff.tier_calls["1"] > tier1, "the hot key runs on tier 1"

    # The weights change (same values here, so the reference still holds): the speculation no longer holds.
    deopts = ff.deopts[GUARD_REASON]
    tier1 = ff.tier_calls["1"]
    runner.model_version += 1
    assert _gen(tiered_llm, prompts) == reference["tokens"]
    assert ff.deopts[GUARD_REASON] == deopts + 1, dict(ff.deopts)
    assert entry.failures == 0, "a guard miss is not a failure of the compiled code"
    assert entry.state in ("cold", "compiling", "ready")
    # Still hot: it is compiled again for the new version and used again.
    assert ff.wait_idle(COMPILE_TIMEOUT)
    if entry.state == "cold":
        _ensure_ready(tiered_llm, prompts)
    assert entry.state == "ready" and entry.guard[2] == runner.model_version
    assert _gen(tiered_llm, prompts) == reference["tokens"]
    assert ff.tier_calls["1"] > tier1


def test_batch_larger_than_any_bucket_deopts_and_stays_right(hot, tiered_llm, prompts, vocab):
    engine = tiered_llm.engine
    runner, ff = engine.runner, engine.runner.forward_fn
    _ensure_ready(tiered_llm, prompts)
    size = BUCKETS[-1] + 1
    blocks = _free_blocks(engine, -(-size // runner.block_size))
    bs = runner.block_size
    rng = random.Random(7)
    # Sequence i writes position i % bs of its own block row: every slot distinct, so both runs write the same.
    batch = ForwardBatch.build(
        [[rng.randrange(vocab)] for _ in range(size)],
        [i % bs for i in range(size)],
        [[blocks[i // bs]] for i in range(size)],
        [[0]] * size,
        bs,
    )
    reason = "batch larger than any bucket"
    before, tier0 = ff.deopts[reason], ff.tier_calls["0"]
    out = runner.execute(batch)
    assert ff.deopts[reason] == before + 1
    assert ff.tier_calls["0"] == tier0 + 1
    assert torch.equal(out, runner.eager_forward(batch))


def test_cold_key_next_to_a_ready_one_deopts_no_compiled_entry(hot, tiered_llm, prompts, vocab):
    engine = tiered_llm.engine
    runner, ff = engine.runner, engine.runner.forward_fn
    _ensure_ready(tiered_llm, prompts)
    batch = _decode_batch(
        runner, _free_blocks(engine, 4), vocab, seed=11, lengths=[6]
    )  # bucket 1: not compiled
    before = ff.deopts["no compiled entry"]
    out = runner.execute(batch)
    assert ff.deopts["no compiled entry"] == before + 1
    torch.testing.assert_close(out, runner.eager_forward(batch), atol=0, rtol=0)


# -- failures, with a fake compiler --------------------------------------------------------------------------------
@pytest.fixture
def fake_tiered(eager_llm):
    """factory(compile_fn, threshold) -> a TieredForward installed on the reference LLM's runner, removed after."""
    runner = eager_llm.engine.runner
    made: list[TieredForward] = []

    def install(compile_fn, threshold: int = 2) -> TieredForward:
        tf = TieredForward(runner, threshold=threshold, compile_fn=compile_fn)
        runner.forward_fn = tf
        made.append(tf)
        return tf

    yield install
    runner.forward_fn = runner.eager_forward
    for tf in made:
        tf.wait_idle(30)
        tf.close()


class CountingCompiler:
    """compile_fn: returns the function itself (no torch.compile), counting compilations."""

    def __init__(self):
        self.compiles = 0

    def __call__(self, fn):
        self.compiles += 1
        return fn


def test_compiled_entry_that_raises_falls_back_to_tier0_and_is_blacklisted(
    fake_tiered, eager_llm, prompts, reference
):
    compiler = CountingCompiler()
    tf = fake_tiered(compiler)
    raised: list[int] = []

    def boom(*args, **kwargs):
        raised.append(1)
        raise RuntimeError("speculation broke")

    def tier_up() -> None:
        assert _gen(eager_llm, prompts) == reference["tokens"]
        assert tf.wait_idle(30)
        if tf.entries[KEY].state != "ready":
            assert _gen(eager_llm, prompts) == reference["tokens"]
            assert tf.wait_idle(30)
        assert tf.entries[KEY].state == "ready", tf.table()

    tier_up()
    entry = tf.entries[KEY]
    assert compiler.compiles == 1 and entry.failures == 0
    reason = "compiled entry raised RuntimeError"

    # First failure: the step reruns on tier 0 (right tokens), the entry is dropped and the key may try again.
    entry.compiled = boom
    tier0 = tf.tier_calls["0"]
    assert _gen(eager_llm, prompts) == reference["tokens"]
    assert raised == [1] and entry.failures == 1 and tf.deopts[reason] == 1
    assert tf.tier_calls["0"] > tier0
    assert tf.wait_idle(30)
    if entry.state != "ready":
        tier_up()
    assert compiler.compiles == 2 and entry.state == "ready"

    # Second failure: never optimise this key again.
    entry.compiled = boom
    assert _gen(eager_llm, prompts) == reference["tokens"]
    assert raised == [1, 1] and entry.failures == 2 and tf.deopts[reason] == 2
    assert entry.state == "never" and entry.compiled is None
    tier1 = tf.tier_calls["1"]
    for _ in range(3):
        assert _gen(eager_llm, prompts) == reference["tokens"]
        assert tf.wait_idle(30)
    assert compiler.compiles == 2, "a blacklisted key must never be compiled again"
    assert entry.state == "never" and tf.tier_calls["1"] == tier1
    assert {r["key"]: r for r in tf.table()}[KEY]["state"] == "never"


def test_compile_that_fails_twice_blacklists_the_key(fake_tiered, eager_llm, prompts, reference):
    compiles: list[int] = []

    def broken_compiler(fn):
        compiles.append(1)

        def compiled(*args, **kwargs):
            raise RuntimeError("inductor fell over")

        return compiled

    tf = fake_tiered(broken_compiler)
    for _ in range(6):
        assert _gen(eager_llm, prompts) == reference["tokens"]
        assert tf.wait_idle(30)
        if tf.entries[KEY].state == "never":
            break
    entry = tf.entries[KEY]
    assert entry.state == "never" and entry.failures == 2 and len(compiles) == 2
    for _ in range(2):
        assert _gen(eager_llm, prompts) == reference["tokens"]
        assert tf.wait_idle(30)
    assert len(compiles) == 2 and tf.tier_calls["1"] == 0


def test_compiled_entry_slower_than_tier0_is_dropped(fake_tiered, eager_llm, prompts, reference, monkeypatch):
    """V8 drops optimised code that does not pay: a compiled entry measured slower than tier 0 on its own key goes
    back to tier 0 for good, with the reason counted."""
    monkeypatch.setattr(tiering, "JUDGE_AFTER", 4)

    def slow_compiler(fn):
        def compiled(*args, **kwargs):
            time.sleep(0.05)  # far slower than an eager step of the tiny model
            return fn(*args, **kwargs)

        return compiled

    tf = fake_tiered(slow_compiler)
    for _ in range(6):
        assert _gen(eager_llm, prompts) == reference["tokens"]
        assert tf.wait_idle(30)
        if tf.entries[KEY].state == "never":
            break
    entry = tf.entries[KEY]
    assert entry.state == "never" and entry.compiled is None and entry.failures == 0
    assert tf.deopts["slower than tier 0"] == 1
    assert entry.compiled_ms > entry.eager_ms
    tier1 = tf.tier_calls["1"]
    assert _gen(eager_llm, prompts) == reference["tokens"]
    assert tf.tier_calls["1"] == tier1, "a dropped entry must not run again"


# -- serving never blocks on compilation -------------------------------------------------------------------------
def test_steps_keep_completing_while_a_key_compiles(fake_tiered, eager_llm, prompts, reference):
    sleep_s = 3.0
    started, finished = threading.Event(), threading.Event()

    def slow_compiler(fn):
        started.set()
        time.sleep(sleep_s)  # a compile that takes a while (and holds no lock the serving thread needs)
        finished.set()
        return fn

    tf = fake_tiered(slow_compiler)
    engine = eager_llm.engine
    expected = dict(zip(map(str, range(len(prompts))), reference["tokens"]))
    steps: list[tuple[str, float]] = []  # (state at the start of the step, seconds)
    latencies: list[tuple[str, float]] = []  # (state when the request was added, add -> finish seconds)
    added: dict[str, tuple[str, float]] = {}
    deadline = time.monotonic() + sleep_s + 30
    try:
        _serve_until_tier1(tf, engine, prompts, expected, steps, latencies, added, deadline)
    finally:
        for rid in list(engine.requests):  # a failed run must not leave requests behind for later tests
            engine.abort_request(rid)
    assert not added, "requests left unfinished"
    assert started.is_set() and finished.is_set()
    during = [d for s, d in steps if s == "compiling"]
    assert len(during) >= 20, f"only {len(during)} steps ran during a {sleep_s} s compile"
    assert max(during) < sleep_s / 10, f"a step waited for the compiler: {max(during):.2f} s"
    done_during = [t for s, t in latencies if s == "compiling"]
    assert len(done_during) >= 3, "requests that arrive while a key compiles must complete"
    assert max(done_during) < sleep_s / 2, (
        f"request latency jumped by the compile time: {max(done_during):.2f} s"
    )
    assert tf.entries[KEY].state == "ready" and tf.tier_calls["1"] >= 5, "after the compile the key switches"


def _serve_until_tier1(tf, engine, prompts, expected, steps, latencies, added, deadline) -> None:
    """Step the engine, topping it up with requests, until the key runs on tier 1 (or the deadline)."""
    count = 0
    got: dict[str, list[int]] = {}  # engine.step() returns deltas: each request's tokens so far
    while time.monotonic() < deadline:
        entry = tf.entries.get(KEY)
        state = entry.state if entry else "absent"
        if state == "ready" and tf.tier_calls["1"] >= 5 and not engine.has_unfinished_requests():
            break
        if not engine.has_unfinished_requests():
            for i, p in enumerate(prompts):
                rid = f"slow-{count}-{i}"
                engine.add_request(rid, p, _greedy())
                added[rid] = (state, time.perf_counter())
            count += 1
        start = time.perf_counter()
        outs = engine.step()
        steps.append((state, time.perf_counter() - start))
        for out in outs:
            got.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
            if out.finished:
                assert got.pop(out.request_id) == expected[out.request_id.rsplit("-", 1)[1]]
                state_added, t0 = added.pop(out.request_id)
                latencies.append((state_added, time.perf_counter() - t0))


# -- code cache -----------------------------------------------------------------------------------------------------
def test_code_cache_lives_under_the_model_store(tiny_dir, tmp_path, monkeypatch):
    """Compiled artifacts go to Inductor's cache directory under the model store, so a restart tiers up faster.

    No compile here: Inductor reads TORCHINDUCTOR_CACHE_DIR whenever it needs its cache directory, so where that
    points once the engine is built is where the artifacts go. Importing torch._dynamo already sets it (to
    /tmp/torchinductor_<user>) in every real process, so the engine must not merely set a default.
    """
    name = "TORCHINDUCTOR_CACHE_DIR"
    if name in os.environ:
        monkeypatch.setenv(name, os.environ[name])  # unchanged; restored after the test
    else:
        monkeypatch.delenv(name, raising=False)
    store = tmp_path / "models"
    llm = LLM(tiny_dir, num_kv_blocks=8, tiering="on", models_dir=str(store))
    llm.engine.runner.forward_fn.close()
    cache = Path(os.environ.get(name, "")).resolve()
    assert cache.is_relative_to(store.resolve()), (
        f"Inductor's cache is {cache}, not under the model store {store}"
    )


def test_code_cache_is_kept_per_cpu_capability(tmp_path):
    """Inductor recompiles a cached graph's C++ for the running ISA while its cache key leaves the ISA out, so a
    cache shared by an AVX2 and an AVX-512 process gives wrong tokens one way and heap corruption the other."""
    script = (
        "from turbofan.assembly import compile_cache_dir; from turbofan.config import EngineConfig; "
        f"print(compile_cache_dir(EngineConfig(model='x', models_dir={str(tmp_path)!r})))"
    )
    dirs = set()
    for cap in ("avx2", "default"):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": cap}
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        path = Path(out.stdout.strip())
        assert path.is_relative_to(tmp_path) and path.name == cap, path
        dirs.add(path)
    assert len(dirs) == 2
