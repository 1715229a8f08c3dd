"""Embeddings per second against sentence-transformers, and model load/unload times through the ModelManager.

    python -m turbofan.bench.embeddings [--model all-minilm] [--texts 256] [--rounds 5] [--chat smollm2:135m,gemma3:270m]

Both sides embed the same short texts in one process, taking turns, and the medians are compared: turbofan's
EmbeddingEngine as served (its own thread, started for its turn and stopped after it), its `encode` on a fresh
thread per turn (the dtype it picks: bfloat16 layers on CPUs with native bf16, see engine/embedding.py) and the
float32 layers forced, against `SentenceTransformer.encode` (batch_size 32, its default) on the very same model
directory, on a fresh thread per turn too. Then each model is loaded through the ModelManager (the path a request
takes), unloaded, and loaded again: seconds for each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

WORDS = ("model", "server", "cache", "token", "river", "mountain", "coffee", "engine", "battery", "garden",
         "planet", "music", "window", "language", "market", "winter")  # fmt: skip


def short_texts(n: int) -> list[str]:
    """Deterministic short sentences of 4 to 15 words."""
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(4 + i % 12)) + "." for i in range(n)]


def alone(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), seconds) with fn run on a fresh thread: the OpenMP team it makes ends with it, so no turn leaves a
    team behind to throttle the next (see engine/embedding.py) and every side runs as it would alone."""
    box: dict = {}

    def run() -> None:
        t0 = time.perf_counter()
        box["out"] = fn()
        box["s"] = time.perf_counter() - t0

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return box["out"], box["s"]


async def embeddings_per_second(path: Path, texts: list[str], rounds: int) -> dict:
    from sentence_transformers import SentenceTransformer

    from turbofan.engine.embedding import EmbeddingEngine

    def loaded(engine: EmbeddingEngine) -> EmbeddingEngine:
        engine.load()
        return engine

    st, _ = alone(lambda: SentenceTransformer(str(path), device="cpu"))
    local, _ = alone(lambda: loaded(EmbeddingEngine(path, "bench-direct")))  # the dtype it picks
    f32, _ = alone(lambda: loaded(EmbeddingEngine(path, "bench-float32", dtype="float32")))
    served_s, direct_s, f32_s, theirs_s = [], [], [], []

    def direct(engine: EmbeddingEngine = local) -> torch.Tensor:  # (every side's time includes tokenizing)
        return engine.encode(engine.tokenize(texts, truncate=True))

    def theirs() -> torch.Tensor:
        return st.encode(texts, batch_size=32, convert_to_tensor=True)

    alone(direct), alone(lambda: direct(f32)), alone(theirs)  # warm up
    for _ in range(rounds):  # taking turns, each alone on the CPU
        engine = EmbeddingEngine(path, "bench")  # as the server runs it: the engine's own thread
        await engine.start()
        await engine.embed(engine.tokenize(texts[:8], truncate=True))  # warm up
        t0 = time.perf_counter()
        a = await engine.embed(engine.tokenize(texts, truncate=True))
        served_s.append(time.perf_counter() - t0)
        await engine.stop()
        direct_s.append(alone(direct)[1])
        c, seconds = alone(lambda: direct(f32))
        f32_s.append(seconds)
        b, seconds = alone(theirs)
        theirs_s.append(seconds)
    cosine = torch.nn.functional.cosine_similarity(a, b.float()).min().item()
    cosine_f32 = torch.nn.functional.cosine_similarity(c, b.float()).min().item()
    s, d, f, t = (statistics.median(x) for x in (served_s, direct_s, f32_s, theirs_s))
    n = len(texts)
    return {"texts": n, "tokens": sum(len(r) for r in local.tokenize(texts, truncate=True)), "dtype": local.info.dtype,
            "served_per_s": round(n / s, 1), "direct_per_s": round(n / d, 1), "float32_per_s": round(n / f, 1),
            "sentence_transformers_per_s": round(n / t, 1), "served_ratio": round(t / s, 2),
            "direct_ratio": round(t / d, 2), "float32_ratio": round(t / f, 2), "min_cosine": round(cosine, 6),
            "min_cosine_float32": round(cosine_f32, 6), "rounds": rounds}  # fmt: skip


async def load_unload(names: list[str]) -> list[dict]:
    """Each model: load (first request), unload, load again, through the manager with the serve defaults."""
    from turbofan.cli import engine_factory
    from turbofan.config import EngineConfig
    from turbofan.server.manager import ModelManager
    from turbofan.server.settings import ServerSettings
    from turbofan.store import ModelStore

    store = ModelStore(os.environ.get("TURBOFAN_MODELS"))
    config = EngineConfig(max_model_len=2048, kv_cache_memory="256MiB", log_stats_interval=0)
    manager = ModelManager(None, ServerSettings(stats_interval=0, max_loaded_models=4), engine_factory(config),
                           store_factory=lambda: store)  # fmt: skip
    rows = []
    for name in names:
        row = {"model": name}
        for label in ("load_s", "unload_s", "reload_s"):
            if label == "unload_s":
                slot = manager.find(name)
                t0 = time.perf_counter()
                await manager.unload(slot)
            else:
                t0 = time.perf_counter()
                slot = await manager.acquire(name, need=None)
                manager.release(slot)
            row[label] = round(time.perf_counter() - t0, 2)
        row["size_gib"] = round(slot.size / (1 << 30), 3)
        await manager.unload(slot)
        rows.append(row)
    return rows


def cpu_description() -> dict:
    """What decides the kernels: torch's capability, the flags that matter here, the threads."""
    from turbofan.engine.embedding import native_bf16

    flags: set[str] = set()
    with contextlib.suppress(OSError):
        flags = set(Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split())
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_bf16")
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "flags": [f for f in wanted if f in flags],
            "native_bf16": native_bf16(), "torch_threads": torch.get_num_threads()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-minilm")
    p.add_argument("--texts", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--chat", default="smollm2:135m,gemma3:270m", help="chat models to time loading ('' for none)"
    )
    args = p.parse_args(argv)
    from turbofan.store import ModelStore

    path = Path(ModelStore(os.environ.get("TURBOFAN_MODELS")).resolve(args.model, progress=False).path)
    print(json.dumps(cpu_description()))
    print(json.dumps(asyncio.run(embeddings_per_second(path, short_texts(args.texts), args.rounds))))
    names = [args.model] + [n for n in args.chat.split(",") if n]
    for row in asyncio.run(load_unload(names)):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
