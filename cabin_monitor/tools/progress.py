"""A one-line progress bar for the long tools (bench, evaluate): drawn on a terminal, silent in pipes."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``label  40% 1200/3000`` redrawn in place on ``stream`` when it is a terminal; nothing otherwise."""

    def __init__(self, label: str, total: int | None, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self._stream = stream or sys.stderr
        self._on = self._stream.isatty() if tty is None else tty
        self._last_draw_s = 0.0

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more items; redraws at most ten times a second."""
        self.done += n
        now = time.monotonic()
        if self._on and (now - self._last_draw_s >= 0.1 or self.done == self.total):
            self._last_draw_s = now
            self._draw()

    def _draw(self) -> None:
        if self.total:
            text = f"{self.label} {100 * self.done / self.total:3.0f}% {self.done}/{self.total}"
        else:
            text = f"{self.label} {self.done}"
        self._stream.write(f"\r{text}\033[K")
        self._stream.flush()

    def close(self) -> None:
        """End the line the bar was drawn on."""
        if self._on and self.done:
            self._stream.write("\r\033[K")
            self._stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
