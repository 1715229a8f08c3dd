"""`python -m tests.faulty_server serve ...`: turbofan.cli with two faults planted, for tests/test_server_robustness.py.

- a forward pass whose input holds token id FAULT_TOKEN raises (a request-level failure the engine survives);
- a step that updates a request with seed INVARIANT_SEED breaks the scheduler's bookkeeping (the engine dies and
  the process must exit non-zero);
- an embedding model's forward over token FAULT_TOKEN raises MemoryError (an allocation that failed for one
  request: the embedding engine must serve on);
- the stop scan of a request with seed STOP_SCAN_SEED raises after the forward (one request's own work: it ends
  with an error, and the step goes on for the others).
"""

from __future__ import annotations

import sys

from turbofan.engine.detokenizer import Detokenizer
from turbofan.engine.embedding import EmbeddingEngine
from turbofan.engine.scheduler import Scheduler
from turbofan.model.runner import ModelRunner

FAULT_TOKEN = 77
INVARIANT_SEED = 666
STOP_SCAN_SEED = 777

_execute = ModelRunner.execute
_update = Scheduler.update_from_output
_encode = EmbeddingEngine.encode
_append = Detokenizer.append


def execute(self, batch):
    if bool((batch.input_ids == FAULT_TOKEN).any()):
        raise RuntimeError("planted forward failure")
    return _execute(self, batch)


def update_from_output(self, out, tokens):
    if any(seq.request.params.seed == INVARIANT_SEED for seq, _ in out.scheduled):
        raise AssertionError("planted broken invariant")
    return _update(self, out, tokens)


def encode(self, rows):
    if any(FAULT_TOKEN in row for row in rows):
        raise MemoryError("planted allocation failure")
    return _encode(self, rows)


def append(self, seq, token):
    if seq.request.params.seed == STOP_SCAN_SEED:
        raise RuntimeError("planted stop-scan failure")
    return _append(self, seq, token)


ModelRunner.execute = execute
Detokenizer.append = append
EmbeddingEngine.encode = encode
Scheduler.update_from_output = update_from_output

if __name__ == "__main__":
    from turbofan.cli import main

    sys.exit(main(sys.argv[1:]))
