"""``StdoutSink``, where the pipeline's output goes in runs without a broker (``runtime.ports.EventSink``).

The pipeline hands a sink plain messages (events, the rules engine's occupant states, health
snapshots); the sink turns them into payloads with ``bus.payloads`` and delivers them.
``bus.mqtt.MqttSink`` is the broker's sink.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from typing import TextIO

from cabin_monitor.bus.payloads import event_payload
from cabin_monitor.messages import Event, HealthSnapshot, SinkStats
from cabin_monitor.rules import OccupantState


class StdoutSink:
    """Prints each event as one JSON line (an ``EventPayload``), and each event of the shadow rules as
    ``{"shadow_event": <EventPayload>}``, so no reader takes one for a live event; states and health are
    not printed."""

    def __init__(self, vehicle_id: str, stream: TextIO | None = None) -> None:
        self._vehicle_id = vehicle_id
        self._stream = stream if stream is not None else sys.stdout
        self._lock = threading.Lock()
        self._published_total = 0

    def start(self) -> None:
        """Nothing to connect."""

    def submit_event(self, event: Event) -> None:
        """Print the event's JSON line and flush, so a pipe reader sees it at once."""
        self._print(event_payload(event, self._vehicle_id).model_dump_json())
        with self._lock:
            self._published_total += 1

    def submit_shadow_event(self, event: Event) -> None:
        """Print the shadow event's JSON line, marked as shadow (not counted as published)."""
        self._print('{"shadow_event": ' + event_payload(event, self._vehicle_id).model_dump_json() + "}")

    def _print(self, line: str) -> None:
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()

    def publish_state(self, occupants: Sequence[OccupantState], wall_time_s: float) -> None:
        """Ignored: stdout carries events only, one kind of line for consumers to parse."""

    def publish_health(self, health: HealthSnapshot) -> None:
        """Ignored (health is in the logs)."""

    def stop(self, flush_timeout_s: float) -> None:
        """Flush the stream."""
        with self._lock:
            self._stream.flush()

    def stats(self) -> SinkStats:
        """No broker, no outbox: only the count of events printed."""
        with self._lock:
            published = self._published_total
        return SinkStats(False, 0, 0, 0, {}, published)
