"""Tests of the process's CPU share per thread, read from /proc."""

from __future__ import annotations

import threading
import time

from cabin_monitor.runtime import cpu


def test_a_busy_thread_shows_under_its_own_name_and_an_idle_one_does_not() -> None:
    """A thread that computes is charged CPU under its threading name; one that sleeps is charged next to nothing."""
    stop = threading.Event()

    def busy() -> None:
        x = 0
        while not stop.is_set():
            x += 1

    workers = [
        threading.Thread(target=busy, name="busy-worker"),
        threading.Thread(target=lambda: stop.wait(5), name="idle-worker"),
    ]
    for w in workers:
        w.start()
    try:
        start = cpu.sample()
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:  # let the busy thread collect a few clock ticks
            time.sleep(0.05)
        end = cpu.sample()
    finally:
        stop.set()
        for w in workers:
            w.join()
    share = cpu.share(start, end)
    assert share.by_thread.get("busy-worker", 0) > 0.1
    assert share.by_thread.get("idle-worker", 0) < 0.05
    # The total holds every thread, to within the clock ticks the kernel counts CPU time in (10 ms each).
    assert share.cores_used >= share.by_thread["busy-worker"] - 4 / cpu.CLOCK_TICKS_PER_S / share.wall_s
    assert share.as_dict()["cores_used"] == round(share.cores_used, 3)
