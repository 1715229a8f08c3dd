"""EngineClient: all the server may know of an engine — a narrow, asynchronous interface.

The HTTP layer submits requests and reads their deltas, aborts, reads statistics and a description of the model,
and uses the tokenizer for prompts and chat templates. It never reaches the runner, the scheduler or the container:
AsyncEngine (an engine loop on its own thread) is the implementation; a test may substitute its own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from turbofan.engine.engine import EngineStats
    from turbofan.engine.outputs import RequestDelta
    from turbofan.engine.params import SamplingParams
    from turbofan.model.tokenizer import Tokenizer


@dataclass(frozen=True)
class ModelInfo:
    """What is served: names, limits and sizes, for /v1/models, /api/show, /api/ps and logs."""

    name: str  # the served name
    root: str  # what was asked for (a store name, a hub id or a path)
    path: str  # the HF-style directory the weights were read from
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    device: str
    dtype: str
    architecture: str
    quantization: str
    weights_bytes: int  # resident, every format together
    kv_cache_bytes: int
    weights_by_format: dict[str, int] = field(default_factory=dict)  # {"q4": ..., "q8": ..., "float32": ...}


class EngineClient(ABC):
    info: ModelInfo
    tokenizer: Tokenizer

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @property
    @abstractmethod
    def dead(self) -> BaseException | None:
        """The error that stopped the engine, or None while it is healthy."""

    @property
    @abstractmethod
    def num_in_flight(self) -> int: ...

    @abstractmethod
    def generate(self, prompt: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[RequestDelta]:
        """A request's deltas as they are produced; the last has finished=True. Leaving early aborts it.

        Errors in the request itself (a prompt too long, a full queue) are raised on the first iteration."""

    @abstractmethod
    def beam_search(self, prompt: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[RequestDelta]:
        """Beam search (params.use_beam_search) as a stream of one final delta holding the n best beams."""

    @abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abstractmethod
    def stats(self) -> EngineStats: ...

    # -- embeddings (every model: an encoder pools its states, a decoder returns its last token's) --------------------
    dimensions: int  # the width of the vectors embed() returns

    def tokenize(self, texts: list[str], truncate: bool) -> list[list[int]]:
        """Embedding inputs as token ids; longer than the model takes: cut (`truncate`) or a ValueError."""
        raise ValueError(f"{self.info.name} does not support embeddings")

    async def embed(self, batch: list[list[int]]) -> torch.Tensor:
        """One float32 vector per token list; a ValueError for an input the model cannot take."""
        raise ValueError(f"{self.info.name} does not support embeddings")

    # -- operator views (debug endpoints, metrics) ------------------------------------------------------------------
    def tiers(self) -> dict:
        return {"tiering": "off", "tiers": []}

    def profile_table(self) -> list[dict] | None:
        """Calls and time per component method, or None when profiling is off."""
        return None

    async def profile_torch(self, steps: int, trace_path: str | None = None) -> dict[str, Any]:
        raise NotImplementedError("this engine cannot record a torch profile")
