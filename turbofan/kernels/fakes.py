"""Shape-only versions of the kernel ops, so torch.compile can trace through them (imported after loading)."""

from __future__ import annotations
