"""A one-slot, latest-wins hand-over between the capture thread and the inference thread."""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class LatestMailbox(Generic[T]):
    """Holds at most one item. ``put`` replaces (and counts) an unread item, so readers never see stale
    data; ``put_wait`` instead waits for the slot to empty, for lossless file processing."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: T | None = None
        self._closed = False
        self.dropped = 0

    def put(self, item: T) -> None:
        """Store ``item``, dropping the older unread one."""
        with self._cond:
            if self._item is not None:
                self.dropped += 1
            self._item = item
            self._cond.notify_all()

    def put_wait(self, item: T, stop: threading.Event, poll_s: float = 0.5) -> bool:
        """Store ``item`` once the slot is free; False if ``stop`` was set first."""
        with self._cond:
            while self._item is not None and not self._closed:
                if stop.is_set():
                    return False
                self._cond.wait(poll_s)
            self._item = item
            self._cond.notify_all()
            return True

    def get(self, timeout_s: float) -> T | None:
        """The newest item, or None after ``timeout_s`` (or at once when closed and empty)."""
        with self._cond:
            if self._item is None and not self._closed:
                self._cond.wait(timeout_s)
            item, self._item = self._item, None
            self._cond.notify_all()
            return item

    def close(self) -> None:
        """No more items will come; readers drain what is left and then get None at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        """Whether ``close`` was called."""
        with self._cond:
            return self._closed

    def empty(self) -> bool:
        """Whether nothing is waiting to be read."""
        with self._cond:
            return self._item is None
