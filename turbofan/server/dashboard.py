"""The live dashboard's numbers: one typed snapshot a second, sent to the page as Server-Sent Events.

Everything comes from what the server already has — the EngineClient's `stats()` and `tiers()` and the metrics
module's recent latencies — so the dashboard shows the same engine the Prometheus scrape does. Rates (tokens/s,
prefix-cache hit rate) are differences between two consecutive snapshots, so each feed keeps its own previous one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
import psutil

from turbofan.server.metrics import RecentSamples
from turbofan.server.serving import ServerContext

INTERVAL_SECONDS = 1.0


@dataclass(frozen=True)
class ResidentModel:
    """A model held in memory. One today; the list is ready for a server that keeps several."""

    name: str
    architecture: str
    quantization: str
    dtype: str
    device: str
    max_model_len: int
    weights_bytes: int
    kv_cache_bytes: int
    weights_by_format: dict[str, int] = field(default_factory=dict)  # {"q4k": ..., "q6k": ..., "float32": ...}


@dataclass(frozen=True)
class Percentiles:
    p50: float | None  # seconds; None when nothing was observed in the window
    p95: float | None
    count: int

    @classmethod
    def of(cls, samples: RecentSamples) -> Percentiles:
        values = samples.values()
        if not values:
            return cls(None, None, 0)
        p50, p95 = np.percentile(np.asarray(values), [50, 95])
        return cls(float(p50), float(p95), len(values))


@dataclass(frozen=True)
class DashboardSnapshot:
    time: float  # unix seconds
    status: str  # "loading", "ok" or "error"
    requests_running: int = 0
    requests_waiting: int = 0
    generation_tokens_per_s: float = 0.0  # over the last interval
    prompt_tokens_per_s: float = 0.0
    generation_tokens_total: int = 0
    prompt_tokens_total: int = 0
    ttft: Percentiles = Percentiles(None, None, 0)  # over the last RecentSamples.window seconds
    itl: Percentiles = Percentiles(None, None, 0)
    kv_cache_usage: float = 0.0  # 0..1
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    prefix_cache_hit_rate: float | None = None  # over the last interval; None when nothing was looked up
    prefix_cache_hit_rate_total: float | None = None  # since the start
    preemptions_total: int = 0
    tiering: str = "off"
    tier_calls: dict[str, int] = field(default_factory=dict)  # tier ("0", "1") -> forward steps
    deopts: dict[str, int] = field(default_factory=dict)  # reason -> count
    resident_models: list[ResidentModel] = field(default_factory=list)
    process_rss_bytes: int = 0
    process_cpu_percent: float = 0.0  # of one core, over the last interval (200 = two cores busy)
    uptime_seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


class DashboardSampler:
    """Builds one snapshot per call; rates are against the previous call's counters."""

    def __init__(self, ctx: ServerContext):
        self.ctx = ctx
        self.process = psutil.Process(os.getpid())
        self._last: tuple[float, float, object] | None = None  # (monotonic time, cpu seconds, EngineStats)

    def _resident_models(self) -> list[ResidentModel]:
        client = self.ctx.client
        if client is None:
            return []
        info = client.info
        return [
            ResidentModel(
                name=self.ctx.model_name, architecture=info.architecture, quantization=info.quantization,
                dtype=info.dtype, device=info.device, max_model_len=info.max_model_len,
                weights_bytes=info.weights_bytes, kv_cache_bytes=info.kv_cache_bytes,
                weights_by_format=dict(info.weights_by_format),
            )
        ]  # fmt: skip

    def sample(self) -> DashboardSnapshot:
        now = time.monotonic()
        cpu = self.process.cpu_times()
        cpu_seconds = cpu.user + cpu.system
        common = dict(
            time=time.time(),
            status=self.ctx.state.status,
            process_rss_bytes=self.process.memory_info().rss,
            uptime_seconds=time.time() - self.ctx.started_at,
            ttft=Percentiles.of(self.ctx.metrics.recent_ttft),
            itl=Percentiles.of(self.ctx.metrics.recent_itl),
            resident_models=self._resident_models(),
        )
        client = self.ctx.client
        if client is None:
            self._last = (now, cpu_seconds, None)
            return DashboardSnapshot(**common)
        stats = client.stats()
        tiers = client.tiers()
        rates = dict(generation_tokens_per_s=0.0, prompt_tokens_per_s=0.0, process_cpu_percent=0.0)
        hit_rate = None
        if self._last is not None and self._last[2] is not None and now > self._last[0]:
            last_now, last_cpu, last = self._last
            dt = now - last_now
            rates = dict(
                generation_tokens_per_s=(stats.generation_tokens_total - last.generation_tokens_total) / dt,
                prompt_tokens_per_s=(stats.prompt_tokens_total - last.prompt_tokens_total) / dt,
                process_cpu_percent=100.0 * (cpu_seconds - last_cpu) / dt,
            )
            hit_rate = _ratio(stats.prefix_hits - last.prefix_hits, stats.prefix_queries - last.prefix_queries)
        self._last = (now, cpu_seconds, stats)
        return DashboardSnapshot(
            **common,
            **rates,
            requests_running=stats.num_running,
            requests_waiting=stats.num_waiting,
            generation_tokens_total=stats.generation_tokens_total,
            prompt_tokens_total=stats.prompt_tokens_total,
            kv_cache_usage=stats.kv_usage,
            kv_blocks_total=stats.num_blocks,
            kv_blocks_free=stats.num_free_blocks,
            prefix_cache_hit_rate=hit_rate,
            prefix_cache_hit_rate_total=_ratio(stats.prefix_hits, stats.prefix_queries),
            preemptions_total=stats.num_preemptions,
            tiering=tiers.get("tiering", "off"),
            tier_calls={str(k): int(v) for k, v in tiers.get("tier_calls", {}).items()},
            deopts={str(k): int(v) for k, v in tiers.get("deopts", {}).items()},
        )


async def event_stream(ctx: ServerContext, interval: float = INTERVAL_SECONDS) -> AsyncIterator[str]:
    """`data: <snapshot>` every `interval` seconds until the client goes away (Starlette then cancels us)."""
    sampler = DashboardSampler(ctx)
    yield f"retry: {int(interval * 3000)}\n\n"
    while True:
        yield f"data: {sampler.sample().to_json()}\n\n"
        await asyncio.sleep(interval)
