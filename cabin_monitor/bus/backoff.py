"""Jittered exponential backoff, shared by reconnecting to the broker and retrying a refused event.

Imports nothing of the project.
"""

from __future__ import annotations

import random


class Backoff:
    """Full jitter: a delay uniform between ``min_s`` and a cap that doubles per failure, up to ``max_s``."""

    def __init__(self, min_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.min_s = min_s
        self.max_s = max_s
        self._rng = rng or random.Random()

    def delay_s(self, failures: int) -> float:
        """The wait after ``failures`` failures in a row (1 for the first)."""
        low, high = self.min_s, self.max_s
        return self._rng.uniform(low, min(high, low * 2.0 ** min(failures, 32)))
