"""`python -m tests.faulty_server serve ...`: turbofan.cli with two faults planted, for tests/test_server_robustness.py.

- a forward pass whose input holds token id FAULT_TOKEN raises (a request-level failure the engine survives);
- a step that updates a request with seed INVARIANT_SEED breaks the scheduler's bookkeeping (the engine dies and
  the process must exit non-zero).
"""

from __future__ import annotations

import sys

from turbofan.engine.scheduler import Scheduler
from turbofan.model.runner import ModelRunner

FAULT_TOKEN = 77
INVARIANT_SEED = 666

_execute = ModelRunner.execute
_update = Scheduler.update_from_output


def execute(self, batch):
    if bool((batch.input_ids == FAULT_TOKEN).any()):
        raise RuntimeError("planted forward failure")
    return _execute(self, batch)


def update_from_output(self, out, tokens):
    if any(seq.request.params.seed == INVARIANT_SEED for seq, _ in out.scheduled):
        raise AssertionError("planted broken invariant")
    return _update(self, out, tokens)


ModelRunner.execute = execute
Scheduler.update_from_output = update_from_output

if __name__ == "__main__":
    from turbofan.cli import main

    sys.exit(main(sys.argv[1:]))
