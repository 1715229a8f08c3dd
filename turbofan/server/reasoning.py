"""Reasoning models (`--reasoning-parser`, vLLM's names): the thinking before `</think>` is kept apart from the answer.

A reasoning model writes `<think>…</think>` before its answer (DeepSeek-R1's template opens the block in the
prompt; Qwen3's model opens it itself). With a parser:

- the text before the end tag goes to OpenAI's `reasoning_content` (vLLM's field; streamed as `reasoning_content`
  deltas) and to Ollama's `thinking`; a leading start tag is dropped; the answer (content, tool calls) is the text
  after the end tag;
- a structured-output or tool constraint applies only after the end tag: the engine starts the grammar matcher
  once the sequence has produced the end token (SamplingParams.reasoning_end_token_id), so the model thinks freely
  and then answers in the schema;
- a request that turns thinking off (OpenAI `chat_template_kwargs: {"enable_thinking": false}`, Ollama
  `think: false`) is rendered with `enable_thinking=False` and its output is all answer, constrained from the
  first token. Ollama's `think` left out means thinking on, as for a request that asks for it.

Both parsers split the same way (deepseek_r1 and qwen3 differ in vLLM only in whether a missing start tag means
the model is thinking; here the request decides that): text before `</think>` is reasoning, and a thinking answer
cut before `</think>` (max_tokens) is reasoning only. Without a parser, `think: true` is refused and
`reasoning_content` never appears.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from turbofan.engine.outputs import CompletionDelta
from turbofan.server.errors import bad_request

PARSERS = ("deepseek_r1", "qwen3")


@dataclass(frozen=True)
class ReasoningParser:
    name: str
    start: str = "<think>"
    end: str = "</think>"

    @classmethod
    def named(cls, name: str | None) -> ReasoningParser | None:
        if name is None:
            return None
        if name not in PARSERS:
            raise ValueError(f"unknown reasoning parser {name!r}; known: {', '.join(PARSERS)}")
        return cls(name)

    def end_token_id(self, tokenizer) -> int:
        """The id of the end tag, which must be one token of the model's vocabulary (the engine watches for it)."""
        ids = tokenizer.encode(self.end, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(
                f"--reasoning-parser {self.name}: {self.end!r} is not one token of this model's vocabulary "
                f"(it encodes to {ids}); this model does not reason with {self.start}…{self.end}"
            )
        return ids[0]

    def split(self, text: str) -> tuple[str, str]:
        """(reasoning, answer) of a whole output of a thinking request."""
        stream = self.stream()
        reasoning, answer = stream.feed(text)
        more_reasoning, more_answer = stream.finish()
        return reasoning + more_reasoning, answer + more_answer

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self)


class ReasoningStream:
    """Splits a thinking output as it arrives: `feed` returns the (reasoning, answer) text that is certain so far.
    A piece that might be the start of a tag is held back until the next text tells."""

    def __init__(self, parser: ReasoningParser):
        self.parser = parser
        self.thinking = True
        self._held = ""
        self._at_start = True  # a start tag is dropped only as the very first text
        self._answered = False  # the newlines between </think> and the answer are dropped

    def feed(self, text: str) -> tuple[str, str]:
        if not self.thinking:
            return "", self._answer(text)
        buf = self._held + text
        self._held = ""
        if self._at_start:
            stripped = buf.lstrip()
            start = self.parser.start
            if start.startswith(stripped) and stripped != start:  # maybe the start tag, not complete yet
                self._held = buf
                return "", ""
            self._at_start = False
            if stripped.startswith(start):
                buf = stripped[len(start) :]
        end = self.parser.end
        i = buf.find(end)
        if i >= 0:
            self.thinking = False
            return buf[:i], self._answer(buf[i + len(end) :])
        keep = _partial_suffix(buf, end)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], ""

    def _answer(self, text: str) -> str:
        if not self._answered:
            text = text.lstrip("\n")
            self._answered = bool(text)
        return text

    def finish(self) -> tuple[str, str]:
        """What is held back, at the end of the output (reasoning: the end tag never came)."""
        held, self._held = self._held, ""
        return (held, "") if self.thinking else ("", held)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def split_delta(streams: dict[int, ReasoningStream], parser: ReasoningParser, c: CompletionDelta):
    """(the reasoning text of a streamed delta, the delta with only its answer text); `streams` keeps one
    ReasoningStream per choice index across the deltas of a request."""
    stream = streams.get(c.index)
    if stream is None:
        stream = streams[c.index] = parser.stream()
    reasoning, answer = stream.feed(c.text)
    if c.finished:
        more_reasoning, more_answer = stream.finish()
        reasoning, answer = reasoning + more_reasoning, answer + more_answer
    return reasoning, dataclasses.replace(c, text=answer)


def end_token_for(parser: ReasoningParser | None, thinking: bool, tokenizer) -> int | None:
    """SamplingParams.reasoning_end_token_id of a request (None: it does not think, or no parser); a model
    whose vocabulary lacks the tag is a 400 naming the problem."""
    if parser is None or not thinking:
        return None
    try:
        return parser.end_token_id(tokenizer)
    except ValueError as exc:
        raise bad_request(str(exc)) from None
