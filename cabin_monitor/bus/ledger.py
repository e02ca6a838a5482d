"""The open-event ledger: every event started and not yet ended, kept in the state folder.

Every ``start`` gets an ``end``: the rules engine ends what is open when the daemon stops cleanly,
but a crash, a watchdog kill or a power cut leaves the vehicle with a ``stress`` that never ends.
The ledger (``<state_dir>/open_events.json``, replaced atomically on every start and end) remembers
the open ones; the next start ends each with ``interrupted: true`` before any new event.

The outbox has the last word (``left_open``): an event whose end is still waiting there is not
open, whatever the ledger says (the crash came between the two writes), and a start waiting there
without its end is open, whatever the ledger says (delivery keeps the order, so its end cannot have
gone out before it; the ledger may not have noted it, when the state folder was full and the
outbox's fallback file kept the start).

When the state folder cannot be written (full, read-only), the ledger is written beside the outbox's
fallback file instead (``open-events.json``, on another filesystem); that copy is newer than the
folder's, so the next start reads it first, and it is removed once the folder takes the ledger again.
A start delivered from memory is thus ended after a crash, and an end delivered from memory is not
sent again.

``interrupted_ends`` and ``left_open`` are the pure part; ``OpenEventLedger`` the file. Where a
submitted event enters the ledger, relative to the outbox, is ``bus.intake``'s business.

Imports ``bus.outbox`` (its items' facts) and ``messages``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, get_args

from cabin_monitor.bus.outbox import OutboxItem
from cabin_monitor.messages import Event, Phase, Severity, end_event_id

FORMAT = "cabin-monitor/open-events/1"


@dataclass(frozen=True, slots=True)
class OpenEvent:
    """What the ledger keeps of a started event: enough to end it."""

    event_id: str
    type: str
    rule: str
    occupant_id: str
    seat: str | None
    started_wall_time_s: float
    severity: Severity

    def __post_init__(self) -> None:
        if self.severity not in get_args(Severity):
            raise ValueError(f"severity {self.severity!r}")


def interrupted_ends(open_events: Iterable[OpenEvent], wall_time_s: float) -> list[Event]:
    """An ``end`` for each event a previous run left open, at ``wall_time_s``, marked ``interrupted``."""
    return [
        Event(
            event_id=end_event_id(opened.event_id),
            type=opened.type,
            phase=Phase.END,
            rule=opened.rule,
            occupant_id=opened.occupant_id,
            seat=opened.seat,
            capture_s=0.0,
            wall_time_s=max(wall_time_s, opened.started_wall_time_s),
            score=0.0,
            emotions={},
            started_wall_time_s=opened.started_wall_time_s,
            start_event_id=opened.event_id,
            severity=opened.severity,
            interrupted=True,
        )
        for opened in open_events
    ]


def left_open(noted: Iterable[OpenEvent], pending: Iterable[OutboxItem]) -> list[OpenEvent]:
    """The events a previous run left open, oldest first, from the ledger's ``noted`` and the outbox's ``pending``
    events.

    Open: a noted event whose end is not pending (an end the crash left in the outbox goes out as it is),
    and a pending start whose end is not pending (the ledger may not have noted it). Items that are not
    events (none are, in an outbox this daemon wrote) are passed over.
    """
    found = {opened.event_id: opened for opened in noted}
    ended: set[str] = set()
    for item in pending:
        facts = item.facts
        if facts is None:
            continue
        if facts.phase is Phase.START:
            # A start is submitted with its own wall time as the outbox's creation time.
            found.setdefault(
                item.event_id,
                OpenEvent(
                    item.event_id,
                    facts.type,
                    facts.rule,
                    facts.occupant_id,
                    facts.seat,
                    item.created_wall_s,
                    item.severity,
                ),
            )
        elif facts.start_event_id is not None:
            ended.add(facts.start_event_id)
    still_open = [opened for event_id, opened in found.items() if event_id not in ended]
    return sorted(still_open, key=lambda opened: opened.started_wall_time_s)


class LedgerError(Exception):
    """The ledger file cannot be read or written."""


def fallback_ledger_path(held_events: Path) -> Path:
    """Where the ledger goes when the state folder cannot take it: beside the outbox's fallback file."""
    return held_events.with_name("open-events.json")


class OpenEventLedger:
    """The ledger file, with its copy on another filesystem (``fallback_path``) for when the state folder cannot
    be written; not thread-safe (the pipeline's inference thread submits every event)."""

    def __init__(self, path: Path, fallback_path: Path | None = None) -> None:
        self.path = path
        self.fallback_path = fallback_path
        self._open: dict[str, OpenEvent] = {}
        self._kept_aside = False  # the fallback copy exists (or may): it is the newer one

    @property
    def kept_aside(self) -> bool:
        """Whether the ledger lives in its fallback copy now (the state folder could not take it)."""
        return self._kept_aside

    def load(self) -> list[OpenEvent]:
        """The events a previous run left open, oldest first (none when there is no file), from the fallback copy
        when there is one (it was written after the state folder's file).

        Raises ``LedgerError`` naming the file when it cannot be read or is not a ledger.
        """
        loaded: list[OpenEvent] | None = None
        if self.fallback_path is not None:
            loaded = _read(self.fallback_path)
            self._kept_aside = loaded is not None
        if loaded is None:
            loaded = _read(self.path) or []
        self._open = {event.event_id: event for event in loaded}
        return sorted(loaded, key=lambda event: event.started_wall_time_s)

    def record(self, event: Event) -> None:
        """Note a submitted event: a ``start`` opens, an ``end`` closes its start. Raises ``LedgerError``."""
        if event.phase is Phase.START:
            self._open[event.event_id] = OpenEvent(
                event.event_id,
                event.type,
                event.rule,
                event.occupant_id,
                event.seat,
                event.wall_time_s,
                event.severity,
            )
        elif event.start_event_id is None or self._open.pop(event.start_event_id, None) is None:
            return
        self._write()

    @property
    def open_count(self) -> int:
        """Events open now."""
        return len(self._open)

    def _write(self) -> None:
        document: dict[str, Any] = {"format": FORMAT, "open": [asdict(event) for event in self._open.values()]}
        try:
            _write_atomically(self.path, document)
        except OSError as exc:
            if self.fallback_path is None:
                raise LedgerError(f"{self.path}: cannot write the open-event ledger ({exc})") from exc
            try:
                _write_atomically(self.fallback_path, document)
            except OSError as aside:
                raise LedgerError(
                    f"{self.path}: cannot write the open-event ledger ({exc}), nor {self.fallback_path} ({aside})"
                ) from aside
            self._kept_aside = True
            return
        if self._kept_aside and self.fallback_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.fallback_path.unlink()
            self._kept_aside = False


def _read(path: Path) -> list[OpenEvent] | None:
    """The open events a ledger file holds; None when there is no file. Raises ``LedgerError`` naming it."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LedgerError(f"{path}: cannot read the open-event ledger ({exc})") from exc
    try:
        if document.get("format") != FORMAT:
            raise ValueError(f"format {document.get('format')!r}")
        return [OpenEvent(**entry) for entry in document["open"]]
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise LedgerError(f"{path}: not an open-event ledger ({exc})") from exc


def _write_atomically(path: Path, document: dict[str, Any]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as f:
        json.dump(document, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
