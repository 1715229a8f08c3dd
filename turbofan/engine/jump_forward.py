"""Jump-forward for constrained decoding: the tokens a grammar forces are scored in one forward, not one a step.

In JSON output much of the text is forced by the schema: keys, `", "`, `": "`, the rest of an enum value once its
first letters are out. A step normally emits one token per sequence, so a forced run of four tokens costs four
steps. Here, before the step, a decoding sequence with a grammar asks its matcher for the forced run
(llguidance's fast-forward tokens) and feeds it to the matcher; the run becomes the sequence's drafts for the
step, through the same multi-token query path as speculative decoding (speculative.py). The drafts are certain:
the sampler emits them as they are (no softmax, no mask for their rows) and samples only the position after the
run, with the bitmask of the matcher that has already consumed the run. So a step returns 1 + k tokens of such a
sequence for the cost of k more query tokens in the forward (SGLang's "jump-forward decoding").

Output is exactly what one-token-a-step decoding would give when the grammar's forced tokens are the ones the
mask would leave alone anyway; a seeded sampled request gives the same tokens too: its uniform for a position is
keyed by the token's index (engine/sampler.py), and a forced token needs none. Sequences that may not take drafts (penalties, processors, min_tokens, logprobs: see
`draft_room`) decode one token a step as before.
"""

from __future__ import annotations

from turbofan.engine.sequence import Sequence
from turbofan.engine.speculative import draft_room

MAX_FORCED = 16  # forced tokens scored in one step at most


class JumpForward:
    def __init__(self, max_model_len: int, max_forced: int = MAX_FORCED):
        self.max_model_len = max_model_len
        self.max_forced = max_forced
        self.num_forced_tokens = 0  # forced tokens emitted without a step of their own

    def propose(self, running: list[Sequence]) -> list[Sequence]:
        """Set the forced run of every decoding constrained sequence as its drafts; returns the ones that got any
        (their matchers are ahead until `settle`)."""
        forced = []
        for seq in running:
            constraint = seq.constraint
            if constraint is None:
                continue
            limit = draft_room(seq, self.max_model_len, self.max_forced)
            if seq.request.params.logprobs is not None:  # a forced row is not sampled, so it has no logprobs
                limit = 0
            seq.spec_token_ids = constraint.force(limit)
            if seq.spec_token_ids:
                forced.append(seq)
        return forced

    def settle(self, forced: list[Sequence], drafts: dict[int, list[int]] | None) -> None:
        """After scheduling: take back the forced tokens the scheduler did not run (budget, a full cache, a
        preemption); `drafts` None (a failed step) takes back all of them."""
        for seq in forced:
            kept = 0 if drafts is None else len(drafts.get(seq.seq_id, ()))
            seq.constraint.settle(kept)
            self.num_forced_tokens += kept


def forced_rows(sample: list[tuple[Sequence, int]], drafts: dict[int, list[int]]) -> dict[int, int]:
    """{position in `sample`: token} for the rows of a step whose token is a grammar's forced draft: the first k of
    the k + 1 consecutive rows of a constrained sequence with k drafts."""
    if not drafts:
        return {}
    rows: dict[int, int] = {}
    i = 0
    while i < len(sample):
        seq = sample[i][0]
        run = drafts.get(seq.seq_id) if seq.constraint is not None else None
        if run:
            rows.update({i + j: token for j, token in enumerate(run)})
            i += len(run) + 1
        else:
            i += 1
    return rows
