"""One request never takes the engine down: KV capacity at start and mid-generation, errors isolated to the
requests they concern, prefix-cache keys that cannot hand one request another's blocks (issue 8)."""

from __future__ import annotations

import logging
import random

import pytest
from conftest import assert_no_leaks

from turbofan import SamplingParams
from turbofan.engine.block_manager import ROOT_KEY, BlockManager, block_key
from turbofan.engine.errors import RequestFailedError


def _steps(engine, max_steps: int = 10_000) -> tuple[dict, dict]:
    """Step until idle; (request id -> final delta's outputs folded, request id -> RequestFailedError)."""
    from turbofan.engine import OutputBuilder

    builders, done, failed = {}, {}, {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        try:
            deltas = engine.step()
        except RequestFailedError as exc:
            for rid in exc.request_ids:
                failed[rid] = exc
            continue
        for delta in deltas:
            builder = builders.setdefault(delta.request_id, OutputBuilder()).add(delta)
            if delta.finished:
                done[delta.request_id] = builder.output()
    return done, failed


def test_context_is_capped_to_the_kv_cache_and_both_numbers_are_logged(make_llm, caplog):
    with caplog.at_level(logging.WARNING, logger="turbofan.engine"):
        llm = make_llm(num_kv_blocks=8, max_model_len=4096)  # 8 blocks of 16 = 128 tokens
    assert llm.engine.max_model_len == 128
    assert any("4096" in r.getMessage() and "128" in r.getMessage() for r in caplog.records), caplog.text
    with pytest.raises(ValueError, match=r"maximum context length is 128 tokens.*3000 tokens"):
        llm.generate([[7] * 3000], SamplingParams(max_tokens=4), use_tqdm=False)


def test_requests_that_together_overflow_the_cache_all_complete(make_llm):
    llm = make_llm(num_kv_blocks=12, max_num_seqs=8)  # 192 tokens; 6 x (40 + 60) = 600 wanted at once
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 200) for _ in range(40)] for _ in range(6)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [60] * 6
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert llm.engine.stats().num_preemptions > 0
    alone = llm.generate(prompts[3], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True), use_tqdm=False)
    assert alone[0].outputs[0].token_ids == outs[3].outputs[0].token_ids  # recompute changed nothing


def test_a_sequence_the_cache_can_never_hold_finishes_with_length(make_llm):
    """Only reachable with a context larger than the cache (the cap prevents it); the engine must still go on."""
    llm = make_llm(num_kv_blocks=4)  # 64 tokens
    engine = llm.engine
    engine.max_model_len = engine.scheduler.max_model_len = 1000  # break the cap on purpose
    engine.add_request("long", [3] * 20, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    done, failed = _steps(engine)
    assert not failed
    out = done["long"].outputs[0]
    assert out.finish_reason == "length" and 0 < len(out.token_ids) < 200
    assert len(out.token_ids) == 64 - 20 + 1  # the last sampled token needs no KV slot yet
    assert_no_leaks(engine)
    again = llm.generate([[3] * 20], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert again[0].outputs[0].token_ids == out.token_ids[:10]


def test_a_raising_logits_processor_ends_only_its_request(tiny_llm):
    engine = tiny_llm.engine

    def boom(_tokens, _logits):
        raise RuntimeError("processor bug")

    good = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine.add_request("good", [5, 6, 7, 8], good)
    engine.add_request("bad", [9, 10, 11], SamplingParams(max_tokens=12, logits_processors=[boom]))
    done, failed = _steps(engine)
    assert set(failed) == {"bad"} and "processor bug" in str(failed["bad"])
    assert len(done["good"].outputs[0].token_ids) == 12
    reference = tiny_llm.generate([[5, 6, 7, 8]], good, use_tqdm=False)[0].outputs[0].token_ids
    assert done["good"].outputs[0].token_ids == reference
    assert_no_leaks(engine)


def test_a_failing_forward_ends_the_step_s_requests_and_the_engine_goes_on(tiny_llm, monkeypatch):
    engine = tiny_llm.engine
    real = engine.runner.execute
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device lost")
        return real(batch)

    monkeypatch.setattr(engine.runner, "execute", flaky)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine.add_request("a", [5, 6, 7], params)
    engine.add_request("b", [8, 9, 10], params)
    done, failed = _steps(engine)
    assert set(failed) == {"a", "b"} and not done
    assert_no_leaks(engine)
    out = tiny_llm.generate([[5, 6, 7]], params, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 8


def test_block_keys_are_sha256_over_parent_tokens_and_extras():
    key = block_key(ROOT_KEY, [1, 2, 3])
    assert len(key) == 32 and key == block_key(ROOT_KEY, [1, 2, 3])
    others = {block_key(ROOT_KEY, [1, 2, 4]), block_key(key, [1, 2, 3]), block_key(ROOT_KEY, [1, 2, 3], b"salt"),
              block_key(ROOT_KEY, [1, 2]), block_key(ROOT_KEY, [1 << 40, 2, 3])}  # fmt: skip
    assert key not in others and len(others) == 5


def test_a_forced_key_collision_never_shares_blocks(make_llm):
    """Every block gets the same key: a token check on each hit must still refuse the other prompt's blocks."""
    reference = make_llm(enable_prefix_caching=False)
    llm = make_llm()
    engine = llm.engine
    colliding = BlockManager(engine.blocks.num_blocks, engine.blocks.block_size, True, key_fn=lambda *_: b"same")
    engine.blocks = engine.scheduler.blocks = colliding
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    first, second = [11] * 40, [12] * 40
    llm.generate([first], params, use_tqdm=False)
    out = llm.generate([second], params, use_tqdm=False)[0]
    assert colliding.prefix_hits == 0 and out.num_cached_tokens == 0
    assert out.outputs[0].token_ids == reference.generate([second], params, use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate([first + [13]], params, use_tqdm=False)[0]  # same tokens: the only key matches and is used
    assert again.num_cached_tokens > 0


def test_device_auto_is_the_cpu_and_a_gpu_is_only_logged(make_llm, monkeypatch, caplog):
    import torch

    from turbofan.config import EngineConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Test GPU")
    assert EngineConfig(device="auto").resolved_device == "cpu"
    assert EngineConfig(device="cuda").resolved_device == "cuda"
    with caplog.at_level(logging.INFO, logger="turbofan.assembly"):
        llm = make_llm(device="auto")
    assert llm.engine.runner.device == "cpu" and llm.engine.model_info().device == "cpu"
    assert any("Test GPU" in r.getMessage() and "--device cuda" in r.getMessage() for r in caplog.records)
