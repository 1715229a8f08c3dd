"""Shape-only versions of the kernel ops, so torch.compile can trace through them (imported after loading)."""

from __future__ import annotations

import torch


@torch.library.register_fake("turbofan::qlinear")
def _qlinear_fake(x, qweight, scales, mins, wsum, bias):
    return x.new_empty((x.shape[0], qweight.shape[0] * 16), dtype=torch.float32)
