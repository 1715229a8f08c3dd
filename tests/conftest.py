import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(root / arch, arch) for arch in ARCHS}


# -- engine fixtures: every LLM a test builds is checked for leaked KV blocks when the test ends ------------------
def assert_no_leaks(engine) -> None:
    """Every KV block is free again and nothing is left queued, running or half-referenced."""
    stats = engine.stats()
    assert not engine.has_unfinished_requests(), f"requests left behind: {list(engine.requests)}"
    assert stats.num_running == 0 and stats.num_waiting == 0, stats
    assert stats.num_free_blocks == stats.num_blocks, (
        f"KV leak: {stats.num_blocks - stats.num_free_blocks} of {stats.num_blocks} blocks still allocated"
    )
    refs = engine.blocks.ref_counts
    assert all(r == 0 for r in refs), f"blocks with a non-zero reference count: {[i for i, r in enumerate(refs) if r]}"
    draft = getattr(getattr(engine, "speculator", None), "proposer", None)
    if hasattr(draft, "blocks"):  # a draft model's own KV cache (speculative decoding)
        assert not draft.seqs, f"the draft model still tracks sequences {list(draft.seqs)}"
        assert draft.blocks.num_free_blocks == draft.blocks.num_blocks, (
            f"draft KV leak: {draft.blocks.num_blocks - draft.blocks.num_free_blocks} blocks still allocated"
        )


def drive(engine, max_steps: int = 100_000) -> dict:
    """Step `engine` until it has no unfinished request; returns request id -> RequestOutput (folded deltas), in
    the order the requests finished."""
    from turbofan.engine import OutputBuilder

    builders: dict = {}
    done: dict = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for delta in engine.step():
            builder = builders.setdefault(delta.request_id, OutputBuilder()).add(delta)
            if delta.finished:
                done[delta.request_id] = builder.output()
    return done


@pytest.fixture
def make_llm(tiny_models):
    """make_llm(arch="llama", **EngineConfig fields) -> LLM on a tiny model; asserts no KV leak at teardown."""
    from turbofan import LLM

    created = []

    def factory(arch: str = "llama", **kwargs):
        kwargs.setdefault("num_kv_blocks", 256)  # the default 1 GiB budget is pointless for a 3-layer toy
        llm = LLM(str(tiny_models[arch]), **kwargs)
        created.append(llm)
        return llm

    yield factory
    for llm in created:
        assert_no_leaks(llm.engine)


@pytest.fixture
def tiny_llm(make_llm):
    """A default LLM on the tiny Llama (block size 16, 256 blocks, prefix caching on)."""
    return make_llm("llama")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core box OpenMP spinning makes every step
    10-100x slower; TURBOFAN_TEST_THREADS overrides."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("TURBOFAN_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _kernels_built():
    """Build the C++ kernels once, before any test, so the servers and CLIs that tests start as subprocesses find
    them cached instead of compiling (a minute or more on 2 busy cores) inside their start-up timeouts."""
    from turbofan import kernels

    kernels.available()


@pytest.fixture(scope="session")
def tmp_root(tmp_path_factory) -> Path:
    """One folder for the shared test server (its chain model and model store), whichever module starts it."""
    return tmp_path_factory.mktemp("server")


def model_in_store(name: str) -> bool:
    """Whether `name` is already in the model store TURBOFAN_MODELS names: a check, never a download (the real-model
    tests skip without it)."""
    store = os.environ.get("TURBOFAN_MODELS")
    if not store:
        return False
    from turbofan.store import ModelStore

    try:
        ModelStore(store).resolve(name, pull_missing=False)
        return True
    except Exception:
        return False
