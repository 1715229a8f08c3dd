"""turbofan: a local LLM inference server on PyTorch (OpenAI and Ollama APIs, paged KV cache, tiers)."""

from turbofan.engine.outputs import CompletionOutput, Logprob, RequestOutput
from turbofan.engine.params import SamplingParams
from turbofan.llm import LLM

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams", "__version__"]
