"""Tests of the latest-frame mailbox."""

from __future__ import annotations

import threading

from cabin_monitor.runtime.mailbox import LatestMailbox


def test_put_replaces_the_unread_item_and_counts_the_drop() -> None:
    """The reader gets the newest item; each overwritten one is counted."""
    box: LatestMailbox[int] = LatestMailbox()
    for i in range(5):
        box.put(i)
    assert box.get(0.1) == 4
    assert box.dropped == 4
    assert box.get(0.01) is None


def test_put_wait_loses_nothing() -> None:
    """With put_wait a slow reader still receives every item in order."""
    box: LatestMailbox[int] = LatestMailbox()
    stop = threading.Event()
    received: list[int] = []

    def reader() -> None:
        while True:
            item = box.get(0.5)
            if item is None and box.closed:
                return
            if item is not None:
                received.append(item)

    t = threading.Thread(target=reader)
    t.start()
    for i in range(200):
        assert box.put_wait(i, stop)
    box.close()
    t.join(5)
    assert received == list(range(200))
    assert box.dropped == 0


def test_put_wait_gives_up_when_stopped() -> None:
    """A writer blocked on a full slot returns False once stop is set."""
    box: LatestMailbox[int] = LatestMailbox()
    stop = threading.Event()
    box.put(1)
    stop.set()
    assert box.put_wait(2, stop, poll_s=0.01) is False
