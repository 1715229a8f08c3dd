"""SamplingParams: vLLM's names and semantics, validated at construction so bad input fails before it queues."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from turbofan.engine.constraints import StructuredOutput

# A logits processor sees the tokens generated so far and the row of logits, and returns the new row.
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


@dataclass
class SamplingParams:
    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    repeat_last_n: int = -1  # Ollama's window for repetition_penalty; -1 = the whole context, 0 = off
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    use_beam_search: bool = False
    length_penalty: float = 1.0
    # token id -> additive bias (OpenAI's logit_bias, clamped to [-100, 100]); applied as one batched op, after
    # penalties and before the logits processors
    logit_bias: dict[int, float] | None = None
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    # constrained decoding: the output must match this JSON schema / regex / choice / grammar (engine/constraints.py)
    structured: StructuredOutput | None = None
    # a reasoning model's end-of-thinking token (`</think>`): `structured` applies only to the tokens after it
    reasoning_end_token_id: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        if self.best_of is None:
            self.best_of = self.n
        if self.logit_bias:
            try:
                self.logit_bias = {int(k): max(-100.0, min(100.0, float(v))) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError):
                raise ValueError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}") from None
            if any(k < 0 for k in self.logit_bias):
                raise ValueError(f"logit_bias token ids must be non-negative, got {sorted(self.logit_bias)[:5]}")
        else:
            self.logit_bias = None
        self._validate()

    def _validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(msg)

        if not isinstance(self.n, int) or self.n < 1:
            bad(f"n must be at least 1, got {self.n}.")
        if self.best_of < self.n:
            bad(f"best_of must be greater than or equal to n, got n={self.n} and best_of={self.best_of}.")
        if self.temperature < 0:
            bad(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < -1:
            bad(f"top_k must be -1 (disable), or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            bad(f"min_p must be in [0, 1], got {self.min_p}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            bad(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad(f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}.")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 20:
                bad(f"{name} must be between 0 and 20, got {value}.")
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            bad(f"structured must be a StructuredOutput, got {type(self.structured).__name__}.")
        if self.structured is not None and self.use_beam_search:
            bad("structured output with beam search is not supported.")
        if self.use_beam_search and self.best_of < 2 and self.n < 2:
            bad("beam search needs a beam width (best_of or n) of at least 2.")
        if self.use_beam_search and self.beam_width > 10:  # each step asks for 2 x width logprobs, at most 20
            bad(f"best_of must be at most 10 with beam search (the beam width), got {self.beam_width}.")
        if self.seed is not None and not -(1 << 63) <= self.seed < 1 << 63:
            bad(f"seed must be a 64-bit integer (below 2**63), got {self.seed}.")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def beam_width(self) -> int:
        return max(self.best_of or 1, self.n)
