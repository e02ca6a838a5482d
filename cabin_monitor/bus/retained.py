"""Retained topics of which only the latest value matters (health, rules state).

Each topic is a slot: setting it replaces what waits there; the sender publishes a slot once after it
is set, and every filled slot again after each connect (the broker may hold an older value, or none).

Imports nothing of the project.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence


class LatestValues:
    """One slot per topic, in the order they are published; safe to share between threads."""

    def __init__(self, topics: Sequence[str]) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, bytes | None] = dict.fromkeys(topics)
        self._due: set[str] = set()

    def set(self, topic: str, payload: bytes) -> None:
        """Replace the slot's value; it is due for publishing."""
        with self._lock:
            if topic not in self._values:
                raise KeyError(f"no retained slot for {topic}")
            self._values[topic] = payload
            self._due.add(topic)

    def all_due(self) -> None:
        """A new connection: every filled slot is due again."""
        with self._lock:
            self._due = {topic for topic, value in self._values.items() if value is not None}

    def take_due(self) -> list[tuple[str, bytes]]:
        """The due slots' ``(topic, value)``, in slot order; none is due afterwards."""
        with self._lock:
            due = [(topic, value) for topic, value in self._values.items() if topic in self._due and value is not None]
            self._due.clear()
        return due
