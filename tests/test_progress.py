"""Tests of the tools' progress bar: drawn on a terminal, silent elsewhere."""

from __future__ import annotations

import io

from cabin_monitor.tools.progress import Progress


def test_no_output_when_not_a_terminal() -> None:
    """Writing to a pipe or file, the bar prints nothing at all."""
    stream = io.StringIO()
    with Progress("evaluate", 10, stream) as bar:
        for _ in range(10):
            bar.advance()
    assert stream.getvalue() == ""


def test_on_a_terminal_the_bar_counts_to_the_total_and_clears_its_line() -> None:
    """On a terminal the last drawing says 100 % and the count, and closing clears the line."""
    stream = io.StringIO()
    with Progress("evaluate", 4, stream, tty=True) as bar:
        for _ in range(4):
            bar.advance()
    drawn = stream.getvalue()
    assert "evaluate 100% 4/4" in drawn and drawn.endswith("\r\x1b[K")


def test_without_a_total_the_bar_counts() -> None:
    """With no known total the bar shows the count alone."""
    stream = io.StringIO()
    bar = Progress("bench", None, stream, tty=True)
    bar.advance(3)
    assert "bench 3" in stream.getvalue()


def test_the_bar_tells_the_time_left_at_the_rate_so_far() -> None:
    """A quarter done in 10 s: 0:30 left; the finished bar shows no time left."""
    now = [100.0]
    stream = io.StringIO()
    bar = Progress("report", 400, stream, tty=True, clock=lambda: now[0])
    now[0] = 110.0
    bar.advance(100)
    assert stream.getvalue().endswith("report  25% 100/400  0:30 left\x1b[K")
    assert bar.left_s(110.0) == 30.0
    now[0] = 140.0
    bar.advance(300)
    assert stream.getvalue().endswith("report 100% 400/400\x1b[K")


def test_no_time_left_is_guessed_before_a_hundredth_is_done() -> None:
    """After 1 of 1000 items the bar shows the count alone."""
    stream = io.StringIO()
    bar = Progress("replay", 1000, stream, tty=True)
    bar.advance()
    assert bar.left_s(1e9) is None
    assert "left" not in stream.getvalue()
