"""The engine: requests in, scheduled steps, sampled tokens, outputs out."""

from turbofan.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from turbofan.engine.engine import Engine, EngineStats
from turbofan.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from turbofan.engine.params import SamplingParams

__all__ = [
    "AsyncEngine",
    "CompletionOutput",
    "Engine",
    "EngineDeadError",
    "EngineStats",
    "Logprob",
    "QueueFullError",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
]
