"""Prometheus metrics under vLLM's names, so existing vLLM dashboards work against turbofan unchanged.

Engine-wide numbers (queues, KV usage, token and prefix counters) are read from the client's `stats()` at scrape
time by a custom collector; per-request numbers (latency histograms, finish reasons) are recorded by the
server when a request ends. Each app gets its own CollectorRegistry, so tests can build several apps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from turbofan.engine import RequestOutput

log = logging.getLogger("turbofan.server")
disable_created_metrics()  # as vLLM does: no `_created` series next to every counter and histogram

TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0]  # fmt: skip
LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0]  # fmt: skip
TOKEN_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]


class RecentSamples:
    """Raw observations of the last `window` seconds (at most the newest `maxlen`), for live percentiles: the
    dashboard's TTFT and ITL p50/p95. Prometheus buckets are too coarse for that, and a scraper computes its own
    quantiles from them anyway. Bounded so that a snapshot costs well under a millisecond at any load."""

    def __init__(self, window: float = 60.0, maxlen: int = 4096):
        self.window = window
        self._times: deque[float] = deque(maxlen=maxlen)
        self._values: deque[float] = deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def add(self, value: float, count: int = 1) -> None:
        now = time.monotonic()
        with self._lock:
            for _ in range(count):
                self._times.append(now)
                self._values.append(value)

    def values(self) -> list[float]:
        cutoff = time.monotonic() - self.window
        with self._lock:
            while self._times and self._times[0] < cutoff:
                self._times.popleft()
                self._values.popleft()
            return list(self._values)


class EngineCollector(Collector):
    """Reads the engine's counters and gauges at scrape time (nothing to keep in sync)."""

    def __init__(self, manager, model_name):
        self.manager = manager
        self.model_name = model_name

    def collect(self) -> Iterable[Metric]:
        """Every metric carries `model_name`: one series per loaded model (the primary by its served name)."""
        primary = self.model_name()
        loaded = GaugeMetricFamily("turbofan:model_loaded", "1 once the model has loaded", labels=["model_name"])
        resident = {primary if m.name == self.manager.primary.key else m.name: m for m in self.manager.resident()}
        if primary not in resident:
            loaded.add_metric([primary], 0.0)
        for name, m in resident.items():
            loaded.add_metric([name], 1.0 if m.status == "ready" else 0.0)
        yield loaded
        size = GaugeMetricFamily("turbofan:model_memory_bytes", "Memory a loaded model holds.", labels=["model_name"])
        for name, m in resident.items():
            size.add_metric([name], m.size_bytes)
        yield size
        families: dict[str, Metric] = {}
        for key, client in self.manager.clients():
            name = primary if key == self.manager.primary.key else key
            try:
                s = client.stats()
            except Exception:  # a scrape must never fail because the engine thread was mid-step
                log.debug("engine stats unavailable for this scrape", exc_info=True)
                continue
            for metric in self._engine(client, name, s):
                family = families.setdefault(metric.name, metric)
                if family is not metric:
                    family.samples.extend(metric.samples)
        yield from families.values()

    def _engine(self, client, name: str, s) -> Iterable[Metric]:

        def gauge(metric: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(metric, doc, labels=["model_name"])
            g.add_metric([name], value)
            return g

        def counter(metric: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(metric, doc, labels=["model_name"])
            c.add_metric([name], value)
            return c

        yield gauge("vllm:num_requests_running", "Number of sequences in the running batch.", s.num_running)
        yield gauge("vllm:num_requests_waiting", "Number of sequences waiting to be scheduled.", s.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_usage)
        yield gauge("vllm:gpu_cache_usage_perc", "KV-cache usage (old name). 1 means 100 percent.", s.kv_usage)
        yield gauge("turbofan:kv_cache_blocks", "KV-cache blocks in total.", s.num_blocks)
        yield gauge("turbofan:kv_cache_free_blocks", "KV-cache blocks free (cached prefixes included).", s.num_free_blocks)
        yield counter("vllm:prefix_cache_queries", "Prefix cache queries, in tokens.", s.prefix_queries)
        yield counter("vllm:prefix_cache_hits", "Prefix cache hits, in tokens.", s.prefix_hits)
        yield counter("vllm:num_preemptions", "Cumulative number of preemptions.", s.num_preemptions)
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", s.prompt_tokens_total)
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.", s.generation_tokens_total)
        steps = getattr(s, "steps_total", None)
        if steps is not None:
            yield counter("turbofan:engine_steps", "Engine steps run.", steps)
        yield from self._tiers(client, name)
        spec = getattr(s, "speculative", None)
        if spec is not None:
            yield from self._speculative(spec, gauge, counter)

    @staticmethod
    def _speculative(spec: dict, gauge, counter) -> Iterable[Metric]:
        """vLLM's spec-decode counters, the acceptance rate, and turbofan's deopts."""
        yield counter("vllm:spec_decode_num_drafts", "Verifications of a sequence's drafts.", spec["num_drafts"])
        yield counter("vllm:spec_decode_num_draft_tokens", "Draft tokens proposed.", spec["num_draft_tokens"])
        yield counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.", spec["num_accepted_tokens"])
        rate = spec["acceptance_rate"]
        yield gauge("vllm:spec_decode_draft_acceptance_rate", "Accepted / proposed draft tokens.", rate or 0.0)
        yield counter("turbofan:spec_decode_deopts", "Sequences that stopped speculating for a while.", spec["num_deopts"])
        yield counter(
            "turbofan:spec_decode_gated_steps", "Decode steps the cost model ran without drafts.", spec["num_gated_steps"]
        )

    @staticmethod
    def _tiers(client, name: str) -> Iterable[Metric]:
        tiers = client.tiers()
        if tiers.get("tiering") != "on":
            return
        calls = CounterMetricFamily("turbofan:tier_calls", "Forward steps run per tier.", labels=["model_name", "tier"])
        for tier in ("0", "1"):
            calls.add_metric([name, tier], tiers["tier_calls"].get(tier, 0))
        yield calls
        deopts = CounterMetricFamily("turbofan:deopts", "Steps that fell back to tier 0.", labels=["model_name", "reason"])
        for reason, count in tiers["deopts"].items():
            deopts.add_metric([name, reason], count)
        yield deopts
        seconds = CounterMetricFamily("turbofan:compile_seconds", "Seconds spent compiling hot shapes.", labels=["model_name"])
        seconds.add_metric([name], tiers["compile_seconds_total"])
        yield seconds


class ServerMetrics:
    def __init__(self, manager, model_name):
        """`model_name` is a callable: the primary model's name is known for sure only once it has loaded."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.registry.register(EngineCollector(manager, model_name))
        reg = self.registry
        labels = ["model_name"]
        self.request_success = Counter(
            "vllm:request_success", "Count of finished requests by finish reason.", labels + ["finished_reason"],
            registry=reg,
        )  # fmt: skip
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token in seconds.", labels, buckets=TTFT_BUCKETS,
            registry=reg,
        )  # fmt: skip
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds", "Time per output token in seconds.", labels,
            buckets=TPOT_BUCKETS, registry=reg,
        )  # fmt: skip
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds", "Inter-token latency in seconds.", labels, buckets=TPOT_BUCKETS,
            registry=reg,
        )  # fmt: skip
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "End-to-end request latency in seconds.", labels,
            buckets=LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self.queue = Histogram(
            "vllm:request_queue_time_seconds", "Time spent waiting in the queue, in seconds.", labels,
            buckets=LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self.prefill = Histogram(
            "vllm:request_prefill_time_seconds", "Time spent in prefill, in seconds.", labels,
            buckets=LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self.decode = Histogram(
            "vllm:request_decode_time_seconds", "Time spent in decode, in seconds.", labels,
            buckets=LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self.prompt_tokens = Histogram(
            "vllm:request_prompt_tokens", "Prompt tokens per request.", labels, buckets=TOKEN_BUCKETS, registry=reg
        )
        self.generation_tokens = Histogram(
            "vllm:request_generation_tokens", "Generated tokens per request.", labels, buckets=TOKEN_BUCKETS,
            registry=reg,
        )  # fmt: skip
        self.recent_ttft = RecentSamples()
        self.recent_itl = RecentSamples()
        self.rejected = Counter(
            "turbofan:requests_rejected", "Requests refused before they ran, by reason.", labels + ["reason"],
            registry=reg,
        )  # fmt: skip

    def observe_itl(self, seconds: float, tokens: int, model: str | None = None) -> None:
        """`tokens` arrived together after `seconds`: each counts as seconds/tokens apart."""
        if tokens <= 0:
            return
        h = self.itl.labels(model or self.model_name())
        for _ in range(tokens):
            h.observe(seconds / tokens)
        self.recent_itl.add(seconds / tokens, tokens)

    def observe_finished(self, out: RequestOutput, model: str | None = None) -> None:
        name = model or self.model_name()
        m = out.metrics
        for c in out.outputs:
            self.request_success.labels(name, c.finish_reason or "abort").inc()
        self.prompt_tokens.labels(name).observe(len(out.prompt_token_ids))
        generated = sum(len(c.token_ids) for c in out.outputs)
        self.generation_tokens.labels(name).observe(generated)
        if m.first_scheduled_time is not None:
            self.queue.labels(name).observe(max(0.0, m.first_scheduled_time - m.arrival_time))
        if m.first_token_time is not None:
            self.ttft.labels(name).observe(max(0.0, m.first_token_time - m.arrival_time))
            self.recent_ttft.add(max(0.0, m.first_token_time - m.arrival_time))
            if m.first_scheduled_time is not None:
                self.prefill.labels(name).observe(max(0.0, m.first_token_time - m.first_scheduled_time))
        if m.finished_time is not None:
            self.e2e.labels(name).observe(max(0.0, m.finished_time - m.arrival_time))
            if m.first_token_time is not None:
                decode = max(0.0, m.finished_time - m.first_token_time)
                self.decode.labels(name).observe(decode)
                longest = max((len(c.token_ids) for c in out.outputs), default=0)
                if longest > 1:
                    self.tpot.labels(name).observe(decode / (longest - 1))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
