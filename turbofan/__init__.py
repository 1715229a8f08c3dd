"""turbofan: a local LLM inference server on PyTorch (OpenAI and Ollama APIs, paged KV cache, tiers).

Imports are lazy so that `turbofan list` and friends start without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams", "__version__"]

_LAZY = {
    "LLM": "turbofan.llm",
    "SamplingParams": "turbofan.engine.params",
    "RequestOutput": "turbofan.engine.outputs",
    "CompletionOutput": "turbofan.engine.outputs",
    "Logprob": "turbofan.engine.outputs",
}

if TYPE_CHECKING:
    from turbofan.engine.outputs import CompletionOutput, Logprob, RequestOutput
    from turbofan.engine.params import SamplingParams
    from turbofan.llm import LLM


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'turbofan' has no attribute {name!r}")
