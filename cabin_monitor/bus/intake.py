"""What happens when the pipeline submits an event: its payload goes to the outbox, in step with the
open-event ledger.

A ``start`` enters the ledger before the outbox and an ``end`` leaves it after, so a crash at any point
leaves no start without an end: at worst the next start ends a start that was never sent, or sends
again, under the same ``event_id``, an end that was (see ``end_event_id``). The outbox row keeps the
event's ``EventFacts`` beside its bytes.

Imports ``bus.payloads``, ``bus.facts``, ``bus.outbox``, ``bus.outbox_watch``, ``bus.ledger`` and ``messages``.
"""

from __future__ import annotations

from structlog.typing import FilteringBoundLogger

from cabin_monitor.bus.facts import EventFacts
from cabin_monitor.bus.ledger import LedgerError, OpenEventLedger
from cabin_monitor.bus.outbox import Outbox
from cabin_monitor.bus.outbox_watch import OutboxWatch
from cabin_monitor.bus.payloads import event_payload
from cabin_monitor.messages import Event, Phase


class EventIntake:
    """Writes submitted events to the outbox and the ledger, in that order for an end, the other for a start.

    Not thread-safe: the pipeline's inference thread submits every event.
    """

    def __init__(
        self,
        outbox: Outbox,
        watch: OutboxWatch,
        vehicle_id: str,
        topic: str,
        ledger: OpenEventLedger | None,
        logger: FilteringBoundLogger,
    ) -> None:
        self._outbox = outbox
        self._watch = watch
        self._vehicle_id = vehicle_id
        self._topic = topic
        self._ledger = ledger
        self._log = logger

    def submit(self, event: Event) -> None:
        """Write the event to the outbox (durable on return) and the ledger."""
        payload = event_payload(event, self._vehicle_id).model_dump_json().encode()
        if event.phase is Phase.START:
            self._record_in_ledger(event)
        dropped = self._outbox.put(
            event.event_id, self._topic, payload, event.severity, event.wall_time_s, EventFacts.of(event)
        )
        # One line per accepted and per delivered event: losses can be checked from the log alone.
        self._log.info("event accepted", event_id=event.event_id, type=event.type, phase=event.phase)
        if event.phase is Phase.END:
            self._record_in_ledger(event)
        self._watch.log_dropped(dropped)
        self._watch.log_state()

    def _record_in_ledger(self, event: Event) -> None:
        if self._ledger is None:
            return
        was_aside = self._ledger.kept_aside
        try:
            self._ledger.record(event)
        except LedgerError as exc:
            # The event itself goes to the outbox either way; only its end after a crash is at stake.
            self._log.error("open-event ledger not updated", event_id=event.event_id, error=str(exc))
            return
        if self._ledger.kept_aside and not was_aside:
            self._log.warning(
                "open-event ledger cannot be written in the state folder; kept beside the outbox fallback file",
                path=str(self._ledger.path),
                fallback=str(self._ledger.fallback_path),
            )
        elif was_aside and not self._ledger.kept_aside:
            self._log.info("open-event ledger written in the state folder again", path=str(self._ledger.path))
