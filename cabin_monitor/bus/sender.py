"""Sending the outbox: the window of events in flight, acknowledgements, refusals, expiry.

Outbox rows go out in order with at most ``max_inflight`` unacknowledged; a connection starts again
from the oldest unacknowledged row, so delivery is at-least-once. An acknowledged event leaves the
outbox. A refused one (an MQTT 5 PUBACK with a failure reason code, e.g. 0x87 "Not authorized", 0x97
"Quota exceeded") stays, is logged and counted, and the events after it are held back: once those
already in flight are answered, the oldest pending event goes alone after a backoff (doubling per
refused round) and the full window resumes once one is accepted. So order is kept, except that events
already in flight when the refusal came may be delivered before it.

Plain logic: it publishes through any ``Publisher`` and is told of acknowledgements as ``PubAck``s,
so it knows nothing of paho. Imports ``bus.outbox``, ``bus.outbox_watch``, ``bus.backoff`` and
``messages``.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from structlog.typing import FilteringBoundLogger

from cabin_monitor.bus.backoff import Backoff
from cabin_monitor.bus.outbox import Outbox, OutboxItem
from cabin_monitor.bus.outbox_watch import OutboxWatch
from cabin_monitor.messages import Refusal

EXPIRE_EVERY_S = 60.0
TOO_LARGE_REMEMBERED = 1024


class Publisher(Protocol):
    """Where the sender publishes: the broker connection, or a fake one in tests."""

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> int | None:
        """Hand a message to the connection; its message id, or None when the link is going down."""

    def fits(self, topic: str, payload: bytes, *, qos: int) -> bool:
        """Whether the broker takes a message this large (MQTT 5: the CONNACK's Maximum Packet Size)."""


@dataclass(frozen=True, slots=True)
class PubAck:
    """The broker's answer to one QoS 1 publish."""

    mid: int
    reason_code: int  # 0 accepted; 0x80 and above refused (MQTT 5)
    reason: str  # the reason code's name, e.g. "Not authorized"

    @property
    def refused(self) -> bool:
        """Whether the broker refused the message."""
        return self.reason_code >= 0x80


class OutboxSender:
    """Sends outbox rows through a ``Publisher``; used by one thread, but ``note_ack`` may come from any."""

    def __init__(
        self,
        outbox: Outbox,
        watch: OutboxWatch,
        max_inflight: int,
        backoff: Backoff,
        logger: FilteringBoundLogger,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._outbox = outbox
        self._watch = watch
        self._max_inflight = max_inflight
        self._backoff = backoff
        self._log = logger
        self._clock = clock
        self._acks: collections.deque[PubAck] = collections.deque()  # appended by the network thread
        self._inflight: dict[int, OutboxItem] = {}  # mid -> row
        self._cursor = 0  # the last row id sent on this connection
        self._too_large: dict[str, None] = {}  # events named once as too large for the broker
        self._next_expiry_s = 0.0
        self.published_total = 0
        self.refused_total = 0
        self.last_refusal: Refusal | None = None
        self._refusal_streak = 0  # probe rounds refused in a row; 0 = sending normally
        self._retry_refused_at_s: float | None = None  # hold new sends until then, then probe one
        self._probing = False  # one event in flight to see whether the broker accepts again

    @property
    def refusing(self) -> bool:
        """Whether events are held back after a refusal."""
        return self._refusal_streak > 0

    def note_ack(self, ack: PubAck) -> None:
        """Note an acknowledgement (any thread; handled by ``drain_acks``)."""
        self._acks.append(ack)

    def restart(self) -> None:
        """A new connection: re-send from the oldest unacknowledged row (at-least-once, in order)."""
        self._cursor = 0

    def link_closed(self) -> None:
        """The connection ended: take the acknowledgements it gave, forget what it left unanswered."""
        self.drain_acks()
        self._inflight.clear()

    def drain_acks(self) -> None:
        """Remove acknowledged events from the outbox; note refusals."""
        while self._acks:
            ack = self._acks.popleft()
            item = self._inflight.pop(ack.mid, None)
            if item is None:  # birth, health or a config result
                continue
            if ack.refused:
                self._refused(item, ack)
                continue
            # A delete that cannot be written (disk full) is retried by the outbox, and the row is not
            # sent again meanwhile: never a reason to drop the connection.
            self._outbox.ack(item.row_id)
            self.published_total += 1
            facts = item.facts
            described = {} if facts is None else {"type": facts.type, "phase": facts.phase.value}
            self._log.info("event delivered", event_id=item.event_id, **described)
            if self._refusal_streak and self._retry_refused_at_s is None:
                self._log.info("mqtt broker accepts events again", refused_total=self.refused_total)
                self._refusal_streak = 0
                self._probing = False
        self._watch.log_state()

    def expire_if_due(self) -> None:
        """Every ``EXPIRE_EVERY_S``: drop events older than the outbox keeps them."""
        now = self._clock()
        if now >= self._next_expiry_s:
            self._next_expiry_s = now + EXPIRE_EVERY_S
            self._watch.log_dropped(self._outbox.expire())

    def send(self, publisher: Publisher) -> None:
        """Publish the next pending rows, as many as the window (or a refusal's probe) allows."""
        window = self._max_inflight
        if self._retry_refused_at_s is not None:
            # After a refusal: nothing new until every event in flight is answered and the backoff is
            # over; then the oldest pending event goes alone, so order is kept.
            if self._inflight or self._clock() < self._retry_refused_at_s:
                return
            self._retry_refused_at_s = None
            self._probing = True
            self._cursor = 0
        if self._probing:
            window = 1
        free = window - len(self._inflight)
        if free <= 0:
            return
        for item in self._outbox.pending(free, after_row_id=self._cursor):
            if not publisher.fits(item.topic, item.payload, qos=1):
                # Sent, the broker would drop the connection (and again after each reconnect), holding back
                # every event after it. It stays in the outbox and is tried on the next connection.
                self._cursor = item.row_id
                if item.event_id not in self._too_large:
                    self._too_large[item.event_id] = None
                    while len(self._too_large) > TOO_LARGE_REMEMBERED:
                        del self._too_large[next(iter(self._too_large))]
                    self._log.error(
                        "event larger than the broker's Maximum Packet Size kept in the outbox, not sent",
                        event_id=item.event_id,
                        size_bytes=len(item.payload),
                    )
                continue
            mid = publisher.publish(item.topic, item.payload, qos=1)
            if mid is None:
                break  # the link is going down; the row is sent again after reconnecting
            self._inflight[mid] = item
            self._cursor = item.row_id

    def _refused(self, item: OutboxItem, ack: PubAck) -> None:
        """A PUBACK refused an event: it stays in the outbox; hold back the rest and retry after a backoff."""
        self.refused_total += 1
        self.last_refusal = Refusal(item.event_id, ack.reason, ack.reason_code, time.time())
        if self._retry_refused_at_s is None:  # once per round: the events in flight share the backoff
            self._refusal_streak += 1
            self._probing = False
            self._retry_refused_at_s = self._clock() + self._backoff.delay_s(self._refusal_streak)
        self._log.warning(
            "mqtt broker refused an event; it stays in the outbox",
            event_id=item.event_id,
            reason=ack.reason,
            reason_code=f"0x{ack.reason_code:02x}",
            retry_in_s=round(max(0.0, self._retry_refused_at_s - self._clock()), 3),
            refused_total=self.refused_total,
        )
