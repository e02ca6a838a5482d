"""Tests of the latency percentiles, latency histograms and event rates that health, logs, metrics and bench report."""

from __future__ import annotations

from cabin_monitor.metrics import LatencyHistogram, LatencyWindow, RateWindow, percentiles


def test_percentiles_of_nothing_are_zero_and_of_values_rounded() -> None:
    """No values give zeros; 1..100 give the numpy percentiles, rounded to 0.01."""
    assert percentiles([]) == {"p50": 0.0, "p95": 0.0}
    assert percentiles(float(v) for v in range(1, 101)) == {"p50": 50.5, "p95": 95.05}


def test_latency_window_keeps_only_the_latest_samples() -> None:
    """Samples beyond the window size push the oldest out."""
    window = LatencyWindow(size=10)
    for v in range(100):
        window.add(1000.0 if v < 90 else 1.0)
    assert window.percentiles() == {"p50": 1.0, "p95": 1.0}


def test_rate_window_counts_per_second_over_its_last_occurrences() -> None:
    """Ten occurrences 0.1 s apart are 10 per second; a window of five forgets a slow start."""
    steady = RateWindow()
    assert steady.per_s() == 0.0
    for i in range(10):
        steady.add(i / 10)
    assert steady.per_s() == 10.0
    recent = RateWindow(size=5)
    for t in (0.0, 5.0, 10.0, 10.5, 11.0, 11.5, 12.0):
        recent.add(t)
    assert recent.per_s() == 2.0
    frozen = RateWindow()
    frozen.add(3.0)
    frozen.add(3.0)
    assert frozen.per_s() == 0.0


def test_latency_histogram_counts_each_value_in_every_bucket_at_or_above_it() -> None:
    """A value on a bound counts in that bucket; one above every bound only in +Inf; count and sum cover all."""
    histogram = LatencyHistogram([0.01, 0.001, 0.1])
    assert histogram.snapshot().cumulative == (0, 0, 0, 0)
    for seconds in (0.0005, 0.001, 0.002, 0.1, 0.5):
        histogram.observe(seconds)
    got = histogram.snapshot()
    assert got.bounds_s == (0.001, 0.01, 0.1)
    assert got.cumulative == (2, 3, 4, 5) and got.count == 5
    assert abs(got.sum_s - 0.6035) < 1e-12
