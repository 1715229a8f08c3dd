"""What the engine returns: each step's new tokens and text as deltas, and vLLM's cumulative RequestOutput.

The engine emits every token, text piece and logprob entry once (a `RequestDelta` per request touched by a step);
a consumer that wants vLLM's cumulative shape (LLM.generate, a non-streaming HTTP answer) folds the deltas with an
`OutputBuilder`, which costs O(tokens) per request instead of a cumulative copy per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    extra: dict = field(default_factory=dict)


# -- deltas ---------------------------------------------------------------------------------------------------------
@dataclass
class CompletionDelta:
    """What one sequence of a request added since its previous delta."""

    index: int
    text: str = ""  # newly visible text (a stream never shows text a stop string will remove)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None  # one entry per new token, when the request asked
    cumulative_logprob: float | None = None  # the sequence's total so far
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def merge(self, later: CompletionDelta) -> None:
        """Fold a later delta of the same sequence into this one."""
        self.text += later.text
        self.token_ids.extend(later.token_ids)
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs
        if later.cumulative_logprob is not None:
            self.cumulative_logprob = later.cumulative_logprob
        if later.finish_reason is not None:
            self.finish_reason, self.stop_reason = later.finish_reason, later.stop_reason


@dataclass
class RequestDelta:
    """One step's news for one request: a CompletionDelta per sequence that changed.

    `prompt_token_ids` and `metrics` are the request's own (shared, not copied); `prompt_logprobs` come once, with
    the first delta after the prompt is computed.
    """

    request_id: str
    outputs: list[CompletionDelta]
    finished: bool
    prompt: str | None
    prompt_token_ids: list[int]
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    @property
    def num_new_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.outputs)

    def merge(self, later: RequestDelta) -> RequestDelta:
        """Fold a later delta of the same request into this one (a consumer that fell behind reads one)."""
        by_index = {c.index: c for c in self.outputs}
        for c in later.outputs:
            mine = by_index.get(c.index)
            if mine is None:
                self.outputs.append(c)
                by_index[c.index] = c
            else:
                mine.merge(c)
        self.finished = later.finished
        self.num_cached_tokens = later.num_cached_tokens
        if later.prompt_logprobs is not None:
            self.prompt_logprobs = later.prompt_logprobs
        return self


class OutputBuilder:
    """Folds a request's deltas into vLLM's cumulative RequestOutput (for whole answers, not streams)."""

    def __init__(self) -> None:
        self.first: RequestDelta | None = None
        self.last: RequestDelta | None = None
        self.prompt_logprobs = None
        self.tokens: dict[int, list[int]] = {}
        self.texts: dict[int, list[str]] = {}
        self.logprobs: dict[int, list[dict[int, Logprob]]] = {}
        self.cumulative: dict[int, float | None] = {}
        self.finish: dict[int, tuple[str | None, int | str | None]] = {}

    @property
    def finished(self) -> bool:
        return self.last is not None and self.last.finished

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens.values())

    def add(self, delta: RequestDelta) -> OutputBuilder:
        self.first = self.first or delta
        self.last = delta
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        for c in delta.outputs:
            self.tokens.setdefault(c.index, []).extend(c.token_ids)
            if c.text:
                self.texts.setdefault(c.index, []).append(c.text)
            if c.logprobs is not None:
                self.logprobs.setdefault(c.index, []).extend(c.logprobs)
            if c.cumulative_logprob is not None:
                self.cumulative[c.index] = c.cumulative_logprob
            if c.finish_reason is not None:
                self.finish[c.index] = (c.finish_reason, c.stop_reason)
        return self

    def output(self) -> RequestOutput:
        assert self.last is not None, "no delta yet"
        last = self.last
        indices = sorted(set(self.tokens) | set(self.finish))
        outputs = []
        for i in indices:
            reason, stop = self.finish.get(i, (None, None))
            outputs.append(
                CompletionOutput(
                    index=i,
                    text="".join(self.texts.get(i, ())),
                    token_ids=self.tokens.get(i, []),
                    cumulative_logprob=self.cumulative.get(i),
                    logprobs=self.logprobs.get(i),
                    finish_reason=reason,
                    stop_reason=stop,
                )
            )
        return RequestOutput(
            request_id=last.request_id,
            prompt=last.prompt,
            prompt_token_ids=last.prompt_token_ids,
            prompt_logprobs=self.prompt_logprobs,
            outputs=outputs,
            finished=last.finished,
            metrics=last.metrics,
            num_cached_tokens=last.num_cached_tokens,
        )
