"""What the pipeline needs from the parts it is given: where its output goes (``EventSink``) and the
worker that answers operators' requests (``RequestWorker``). The composition root injects them; the
runtime imports no bus module. May import ``messages`` and ``rules``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from cabin_monitor.messages import Event, HealthSnapshot, RemoteStats, SinkStats
from cabin_monitor.rules import OccupantState


class EventSink(Protocol):
    """Where events, occupant states and health go."""

    def start(self) -> None:
        """Begin delivering (connect in the background)."""

    def submit_event(self, event: Event) -> None:
        """Queue an event for delivery; durable once this returns (for sinks with an outbox)."""

    def submit_shadow_event(self, event: Event) -> None:
        """Hand on an event of the shadow rules, apart from live events and never through an outbox; best effort
        (dropped while offline), and never blocking."""

    def publish_state(self, occupants: Sequence[OccupantState], wall_time_s: float) -> None:
        """Best effort, QoS 0: dropped while offline."""

    def publish_health(self, health: HealthSnapshot) -> None:
        """Retained, QoS 1; only the latest is kept while offline."""

    def stop(self, flush_timeout_s: float) -> None:
        """Deliver pending events for up to ``flush_timeout_s``, then shut down cleanly."""

    def stats(self) -> SinkStats:
        """Counters for the health payload."""


class RequestWorker(Protocol):
    """A worker of its own answering operators' requests, started before the sink and stopped after the stages."""

    def start(self) -> None:
        """Start answering."""

    def stop(self, timeout_s: float) -> None:
        """Stop, waiting at most ``timeout_s``."""

    def stats(self) -> RemoteStats:
        """Counters for the health snapshot."""
