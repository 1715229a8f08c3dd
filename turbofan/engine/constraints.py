"""Constrained decoding: the sampler only lets a row pick tokens its grammar allows (llguidance).

- `StructuredOutput` says what a request's output must match: a JSON schema, a regex, one of a list of choices,
  or a Lark/GBNF grammar. It is hashable, so a grammar is compiled once per distinct (kind, spec).
- `GrammarCompiler` (owned by the engine) compiles and validates specs against the model's tokenizer, with a
  cache, and starts one `Constraint` (an llguidance matcher) per sequence. A spec the library rejects raises a
  ValueError naming the problem, which the server answers with a 400.
- `GrammarMasks` (owned by the sampler) fills the token bitmasks of all constrained rows of a step in one call
  into a preallocated int32 buffer (llguidance's executor, which drops the GIL and works in parallel), then masks
  those rows' logits with plain array ops (numpy's unpackbits, one masked_fill_; llguidance's torch helper uses
  torch.compile, which we avoid on the serving path). A step without a constrained row never gets here.
- The scheduler's update step feeds each sampled token to its sequence's `Constraint`; when the grammar is
  complete the sequence finishes with "stop" (the only token left would be EOS).

llguidance rather than xgrammar: a ~3 MB wheel with no dependencies (xgrammar pulls triton, apache-tvm-ffi and
a different transformers), masks computed lazily in ~50 µs a row, JSON schema, regex, Lark and GBNF in one API.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger("turbofan.constraints")

KINDS = ("json", "regex", "choice", "grammar")
# JSON without optional whitespace: a small model given the freedom fills objects with newlines and spaces
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = '{"type": "object"}'


@dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must match. `spec`: a JSON schema (serialised), a regex, a JSON list of choices,
    or a grammar (llguidance's Lark, or GBNF as llama.cpp writes it)."""

    kind: str
    spec: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"structured output kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.spec, str) or not self.spec.strip():
            raise ValueError(f"the {self.kind} of a structured output must be a non-empty string")

    @classmethod
    def json_schema(cls, schema: dict | str | bool | None = None) -> StructuredOutput:
        """A JSON schema (dict or text); None means any JSON object (OpenAI's json_object, Ollama's "json")."""
        if schema is None:
            return cls("json", ANY_OBJECT)
        return cls("json", schema if isinstance(schema, str) else json.dumps(schema, sort_keys=False))

    @classmethod
    def choice(cls, choices: list[str]) -> StructuredOutput:
        if not choices or not all(isinstance(c, str) for c in choices):
            raise ValueError("choice must be a non-empty list of strings")
        return cls("choice", json.dumps(choices))


class Constraint:
    """One sequence's matcher: the grammar state after the tokens it has produced, plus `ahead` forced tokens it
    was fed before the step that verifies them (jump-forward: see `force`)."""

    __slots__ = ("matcher", "ahead", "after")

    def __init__(self, matcher, after: int | None = None) -> None:
        self.matcher = matcher
        self.ahead = 0
        self.after = after  # a reasoning model's end-of-thinking token: the grammar starts after it

    @property
    def active(self) -> bool:
        """Whether the grammar constrains the next token (not while the model is still reasoning)."""
        return self.after is None

    def accept(self, token: int) -> bool:
        """Advance by a sampled token; True when the grammar is complete (or broken) and the sequence should end.
        A token consumed ahead by `force` is only counted off (the step emits exactly the forced tokens); while
        reasoning, only the end-of-thinking token matters (it starts the grammar and is not fed to it)."""
        if self.after is not None:
            if token == self.after:
                self.after = None
            return False
        if self.ahead:
            self.ahead -= 1
            return not self.ahead and self.matcher.is_stopped()
        if not self.matcher.consume_token(token):
            log.warning("grammar rejected token %d: %s", token, self.matcher.get_error())
            return True
        return self.matcher.is_stopped()

    def force(self, limit: int) -> list[int]:
        """The tokens the grammar forces next (at most `limit`: keys, punctuation, the rest of an enum value), fed
        to the matcher now, so this step's bitmask is the one after them. They become drafts of the step that
        are certain to be accepted; `settle` takes back those the scheduler did not run."""
        if limit <= 0 or self.ahead or not self.active or self.matcher.is_stopped():
            return []
        forced = self.matcher.compute_ff_tokens()[:limit]
        if forced and self.matcher.consume_tokens(forced):
            self.ahead = len(forced)
            return forced
        return []

    def settle(self, kept: int) -> None:
        """Keep only the first `kept` tokens fed by `force` (the scheduler dropped or shortened the drafts)."""
        extra = self.ahead - kept
        if extra > 0:
            self.matcher.rollback(extra)
            self.ahead = kept

    def fork(self) -> Constraint:
        return Constraint(self.matcher.deep_copy(), self.after)


class GrammarCompiler:
    """Compiles StructuredOutputs against one tokenizer; the last `cache_size` distinct specs stay compiled."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: list[int], cache_size: int = 256):
        self.hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.cache_size = cache_size
        self._cache: OrderedDict[StructuredOutput, str] = OrderedDict()
        self._tokenizer = None  # llguidance's view of the vocabulary: ~0.5 s to build, so only when first needed
        self.compiled_total = 0

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            import llguidance.hf

            self._tokenizer = llguidance.hf.from_tokenizer(
                self.hf_tokenizer, n_vocab=self.vocab_size, eos_token=self.eos_token_ids or None
            )
        return self._tokenizer

    def compile(self, spec: StructuredOutput) -> str:
        """The validated llguidance grammar of `spec`; ValueError naming the problem if it is not valid."""
        grammar = self._cache.get(spec)
        if grammar is not None:
            self._cache.move_to_end(spec)
            return grammar
        from llguidance import LLMatcher, grammar_from

        try:
            if spec.kind == "json":
                schema = json.loads(spec.spec)
                if not isinstance(schema, dict | bool):
                    raise ValueError("a JSON schema must be an object")
                grammar = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
            else:
                grammar = grammar_from(spec.kind, spec.spec)
        except ValueError as exc:
            raise ValueError(f"invalid {_describe(spec.kind)}: {exc}") from None
        error = LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(f"invalid {_describe(spec.kind)}: {error.strip()}")
        self._cache[spec] = grammar
        self.compiled_total += 1
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return grammar

    def constraint(self, spec: StructuredOutput, after: int | None = None) -> Constraint:
        """A matcher for one sequence; `after`: a token that must come first (a reasoning model's end of
        thinking), before which the sequence is not constrained."""
        from llguidance import LLMatcher

        matcher = LLMatcher(self.tokenizer, self.compile(spec), log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid {_describe(spec.kind)}: {matcher.get_error()}")
        return Constraint(matcher, after)


def _describe(kind: str) -> str:
    return {"json": "JSON schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}[kind]


class GrammarMasks:
    """Masks the logits of a step's constrained rows; the bitmask buffer grows to the largest batch seen.

    `start` fills the bitmasks on a worker thread while the forward runs (llguidance drops the GIL; the masks
    depend only on the tokens consumed before this step), and `apply` waits for them: on a 2-core CPU the forward's
    OpenMP threads spend the gaps between operators spinning, which the mask work then uses (vLLM likewise
    computes the bitmask while the GPU runs). Without a `start`, `apply` fills them itself."""

    def __init__(self, num_threads: int | None = None):
        self.num_threads = num_threads
        self._executor = None
        self._bitmask = torch.zeros(0, 0, dtype=torch.int32)
        self._kernel: bool | None = None  # the own C++ op, when the kernels load and logits are float32
        self._worker = None
        self._pending = None  # (future, constraints, vocab) of the fill running for this step

    def _fill(self, constraints: list[Constraint], vocab: int) -> torch.Tensor:
        words = (vocab + 31) // 32
        n = len(constraints)
        if self._bitmask.shape[0] < n or self._bitmask.shape[1] != words:
            self._bitmask = torch.zeros(max(n, 2 * self._bitmask.shape[0]), words, dtype=torch.int32)
        bitmask = self._bitmask
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor(self.num_threads or max(1, torch.get_num_threads()))
        # one call fills every row (a matcher writes zeros past its own vocabulary)
        self._executor.unsafe_compute_mask_ptr(
            [(c.matcher, j) for j, c in enumerate(constraints)], bitmask.data_ptr(), words * 4, bitmask.shape[0]
        )
        return bitmask

    def start(self, constraints: list[Constraint], vocab: int) -> None:
        """Begin filling this step's bitmasks in the background (call before the forward)."""
        if self._worker is None:
            from concurrent.futures import ThreadPoolExecutor

            self._worker = ThreadPoolExecutor(1, thread_name_prefix="turbofan-grammar")
        self._pending = (self._worker.submit(self._fill, constraints, vocab), constraints, vocab)

    def apply(self, logits: torch.Tensor, constraints: list[Constraint], rows: list[int]) -> np.ndarray:
        """In place: row `rows[j]` of `logits` keeps only the tokens `constraints[j]` allows (-inf elsewhere).
        Returns how many tokens each row allows."""
        n, vocab = len(rows), logits.shape[-1]
        pending, self._pending = self._pending, None
        if pending is not None and pending[1] == constraints and pending[2] == vocab:
            bitmask = pending[0].result()
        else:
            if pending is not None:  # started for other rows (never in the engine's step): wait, then refill
                pending[0].result()
            bitmask = self._fill(constraints, vocab)
        if self._kernel is None:
            from turbofan import kernels

            self._kernel = kernels.available() and logits.dtype == torch.float32
        if self._kernel and logits.dim() == 2 and logits.stride(1) == 1:  # one pass (kernels/token_bitmask.cpp)
            rows_t = torch.tensor(rows, dtype=torch.long)
            return torch.ops.turbofan.apply_token_bitmask(logits, bitmask, rows_t).numpy()
        # unpack the inverted bits (little-endian: the bytes of the int32 words in order are the vocabulary in
        # order, least significant bit first) straight into a bool "banned" mask; numpy's unpackbits is one
        # vectorised pass where shifting int32 words costs several
        bits = np.unpackbits((~bitmask[:n]).numpy().view(np.uint8), axis=1, count=vocab, bitorder="little")
        banned = torch.from_numpy(bits.view(np.bool_))
        allowed = vocab - bits.sum(axis=1, dtype=np.int64)
        if n == logits.shape[0] and rows == list(range(n)):
            logits.masked_fill_(banned, float("-inf"))
        else:
            idx = torch.tensor(rows, dtype=torch.long)
            logits[idx] = logits[idx].masked_fill_(banned, float("-inf"))
        return allowed


NARROW = 1024  # a row allowing at most this many tokens samples as top-k over them


def narrow_top_k(batch, rows: list[int], allowed: np.ndarray) -> None:
    """A constrained row that allows few tokens samples with top-k = their number: the same distribution (the
    others are -inf), drawn from one `topk` instead of exp over a vocabulary of -inf, which is slow on CPU (exp of
    -inf and of large negative numbers leaves the vectorised path: 3-10x a plain row here)."""
    if not batch.random_rows:
        return
    position = {r: j for j, r in enumerate(batch.random_rows)}
    for r, n in zip(rows, allowed.tolist()):
        j = position.get(r)
        if j is not None and n <= NARROW:
            batch.top_k[j] = min(int(batch.top_k[j]), max(n, 1))
