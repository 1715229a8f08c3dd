"""The engine: requests in, scheduled steps, sampled tokens, deltas out."""

from turbofan.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from turbofan.engine.client import EngineClient, ModelInfo
from turbofan.engine.engine import Engine, EngineStats
from turbofan.engine.outputs import (
    CompletionDelta,
    CompletionOutput,
    Logprob,
    OutputBuilder,
    RequestDelta,
    RequestMetrics,
    RequestOutput,
)
from turbofan.engine.params import SamplingParams

__all__ = [
    "AsyncEngine",
    "CompletionDelta",
    "CompletionOutput",
    "Engine",
    "EngineClient",
    "EngineDeadError",
    "EngineStats",
    "Logprob",
    "ModelInfo",
    "OutputBuilder",
    "QueueFullError",
    "RequestDelta",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
]
