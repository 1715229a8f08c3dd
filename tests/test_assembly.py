"""The engine assembled through the container (issue 4): same tokens as hand wiring, the components in the
container, the profiling aspect, and plugins (a logits processor from an entry point).

Everything runs on the tiny random-weight Llama; greedy decoding with ignore_eos, so every run is a fixed
number of tokens and any difference in wiring shows up as different tokens.
"""

from __future__ import annotations

import json
import random
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import assert_no_leaks, drive

import turbofan.assembly as assembly
from turbofan import LLM, SamplingParams
from turbofan.config import EngineConfig
from turbofan.container import Container
from turbofan.engine.block_manager import BlockManager
from turbofan.engine.detokenizer import Detokenizer
from turbofan.engine.engine import Engine
from turbofan.engine.input_batch import InputBatch
from turbofan.engine.output_processor import OutputProcessor
from turbofan.engine.sampler import Sampler
from turbofan.engine.scheduler import Scheduler
from turbofan.model.runner import ModelRunner
from turbofan.model.tokenizer import Tokenizer
from turbofan.profiling import ProfiledProxy

MAX_TOKENS = 12
NUM_BLOCKS = 64
COMPONENTS = ("config", "model_path", "model_name", "tokenizer", "runner", "block_manager", "scheduler", "sampler",
              "detokenizer", "input_batch", "output_processor", "engine")  # fmt: skip


def _greedy(max_tokens: int = MAX_TOKENS, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def _run_engine(engine, prompts, make_params=_greedy) -> list[list[int]]:
    """Drive an Engine directly (no LLM wrapper): add every prompt, step until all finish."""
    ids = []
    for i, prompt in enumerate(prompts):
        engine.add_request(f"req-{i}", prompt, make_params())
        ids.append(f"req-{i}")
    done = drive(engine, 10_000)
    assert sorted(done) == sorted(ids), "every request must finish"
    return [list(done[i].outputs[0].token_ids) for i in ids]


@pytest.fixture(scope="module")
def tiny_dir(tiny_models) -> str:
    return str(tiny_models["llama"])


@pytest.fixture(scope="module")
def prompts(tiny_dir) -> list:
    vocab = json.loads((Path(tiny_dir) / "config.json").read_text())["vocab_size"]
    rng = random.Random(4)
    ids = [[rng.randrange(vocab) for _ in range(n)] for n in (1, 5, 17, 33)]
    return [*ids, "The quick brown fox"]  # one text prompt: the tokenizer component is in the path too


@pytest.fixture(scope="module")
def reference(tiny_dir, prompts) -> list[list[int]]:
    """`LLM(tiny_dir)`, the public entry point, greedy."""
    llm = LLM(tiny_dir, num_kv_blocks=NUM_BLOCKS)
    out = _tokens(llm.generate(prompts, _greedy(), use_tqdm=False))
    assert_no_leaks(llm.engine)
    assert all(len(t) == MAX_TOKENS for t in out)
    assert len({tuple(t) for t in out}) > 2, "the tiny model should not say the same thing to every prompt"
    return out


# -- the engine built through assembly.py ------------------------------------------------------------------------
def _hand_wired_engine(tiny_dir: str) -> Engine:
    """The engine wired by hand, without the container: what assembly.py must be equivalent to."""
    config = EngineConfig(model=tiny_dir, num_kv_blocks=NUM_BLOCKS, device="cpu", dtype="float32")
    runner = ModelRunner(tiny_dir, dtype=torch.float32, device="cpu", block_size=16, num_blocks=NUM_BLOCKS)
    tokenizer = Tokenizer(tiny_dir)
    eos = sorted(set(tokenizer.eos_token_ids) | set(runner.args.eos_token_ids))
    max_len = min(runner.args.max_position, 8192)
    scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens, Detokenizer(tokenizer), eos, max_len)
    scheduler.blocks = BlockManager(NUM_BLOCKS, 16, True)
    batch = InputBatch(runner.args.vocab_size, 16, max_len)
    return Engine(config, tokenizer, runner, scheduler, Sampler(eos), batch, OutputProcessor(tokenizer))


def test_built_engine_generates_same_tokens_as_llm_hand_wiring_and_a_second_build(
    tiny_dir, prompts, reference
):
    config = EngineConfig(model=tiny_dir, num_kv_blocks=NUM_BLOCKS)
    first = assembly.build_engine(config)
    second = assembly.build_engine(EngineConfig(model=tiny_dir, num_kv_blocks=NUM_BLOCKS))
    assert first is not second and first.runner is not second.runner and first.blocks is not second.blocks
    assert first.container is not second.container

    got_first = _run_engine(first, prompts)
    got_second = _run_engine(second, prompts)
    by_hand = _run_engine(_hand_wired_engine(tiny_dir), prompts)
    assert got_first == reference
    assert got_second == reference
    assert by_hand == reference
    for engine in (first, second):
        assert_no_leaks(engine)


def test_container_holds_the_components_and_resolves_the_scheduler_block_manager_reference(tiny_dir):
    engine = assembly.build_engine(EngineConfig(model=tiny_dir, num_kv_blocks=NUM_BLOCKS))
    c = engine.container
    assert isinstance(c, Container)
    finished = c.singleton_objects
    missing = [n for n in COMPONENTS if n not in finished]
    assert not missing, f"components not in the first-level cache: {missing}"
    assert dict(c.early_singleton_objects) == {} and dict(c.singleton_factories) == {}
    # The engine is made of exactly the container's singletons, and the container's get returns them again.
    assert c.get("engine") is engine
    assert engine.scheduler is c.get("scheduler")
    assert engine.runner is c.get("runner")
    assert engine.sampler is c.get("sampler")
    assert engine.tokenizer is c.get("tokenizer")
    assert engine.scheduler.detokenizer is c.get("detokenizer")
    assert engine.input_batch is c.get("input_batch")
    assert engine.output_processor is c.get("output_processor")
    assert engine.config is c.get("config")
    # The scheduler's block manager is property-injected: one object, shared with the engine.
    assert engine.scheduler.blocks is engine.blocks
    assert engine.blocks is c.get("block_manager")
    assert engine.blocks.num_blocks == engine.runner.num_blocks == NUM_BLOCKS
    assert engine.blocks.block_size == engine.runner.block_size == engine.config.block_size
    assert engine.blocks.enable_prefix_caching is engine.config.enable_prefix_caching is True
    # Plain objects without profiling, and no profiler registered.
    for name in ("engine", "scheduler", "runner", "sampler", "block_manager"):
        assert not isinstance(finished[name], ProfiledProxy), name
    assert "profiler" not in c and engine.profiler is None


def test_the_engine_does_not_know_the_assembly():
    """The one import cycle (engine -> assembly -> engine) is gone: the engine package never imports the
    composition root, and a server reaches an engine only through the EngineClient interface."""
    import ast

    root = Path(assembly.__file__).parent
    for folder in ("engine", "server"):
        for path in sorted((root / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    assert node.module != "turbofan.assembly", f"{path.name} imports the assembly"
    assert not hasattr(Engine, "from_config")


# -- the profiling aspect ------------------------------------------------------------------------------------------
def test_profile_counts_scheduler_runner_sampler_and_keeps_tokens(tiny_dir, prompts, reference):
    llm = LLM(tiny_dir, num_kv_blocks=NUM_BLOCKS, profile=True)
    engine = llm.engine
    c = engine.container
    for name in ("engine", "scheduler", "runner", "sampler", "block_manager"):
        assert isinstance(c.get(name), ProfiledProxy), f"{name} should be proxied with profile=True"
    assert isinstance(engine, ProfiledProxy)
    assert isinstance(engine.scheduler, ProfiledProxy) and isinstance(engine.runner, ProfiledProxy)
    assert isinstance(engine.sampler, ProfiledProxy)
    # One block manager proxy, everywhere (the early reference and the finished component are the same object).
    assert engine.scheduler.blocks is engine.blocks is c.get("block_manager")
    assert dict(c.early_singleton_objects) == {} and dict(c.singleton_factories) == {}

    before = {(r["component"], r["method"]): r["calls"] for r in engine.profiler.table()}
    out = _tokens(llm.generate(prompts, _greedy(), use_tqdm=False))
    assert out == reference, "profiling must not change the tokens"

    rows = {(r["component"], r["method"]): r for r in engine.profiler.table()}
    calls = {k: r["calls"] - before.get(k, 0) for k, r in rows.items()}
    for key in (("scheduler", "schedule"), ("runner", "execute"), ("sampler", "sample"), ("engine", "step")):
        assert calls.get(key, 0) > 0, f"{key} not counted: {sorted(rows)}"
        assert rows[key]["total_s"] >= 0
    # Every engine step schedules once; every step with work runs the model once.
    assert calls[("scheduler", "schedule")] == calls[("engine", "step")]
    assert calls[("runner", "execute")] == engine.steps_total
    assert MAX_TOKENS <= calls[("sampler", "sample")] <= calls[("runner", "execute")]
    assert "scheduler.schedule" in engine.profiler.render()
    assert_no_leaks(engine)


def test_profile_off_components_are_plain(tiny_dir):
    llm = LLM(tiny_dir, num_kv_blocks=NUM_BLOCKS, profile=False)
    engine = llm.engine
    assert type(engine) is Engine
    assert type(engine.scheduler) is Scheduler and type(engine.runner) is ModelRunner
    assert type(engine.sampler) is Sampler and type(engine.blocks) is BlockManager
    assert engine.profiler is None


# -- plugins -------------------------------------------------------------------------------------------------------
class BanToken:
    """An engine-wide logits processor: (output_token_ids, logits_row) -> logits_row, banning one token."""

    def __init__(self, token: int):
        self.token = token
        self.calls = 0

    def __call__(self, output_token_ids: list[int], logits_row: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        logits_row[self.token] = float("-inf")
        return logits_row


def make_ban_plugin(token: int, seen: list):
    def ban_plugin(container: Container) -> None:
        seen.append(container)
        container.register("logits_processor.ban", BanToken, args=["ban_token"])
        container.register_instance("ban_token", token)

    return ban_plugin


@pytest.fixture(scope="module")
def banned(tiny_dir, prompts, reference) -> dict:
    """The token greedy output produces first for the first prompt, and the runner-up the model gives there."""
    llm = LLM(tiny_dir, num_kv_blocks=NUM_BLOCKS)
    out = llm.generate(prompts[0], _greedy(logprobs=2), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == reference[0]
    first = out.token_ids[0]
    ranked = sorted(out.logprobs[0].items(), key=lambda kv: -kv[1].logprob)
    assert ranked[0][0] == first
    # What the same requests produce with that token banned per request (SamplingParams.logits_processors).
    expected = _tokens(llm.generate(prompts, _greedy(logits_processors=[BanToken(first)]), use_tqdm=False))
    assert_no_leaks(llm.engine)
    return {"token": first, "runner_up": ranked[1][0], "expected": expected}


def _check_banned_output(out: list[list[int]], banned: dict, reference: list[list[int]]) -> None:
    token = banned["token"]
    assert all(token not in t for t in out), f"banned token {token} still generated: {out}"
    assert out[0][0] == banned["runner_up"], "with its first choice banned, greedy must take the runner-up"
    assert out != reference
    assert out == banned["expected"], "an engine-wide ban must act exactly as the same ban on every request"


def test_plugin_logits_processor_changes_output_as_expected(tiny_dir, prompts, reference, banned):
    seen: list = []
    llm = LLM(tiny_dir, num_kv_blocks=NUM_BLOCKS, plugins=[make_ban_plugin(banned["token"], seen)])
    c = llm.engine.container
    assert seen == [c], "the plugin receives the engine's container"
    processor = c.get("logits_processor.ban")
    assert isinstance(processor, BanToken)
    assert processor in llm.engine.sampler.logits_processors
    out = _tokens(llm.generate(prompts, _greedy(), use_tqdm=False))
    _check_banned_output(out, banned, reference)
    assert processor.calls >= len(prompts) * MAX_TOKENS, "applied to every request at every sampling step"
    assert_no_leaks(llm.engine)


class FakeEntryPoint:
    """What importlib.metadata.entry_points returns, as far as load_plugins looks at it."""

    def __init__(self, name: str, plugin):
        self.name, self.value, self.group = name, f"tests:{name}", assembly.PLUGIN_GROUP
        self._plugin = plugin
        self.loads = 0

    def load(self):
        self.loads += 1
        return self._plugin


def test_plugins_are_loaded_from_entry_points(tiny_dir, prompts, reference, banned, monkeypatch):
    seen: list = []
    ep = FakeEntryPoint("ban", make_ban_plugin(banned["token"], seen))
    groups: list = []

    def fake_entry_points(*, group: str):
        groups.append(group)
        return [ep] if group == "turbofan.plugins" else []

    monkeypatch.setattr(assembly, "entry_points", fake_entry_points)
    llm = LLM(tiny_dir, num_kv_blocks=NUM_BLOCKS)  # no plugins= argument: only the entry point
    assert groups == ["turbofan.plugins"] and ep.loads == 1
    assert seen == [llm.engine.container]
    out = _tokens(llm.generate(prompts, _greedy(), use_tqdm=False))
    _check_banned_output(out, banned, reference)
    assert_no_leaks(llm.engine)

    # load_plugins on its own: entry points first, then the extra callables, each given the container.
    order: list = []
    ep2 = FakeEntryPoint("first", lambda c: order.append(("entry point", c)))
    monkeypatch.setattr(
        assembly, "entry_points", lambda *, group: [ep2] if group == assembly.PLUGIN_GROUP else []
    )
    container = Container()
    assembly.load_plugins(container, [lambda c: order.append(("extra", c))])
    assert order == [("entry point", container), ("extra", container)]


def test_plugin_from_an_installed_distribution(tiny_dir, prompts, tmp_path, monkeypatch, banned):
    """A real entry point: a dist-info on sys.path declaring group turbofan.plugins, found by importlib.metadata."""
    (tmp_path / "turbofan_ban_plugin.py").write_text(
        textwrap.dedent(
            f"""
            import torch

            CALLS = []

            def ban(output_token_ids, logits_row):
                logits_row[{banned["token"]}] = float("-inf")
                return logits_row

            def plugin(container):
                CALLS.append(container)
                container.register("logits_processor.ban_from_dist", lambda: ban)
            """
        )
    )
    info = tmp_path / "turbofan_ban_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: turbofan-ban-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[turbofan.plugins]\nban = turbofan_ban_plugin:plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "turbofan_ban_plugin", raising=False)

    llm = LLM(tiny_dir, num_kv_blocks=NUM_BLOCKS)
    import turbofan_ban_plugin

    assert [llm.engine.container] == turbofan_ban_plugin.CALLS
    assert "logits_processor.ban_from_dist" in llm.engine.container
    out = _tokens(llm.generate(prompts, _greedy(), use_tqdm=False))
    assert out == banned["expected"]
    assert_no_leaks(llm.engine)
