"""The composition root: which components the engine is made of and how they wire, in one place.

Everything is declared in a Container (Spring's three-level cache, turbofan/container.py). The scheduler and the
block manager refer to each other's decisions and are wired by property injection, so the container resolves
the cycle through an early reference instead of ad-hoc setters. Plugins (entry point group `turbofan.plugins`)
receive the container before anything is built and may register components or post-processors.
"""

from __future__ import annotations

import logging
import time
from importlib.metadata import entry_points
from pathlib import Path

from turbofan.config import EngineConfig
from turbofan.container import Container
from turbofan.engine.block_manager import BlockManager
from turbofan.engine.detokenizer import Detokenizer
from turbofan.engine.engine import Engine, default_max_model_len
from turbofan.engine.input_batch import InputBatch
from turbofan.engine.output_processor import OutputProcessor
from turbofan.engine.sampler import Sampler
from turbofan.engine.scheduler import Scheduler
from turbofan.engine.speculative import SpeculativeConfig, Speculator
from turbofan.model.runner import ModelRunner
from turbofan.model.tokenizer import Tokenizer

log = logging.getLogger("turbofan.assembly")
PLUGIN_GROUP = "turbofan.plugins"


def resolve_model_path(config: EngineConfig) -> tuple[Path, str]:
    """A local HF directory is used in place; anything else goes through the model store."""
    local = Path(config.model).expanduser()
    if local.is_dir():
        return local, local.name
    from turbofan.store import ModelStore

    resolved = ModelStore(config.models_dir).resolve(config.model)
    return Path(resolved.path), resolved.name


def compile_cache_dir(config: EngineConfig) -> Path:
    """Inductor's code cache under the model store, one directory per CPU capability.

    Inductor's FX-graph cache key leaves out the vector ISA (ATEN_CPU_CAPABILITY), yet a hit recompiles the
    cached C++ for the ISA of the process: AVX-512 source built for AVX2 skips half of each vector (wrong tokens),
    AVX2 source built for AVX-512 writes past its buffers (heap corruption). Found 2026-12-03 running the compiled
    tier with ATEN_CPU_CAPABILITY=avx2 and then without it on one Zen 4 host.
    """
    import os

    import torch

    root = config.models_dir or os.environ.get("TURBOFAN_MODELS") or Path.home() / ".turbofan" / "models"
    return Path(root) / ".compile-cache" / torch.backends.cpu.get_cpu_capability().lower()


def memory_preflight(config: EngineConfig, model_path: Path) -> None:
    """Refuse a model that cannot fit before loading any of it, with the numbers: its weights as they will be
    served, its KV cache and a runtime allowance (model/footprint.py) against the memory available now."""
    if config.resolved_device != "cpu":
        return
    import psutil

    from turbofan.model.footprint import estimate

    need = estimate(model_path, config)
    available = psutil.virtual_memory().available
    gib = 1 << 30
    log.info("memory preflight", extra={"model": str(model_path.name), "need_gib": round(need.total / gib, 3),
                                        "available_gib": round(available / gib, 3), "parts": need.describe()})
    if need.total > available:
        raise MemoryError(
            f"{model_path.name} needs {need.total / gib:.2f} GiB of memory ({need.describe()}) but "
            f"{available / gib:.2f} GiB is available: free memory, or use a smaller KV cache (--kv-cache-memory), "
            "a smaller model or a lower-bit quantization"
        )


def _runner(config: EngineConfig, model_path: Path) -> ModelRunner:
    memory_preflight(config, model_path)
    if config.device == "auto":
        import torch

        if torch.cuda.is_available():
            log.info("a CUDA GPU is present (%s); --device auto serves on the CPU, pass --device cuda to use it",
                     torch.cuda.get_device_name(0))  # fmt: skip
    runner_class = ModelRunner
    if config.tensor_parallel_size > 1:
        from functools import partial

        from turbofan.distributed.tp_runner import TensorParallelRunner

        runner_class = partial(TensorParallelRunner, tensor_parallel_size=config.tensor_parallel_size)
    runner = runner_class(
        model_path,
        dtype=config.torch_dtype,
        device=config.resolved_device,
        block_size=config.block_size,
        num_blocks=config.num_kv_blocks,
        kv_cache_bytes=config.kv_cache_bytes,
        quantization=config.quantization,
        kv_cache_dtype=config.kv_cache_dtype,
    )
    if config.tiering == "on":
        from turbofan.model.tiering import TieredForward

        runner.forward_fn = TieredForward(runner, config.tier_threshold, compile_cache_dir(config))
    return runner


def _block_manager(config: EngineConfig, runner: ModelRunner) -> BlockManager:
    return BlockManager(runner.num_blocks, config.block_size, config.enable_prefix_caching)


def _eos_token_ids(tokenizer: Tokenizer, runner: ModelRunner) -> list[int]:
    return sorted(set(tokenizer.eos_token_ids) | set(runner.args.eos_token_ids))


def _scheduler(config: EngineConfig, detokenizer: Detokenizer, eos: list[int], max_model_len: int) -> Scheduler:
    return Scheduler(config.max_num_seqs, config.max_num_batched_tokens, detokenizer, eos, max_model_len)


def _sampler(eos: list[int], container: Container) -> Sampler:
    processors = [container.get(n) for n in container.names() if n.startswith("logits_processor.")]
    return Sampler(eos, processors)


def _input_batch(config: EngineConfig, runner: ModelRunner, max_model_len: int) -> InputBatch:
    return InputBatch(runner.args.vocab_size, config.block_size, max_model_len, capacity=min(config.max_num_seqs, 64))


def _draft_config(config: EngineConfig, spec: SpeculativeConfig, num_kv_blocks: int | None) -> EngineConfig:
    """The draft's engine flags: the target's, on one device, without compiled tiers or profiling."""
    import dataclasses

    return dataclasses.replace(
        config, model=spec.model, served_model_name=None, speculative_config=None, num_kv_blocks=num_kv_blocks,
        tiering="off", tensor_parallel_size=1, profile=False,
    )  # fmt: skip


def _draft_quantization(config: EngineConfig, spec: SpeculativeConfig, draft_path: Path) -> str | None:
    """speculative_config's "quantization" when given. Otherwise a GGUF draft under the target's "auto" on the CPU is
    served int4_all: its rounding costs acceptance, never correctness (verification keeps the output the target's),
    and 4-bit everywhere, LM head included, is the fewest bytes a draft step reads (Qwen2.5-Coder-0.5B, 2 cores:
    22.9 -> 13.2 ms a step; acceptance against 1.5B's greedy output 0.87 -> 0.85). Else the target's mode."""
    if spec.quantization is not None:
        return spec.quantization
    from turbofan.store.manifest import read_manifest

    manifest = read_manifest(draft_path)
    if config.quantization == "auto" and config.resolved_device == "cpu" and manifest and manifest.format == "gguf":
        return "int4_all"
    return config.quantization


def check_draft_tokenizer(config: EngineConfig) -> None:
    """Refuse a draft model with another tokenizer before anything is built, so the ValueError reaches the caller
    as itself, like any other bad engine argument (the container would wrap it in a ComponentCreationError)."""
    from turbofan.engine.draft_model import check_same_tokenizer

    spec = SpeculativeConfig.parse(config.speculative_config)
    if spec is None or spec.method != "draft_model":
        return
    target_path, _ = resolve_model_path(config)
    draft_path, _ = resolve_model_path(_draft_config(config, spec, None))
    check_same_tokenizer(Tokenizer(target_path, config.chat_template), Tokenizer(draft_path), spec.model)


def _draft_proposer(config: EngineConfig, spec: SpeculativeConfig, runner: ModelRunner):
    """The draft model of draft-model speculation: its own ModelRunner (the target's flags but its own weight
    format, as many KV blocks as the target's, so every sequence the target holds fits). Its tokenizer was checked
    against the target's by check_draft_tokenizer."""
    import dataclasses

    from turbofan.engine.draft_model import DraftModelProposer

    draft_config = _draft_config(config, spec, runner.num_blocks)
    draft_path, draft_name = resolve_model_path(draft_config)
    draft_config = dataclasses.replace(draft_config, quantization=_draft_quantization(config, spec, draft_path))
    draft_runner = _runner(draft_config, draft_path)
    log.info(
        "draft model loaded",
        extra={"draft_model": draft_name, "path": str(draft_path), "load_seconds": round(draft_runner.load_seconds, 2),
               "weights": draft_runner.quantization, "kv_blocks": draft_runner.num_blocks},
    )  # fmt: skip
    return DraftModelProposer(draft_runner, runner.args.vocab_size, draft_name)


def _speculator(config: EngineConfig, max_model_len: int, runner: ModelRunner) -> Speculator | None:
    spec = SpeculativeConfig.parse(config.speculative_config)
    if spec is None:
        return None
    proposer = _draft_proposer(config, spec, runner) if spec.method == "draft_model" else None
    return Speculator(spec, max_model_len, proposer)


def declare(container: Container, config: EngineConfig) -> Container:
    model_path, model_name = resolve_model_path(config)
    container.register_instance("config", config)
    container.register_instance("model_path", model_path)
    container.register_instance("model_name", config.served_model_name or model_name)
    container.register("tokenizer", lambda path, cfg: Tokenizer(path, cfg.chat_template), args=["model_path", "config"])
    container.register("runner", _runner, args=["config", "model_path"])
    container.register("max_model_len", default_max_model_len, args=["config", "runner"])
    container.register("eos_token_ids", _eos_token_ids, args=["tokenizer", "runner"])
    container.register("block_manager", _block_manager, args=["config", "runner"])
    container.register("detokenizer", Detokenizer, args=["tokenizer"])
    container.register(
        "scheduler",
        _scheduler,
        args=["config", "detokenizer", "eos_token_ids", "max_model_len"],
        properties={"blocks": "block_manager"},
    )
    container.register("sampler", lambda eos: _sampler(eos, container), args=["eos_token_ids"])
    container.register("input_batch", _input_batch, args=["config", "runner", "max_model_len"])
    container.register("output_processor", OutputProcessor, args=["tokenizer"])
    container.register("speculator", _speculator, args=["config", "max_model_len", "runner"])
    container.register(
        "engine",
        Engine,
        args=["config", "tokenizer", "runner", "scheduler", "sampler", "input_batch", "output_processor",
              "model_name", "model_path", "speculator"],
    )  # fmt: skip
    return container


def load_plugins(container: Container, extra: list | None = None) -> None:
    """Entry points of group `turbofan.plugins` (and `extra` callables, for tests) receive the container."""
    plugins = [ep.load() for ep in entry_points(group=PLUGIN_GROUP)] + list(extra or [])
    for plugin in plugins:
        plugin(container)
        log.info("plugin loaded", extra={"plugin": getattr(plugin, "__name__", repr(plugin))})


def build_container(config: EngineConfig, plugins: list | None = None) -> Container:
    container = declare(Container(), config)
    if config.profile:
        from turbofan.profiling import Profiler, ProfilingPostProcessor

        profiler = Profiler()
        container.register_instance("profiler", profiler)
        container.add_post_processor(ProfilingPostProcessor(profiler))
    load_plugins(container, plugins)
    return container


def build_engine(config: EngineConfig, plugins: list | None = None) -> Engine:
    start = time.perf_counter()
    check_draft_tokenizer(config)
    container = build_container(config, plugins)
    engine: Engine = container.get("engine")
    engine.container = container
    engine.profiler = container.get("profiler") if "profiler" in container else None
    runner = engine.runner
    log.info(
        "engine ready",
        extra={
            "model": engine.model_name,
            "path": str(container.get("model_path")),
            "architecture": runner.args.architecture,
            "dtype": str(runner.dtype).removeprefix("torch."),
            "device": runner.device,
            "load_seconds": round(runner.load_seconds, 2),
            "total_seconds": round(time.perf_counter() - start, 2),
            "kv_blocks": runner.num_blocks,
            "block_size": runner.block_size,
            "kv_cache_gib": round(runner.kv_cache_bytes / (1 << 30), 3),
            "kv_cache_dtype": str(runner.kv_cache_dtype).removeprefix("torch."),
            "max_concurrent_tokens": runner.num_blocks * runner.block_size,
            "max_model_len": engine.max_model_len,
            "speculative": config.speculative_config,
        },
    )
    return engine
