"""A one-line progress bar for the long tools (bench, evaluate, replay, report): on a terminal only, never in pipes."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

# Before this much of the total is done, a time left would be a guess.
_ETA_AFTER_FRACTION = 0.01


class Progress:
    """``label  40% 1200/3000  0:05 left`` redrawn in place on ``stream`` when it is a terminal; nothing otherwise."""

    def __init__(
        self,
        label: str,
        total: int | None,
        stream: TextIO | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self._stream = stream or sys.stderr
        self._on = self._stream.isatty() if tty is None else tty
        self._clock = clock
        self._started_s = clock()
        self._last_draw_s = float("-inf")

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more items; redraws at most ten times a second."""
        self.done += n
        if not self._on:
            return
        now = self._clock()
        if now - self._last_draw_s >= 0.1 or self.done == self.total:
            self._last_draw_s = now
            self._draw(now)

    def left_s(self, now_s: float) -> float | None:
        """The time left at the rate so far; None without a total or before enough is done to tell."""
        if not self.total or self.done < max(1.0, _ETA_AFTER_FRACTION * self.total):
            return None
        return (now_s - self._started_s) * max(self.total - self.done, 0) / self.done

    def _draw(self, now_s: float) -> None:
        if self.total:
            text = f"{self.label} {100 * self.done / self.total:3.0f}% {self.done}/{self.total}"
            left_s = self.left_s(now_s)
            if left_s is not None and self.done < self.total:
                minutes, seconds = divmod(round(left_s), 60)
                text += f"  {minutes}:{seconds:02d} left"
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
