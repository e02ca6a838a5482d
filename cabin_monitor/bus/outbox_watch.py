"""What the outbox's condition is worth a log line for: events it dropped, its file ceasing or resuming to
take writes, the events it still holds when the sink stops; and retrying its writes while they fail.

Imports ``bus.outbox``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from structlog.typing import FilteringBoundLogger

from cabin_monitor.bus.outbox import DroppedEvent, Outbox
from cabin_monitor.messages import OutboxState

WRITE_RETRY_S = 1.0  # how often writing what the outbox holds in memory is retried


class OutboxWatch:
    """Logs the outbox's drops and state changes; safe to call from the pipeline's and the sender's threads."""

    def __init__(
        self, outbox: Outbox, logger: FilteringBoundLogger, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._outbox = outbox
        self._log = logger
        self._clock = clock
        self._lock = threading.Lock()
        self._logged_state = OutboxState.OK
        self._next_write_retry_s = 0.0

    def log_dropped(self, dropped: list[DroppedEvent]) -> None:
        """One warning per event the outbox gave up on."""
        for d in dropped:
            self._log.warning(
                "outbox dropped an event",
                reason=d.reason,
                event_id=d.event_id,
                type=d.type,
                severity=d.severity,
                age_s=round(time.time() - d.created_wall_s, 1),
                max_events=self._outbox.memory_max_events if d.reason == "memory_full" else self._outbox.max_events,
            )

    def log_state(self) -> None:
        """One line when the outbox file stops or starts being writable again."""
        state = self._outbox.state
        with self._lock:
            previous, self._logged_state = self._logged_state, state
        if state == previous:
            return
        if state is OutboxState.OK:
            self._log.info("outbox file writable again; events held in memory are written", path=str(self._outbox.path))
        else:
            self._log.error(
                "outbox file cannot be written; events are held in memory until it can",
                path=str(self._outbox.path),
                state=state.value,
                error=self._outbox.write_error,
                memory_depth=self._outbox.memory_depth,
                memory_max_events=self._outbox.memory_max_events,
                fallback=None if self._outbox.fallback_path is None else str(self._outbox.fallback_path),
                fallback_error=self._outbox.fallback_error,
            )

    def retry_writes_if_due(self) -> None:
        """Every ``WRITE_RETRY_S`` while the outbox holds events in memory: try writing them (sender thread)."""
        now = self._clock()
        if now < self._next_write_retry_s or self._outbox.state is OutboxState.OK:
            return
        self._next_write_retry_s = now + WRITE_RETRY_S
        self.log_dropped(self._outbox.retry_writes())
        self.log_state()

    def log_left_behind(self) -> None:
        """On stop: a last try at writing what waits in memory, then what stays pending and what is lost."""
        self.log_dropped(self._outbox.retry_writes())
        pending = self._outbox.depth()
        if pending:
            self._log.warning("mqtt stopping with events pending; they stay in the outbox", pending=pending)
        unkept = self._outbox.unkept_event_ids
        kept = [event_id for event_id in self._outbox.memory_event_ids if event_id not in unkept]
        if kept:
            self._log.warning(
                "mqtt stopping with events the outbox file could not take; the fallback file keeps them "
                "for the next start",
                event_ids=kept,
                fallback=str(self._outbox.fallback_path),
                state=self._outbox.state.value,
                error=self._outbox.write_error,
            )
        if unkept:
            # Nowhere left to keep them: say which, so the loss can be traced.
            self._log.error(
                "mqtt stopping with events the outbox file could not take; they are lost",
                event_ids=unkept,
                state=self._outbox.state.value,
                error=self._outbox.write_error,
                fallback_error=self._outbox.fallback_error,
            )
