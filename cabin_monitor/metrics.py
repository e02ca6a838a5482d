"""Small measurements shared by the daemon and the tools: latency percentiles, latency histograms and event rates."""

from __future__ import annotations

import bisect
import threading
from collections import deque
from collections.abc import Iterable

import numpy as np

from cabin_monitor.messages import Histogram


def percentiles(values_ms: Iterable[float]) -> dict[str, float]:
    """``{"p50", "p95"}`` of the values, rounded to 0.01 (0 when there are none)."""
    values = np.fromiter(values_ms, dtype=np.float64)
    if values.size == 0:
        return {"p50": 0.0, "p95": 0.0}
    return {"p50": round(float(np.percentile(values, 50)), 2), "p95": round(float(np.percentile(values, 95)), 2)}


class _Window:
    """The last ``size`` values added; thread-safe."""

    def __init__(self, size: int) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, value: float) -> None:
        """Record one value."""
        with self._lock:
            self._values.append(value)

    def _snapshot(self) -> list[float]:
        with self._lock:
            return list(self._values)


class LatencyWindow(_Window):
    """The last N samples of a latency (ms), for percentiles."""

    def __init__(self, size: int = 600) -> None:
        super().__init__(size)

    def percentiles(self) -> dict[str, float]:
        """p50 and p95 of the window (0 when empty)."""
        return percentiles(self._snapshot())

    def empty(self) -> bool:
        """Whether no sample has been added yet."""
        return not self._snapshot()


class RateWindow(_Window):
    """How often something happens (frames, say): add the monotonic time of each occurrence."""

    def __init__(self, size: int = 120) -> None:
        super().__init__(size)

    def per_s(self) -> float:
        """Occurrences per second over the window, rounded to 0.01 (0 until there are two)."""
        times = self._snapshot()
        if len(times) < 2 or times[-1] <= times[0]:
            return 0.0
        return round((len(times) - 1) / (times[-1] - times[0]), 2)


class LatencyHistogram:
    """Every latency observed since start-up, counted in cumulative buckets (seconds); thread-safe."""

    def __init__(self, bounds_s: Iterable[float]) -> None:
        self._bounds_s = tuple(sorted(bounds_s))
        self._cumulative = [0] * (len(self._bounds_s) + 1)  # the last one is +Inf: every observation
        self._sum_s = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        """Count one latency in every bucket whose upper bound it does not exceed."""
        first = bisect.bisect_left(self._bounds_s, seconds)
        with self._lock:
            for i in range(first, len(self._cumulative)):
                self._cumulative[i] += 1
            self._sum_s += seconds

    def snapshot(self) -> Histogram:
        """The counts so far."""
        with self._lock:
            return Histogram(self._bounds_s, tuple(self._cumulative), self._sum_s)
