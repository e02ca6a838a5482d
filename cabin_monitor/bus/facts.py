"""What an event waiting for delivery is, beside its bytes: ``EventFacts``.

The outbox (and its fallback file) keeps them in columns of their own, taken from the ``Event`` when
it is submitted, so that neither the delivery log nor the start-up's search for events left open
reads the JSON back. ``facts_of_payload`` reads them from a payload only for rows written before
those columns existed.

Imports ``bus.payloads`` and ``messages``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from cabin_monitor.bus.payloads import EventPayload
from cabin_monitor.messages import Event, Phase


@dataclass(frozen=True, slots=True)
class EventFacts:
    """An event's type, phase, rule, occupant and start id: what its end after a crash and its log lines need."""

    type: str
    phase: Phase
    rule: str
    occupant_id: str
    seat: str | None
    start_event_id: str | None  # on ``end``: the ``event_id`` of its start

    @classmethod
    def of(cls, event: Event) -> EventFacts:
        """The facts of a submitted event."""
        return cls(event.type, event.phase, event.rule, event.occupant_id, event.seat, event.start_event_id)

    def columns(self) -> tuple[str, str, str, str, str | None, str | None]:
        """The values of ``COLUMNS``, in that order."""
        return (self.type, self.phase.value, self.rule, self.occupant_id, self.seat, self.start_event_id)

    @classmethod
    def from_columns(cls, values: tuple[str | None, ...]) -> EventFacts | None:
        """The facts stored as ``columns()``; None when they are NULL (not an event, or written before them)."""
        event_type, phase, rule, occupant_id, seat, start_event_id = values
        if event_type is None or phase is None or rule is None or occupant_id is None:
            return None
        return cls(event_type, Phase(phase), rule, occupant_id, seat, start_event_id)


# The names of the columns that hold them, in the outbox and in its fallback file.
COLUMNS = ("type", "phase", "rule", "occupant_id", "seat", "start_event_id")
NO_FACTS: tuple[None, ...] = (None,) * len(COLUMNS)


def facts_of_payload(payload: bytes) -> EventFacts | None:
    """The facts an event payload states; None for bytes that are not an event payload."""
    try:
        event = EventPayload.model_validate_json(payload)
    except ValidationError:
        return None
    return EventFacts(event.type, Phase(event.phase), event.rule, event.occupant_id, event.seat, event.start_event_id)
