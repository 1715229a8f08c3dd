"""Incremental detokenization with stop strings.

Text grows one token at a time through the tokenizers library's DecodeStream, which holds back bytes until they
form valid UTF-8 (so Chinese never shows U+FFFD mid-stream). Stop strings may span tokens: we search only the
region the new text could complete and cut the text at the match. (The output processor holds back the last
len(longest stop) - 1 characters of a running sequence, so a stream never shows the start of a stop string.)
"""

from __future__ import annotations

from turbofan.engine.sequence import Sequence
from turbofan.model.tokenizer import Tokenizer


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def append(self, seq: Sequence, token: int) -> str | None:
        """Add `token`'s text to `seq.output_text`; returns the stop string it completed, if any."""
        params = seq.request.params
        if seq.detokenizer is None:
            seq.detokenizer = self.tokenizer.decode_stream(seq.request.prompt_token_ids, params.skip_special_tokens)
        piece = seq.detokenizer.step(self.tokenizer.backend, token)
        if not piece:
            return None
        before = len(seq.output_text)
        seq.output_text += piece
        if not params.stop or seq.num_output_tokens < params.min_tokens:
            return None
        longest = max(len(s) for s in params.stop)
        start = max(0, before - longest + 1)
        best: tuple[int, str] | None = None
        for stop in params.stop:
            at = seq.output_text.find(stop, start)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return None
        at, stop = best
        seq.output_text = seq.output_text[: at + len(stop) if params.include_stop_str_in_output else at]
        return stop
