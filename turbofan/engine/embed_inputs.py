"""The inputs of an embedding request, checked the same way by every engine that embeds.

An embedding model (EmbeddingEngine) and a chat model asked for embeddings (AsyncEngine, last-token pooling)
take texts or token lists up to a length limit; too long is a ValueError naming both lengths unless the caller
asked for truncation (Ollama's `truncate`, on by default there), and an empty input or a token outside the
vocabulary is a ValueError too (the routes turn these into a 400 in their API's format).
"""

from __future__ import annotations

from collections.abc import Sequence


def fit_rows(
    rows: Sequence[list[int]], limit: int, model: str, truncate: bool, keep_last: bool
) -> list[list[int]]:
    """`rows` cut to `limit` tokens when `truncate`, else a ValueError for the first that is longer.

    `keep_last`: keep a row's final token when cutting (an encoder's closing [SEP]); otherwise keep the head."""
    out = []
    for i, row in enumerate(rows):
        if len(row) > limit:
            if not truncate:
                raise ValueError(
                    f"input {i} is {len(row)} tokens long but {model} takes at most {limit}; "
                    "shorten it or ask for truncation"
                )
            row = row[: limit - 1] + row[-1:] if keep_last else row[:limit]
        out.append(list(row))
    return out


def check_rows(rows: Sequence[list[int]], limit: int, vocab_size: int, model: str) -> None:
    """Token lists as given by a caller (token ids instead of text): none empty, none too long, all in range."""
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"input {i} is empty")
        if len(row) > limit:
            raise ValueError(f"input {i} is {len(row)} tokens long but {model} takes at most {limit}")
        bad = [t for t in row if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
