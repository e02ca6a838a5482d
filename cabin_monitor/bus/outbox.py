"""Durable event outbox on SQLite.

Every event is written here before it is published and removed only when the
broker acknowledges it, so events survive a lost connection, a crash and a
power cut. The outbox is bounded: when full, the oldest event of the lowest
severity goes first; events older than ``max_age_s`` are dropped. Nothing is
dropped silently: ``put`` and ``expire`` return what they dropped, and the
counters feed the health payload.

When the file cannot be written (the disk is full, the folder was remounted
read-only, an I/O error), events are held in a bounded memory queue instead.
They are handed out by ``pending`` like rows on disk (after them: every event
gets its row id when accepted, so ids follow acceptance order across both), an
``ack`` while an event is still in memory forgets it, and those not yet
acknowledged are written, in order and under the same row ids, once writing
works again (``put`` and ``retry_writes`` try). A delete after delivery that
fails is remembered and retried, and the row is not sent again meanwhile.
``state`` says which of these applies. A file that cannot be opened for writing at start-up (full or
read-only disk) is read instead, where SQLite can read it, and opened for writing once it can be.
With a ``fallback`` file (``cabin_monitor/bus/fallback.py``)
each event held in memory is also kept there, so it survives the process, and the next outbox to
open writes what a previous process left there before anything else.

Beside its bytes each event keeps its ``EventFacts`` (``bus.facts``) in columns of their own. Rows
written before those columns existed have them NULL; their facts are read from the payload when
handed out.

Owns the outbox file; imports ``bus.fallback``, ``bus.facts``, ``messages`` and ``errors``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar, get_args

import structlog

from cabin_monitor.bus.facts import COLUMNS as _FACT_COLUMNS
from cabin_monitor.bus.facts import NO_FACTS, EventFacts, facts_of_payload
from cabin_monitor.bus.fallback import FallbackFile, KeptEvent
from cabin_monitor.errors import ConfigurationError, RuntimeFault
from cabin_monitor.messages import OutboxState, Phase, Severity

log = structlog.get_logger("cabin_monitor.bus.outbox")

SEVERITY_RANK = {name: rank for rank, name in enumerate(get_args(Severity))}
SEVERITY_NAME: dict[int, Severity] = {rank: name for name, rank in SEVERITY_RANK.items()}
DropReason = Literal["full", "expired", "memory_full"]
# Adding nullable columns leaves the file readable by a daemon that does not know them (its queries
# name their columns), so it is no new schema version: a rolled-back daemon keeps its pending events.
SCHEMA_VERSION = 1

# Primary SQLite result codes (the low byte of an extended code).
_SQLITE_PERM, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 3, 5, 6, 8
_SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 10, 11, 13, 14, 26
_DAMAGE_CODES = {_SQLITE_CORRUPT, _SQLITE_NOTADB}
_WRITE_FAULT_CODES = {_SQLITE_PERM, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY, _SQLITE_IOERR}
_WRITE_FAULT_CODES |= {_SQLITE_FULL, _SQLITE_CANTOPEN}
# Small WAL: commits are a few pages each, and a state folder may be a small partition. Without these
# the WAL grows to ~4 MB before its first checkpoint (a 256 KiB folder was full after 8 events).
_WAL_AUTOCHECKPOINT_PAGES = 16
_WAL_SIZE_LIMIT_BYTES = 64 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    -- AUTOINCREMENT: a row id is never reused, so "rows after the last one sent" stays right
    -- even after the newest row was acknowledged and deleted.
    row_id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    severity INTEGER NOT NULL,
    created_wall_s REAL NOT NULL,
    type TEXT,
    phase TEXT,
    rule TEXT,
    occupant_id TEXT,
    seat TEXT,
    start_event_id TEXT
);
CREATE INDEX IF NOT EXISTS outbox_eviction ON outbox (severity, row_id);
CREATE INDEX IF NOT EXISTS outbox_age ON outbox (created_wall_s);
"""
# The facts' columns are added to files written before they existed; NULL in those files' rows.
_BASE_COLUMNS = "row_id, event_id, topic, payload, severity, created_wall_s"
_ROW_COLUMNS = f"{_BASE_COLUMNS}, {', '.join(_FACT_COLUMNS)}"
# The next event to evict: the lowest severity, then ends whose start is no longer here (delivered: without
# them it would never end) last, then the oldest.
_VICTIM = """
SELECT row_id, event_id, severity, created_wall_s, type, phase FROM outbox AS o
ORDER BY severity,
    (phase = 'end' AND start_event_id IS NOT NULL
     AND NOT EXISTS (SELECT 1 FROM outbox AS s WHERE s.event_id = o.start_event_id)),
    row_id
LIMIT 1
"""
# What expires: events older than the cutoff but ends whose start is no longer here (delivered), and the ends
# of expiring starts, however young.
_EXPIRED = """
SELECT row_id, event_id, severity, created_wall_s, type, phase, start_event_id FROM outbox AS o
WHERE (created_wall_s < ?1 AND NOT (phase = 'end' AND start_event_id IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM outbox AS s WHERE s.event_id = o.start_event_id)))
   OR (phase = 'end' AND start_event_id IN (SELECT event_id FROM outbox WHERE phase = 'start' AND created_wall_s < ?1))
ORDER BY row_id
"""
_EXPIRED_WITHOUT_FACTS = (
    "SELECT row_id, event_id, severity, created_wall_s, NULL, NULL, NULL FROM outbox WHERE created_wall_s < ? "
    "ORDER BY row_id"
)
_VICTIM_WITHOUT_FACTS = (
    "SELECT row_id, event_id, severity, created_wall_s, NULL, NULL FROM outbox ORDER BY severity, row_id LIMIT 1"
)
# What a file that could not be given the facts' columns is read with.
_ROW_COLUMNS_WITHOUT_FACTS = f"{_BASE_COLUMNS}, {', '.join('NULL' for _ in _FACT_COLUMNS)}"


class OutboxError(RuntimeFault):
    """The outbox file cannot be opened or used."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        super().__init__(f"outbox {path}: {reason}")


class OutboxContentError(OutboxError):
    """The outbox file opens, but what it holds is damaged or not ours; moving it aside would let a new one start."""


class OutboxNotWritableError(OutboxError):
    """The outbox file or its folder cannot be written (read-only mount, permissions, immutable).

    ``Outbox`` then opens the file for reading and holds new events in memory; the file is left alone:
    what it holds is pending events, not damage.
    """

    exit_code = ConfigurationError.exit_code


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One pending event: the exact bytes to publish and where, and what they say."""

    row_id: int  # increases with acceptance order, on disk and in memory
    event_id: str
    topic: str
    payload: bytes
    severity: Severity
    created_wall_s: float
    facts: EventFacts | None = None  # None: a payload that is not an event


@dataclass(frozen=True, slots=True)
class DroppedEvent:
    """An event the outbox gave up on, for the caller to log."""

    event_id: str
    severity: str
    created_wall_s: float
    reason: DropReason
    type: str | None = None  # the event's type, when the outbox knows it


@dataclass(frozen=True, slots=True)
class _HeldEvent:
    """An event accepted while the file could not be written."""

    row_id: int  # given when accepted; kept when it is written to the file
    event_id: str
    topic: str
    payload: bytes
    rank: int
    created_wall_s: float
    facts: EventFacts | None


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _salvaging(method: Callable[Concatenate[Outbox, _P], _R]) -> Callable[Concatenate[Outbox, _P], _R]:
    """Run ``method``; when SQLite finds the file damaged, replace it by a new one holding its readable rows
    (``Outbox.replace_damaged``) and run ``method`` again."""

    @functools.wraps(method)
    def salvaging(self: Outbox, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            if not _is_damage(exc):
                raise
            self.replace_damaged(str(exc))
        return method(self, *args, **kwargs)

    return salvaging


class Outbox:
    """A bounded, persistent FIFO of events awaiting a broker acknowledgement; safe to share between threads."""

    def __init__(
        self,
        path: Path | str,
        max_events: int = 10000,
        max_age_s: float = 7 * 86400,
        memory_max_events: int = 1000,
        fallback: Path | None = None,
    ) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events}")
        if max_age_s <= 0:
            raise ValueError(f"max_age_s must be > 0, got {max_age_s}")
        if memory_max_events < 1:
            raise ValueError(f"memory_max_events must be >= 1, got {memory_max_events}")
        self.path = Path(path)
        self.max_events = max_events
        self.max_age_s = max_age_s
        self.memory_max_events = memory_max_events
        # One connection shared by the pipeline thread (put) and the MQTT threads (pending, ack),
        # serialised by this lock.
        self._lock = threading.Lock()
        self._dropped: dict[str, int] = {reason: 0 for reason in get_args(DropReason)}
        self._dropped_by_type: dict[str, int] = {}
        # Starts evicted before their end came: that end is refused too (insertion-ordered, bounded).
        self._dropped_starts: dict[str, None] = {}
        self._memory: list[_HeldEvent] = []  # newer than every row on disk, oldest first
        self._undeleted: set[int] = set()  # delivered rows whose DELETE failed
        self._write_fault: sqlite3.Error | None = None  # the last failed write, until writing works again
        # The last row id given out, on disk or in memory: ids are given here, not by SQLite, so that an
        # event held in memory gets one after every row on disk and keeps it once written.
        self._last_row_id = 0
        self._has_fact_columns = True  # False for an older file that could not be given them
        # True while the file could not be opened for writing (start-up on a full or read-only disk): what
        # it holds is read where it can be, new events are held in memory, and opening is retried.
        self._reading_only = False
        self.replaced: list[MovedAside] = []  # files found damaged while running, moved aside
        try:
            self._db = self._open()
        except OutboxContentError:
            raise
        except OutboxError as exc:
            if not _is_open_write_fault(exc):
                raise
            self._db, self._write_fault = self._open_for_reading(), _start_fault(self.path, exc)
            self._reading_only = True
        self._fallback: FallbackFile | None = None
        self._fallback_error: str | None = None
        self._kept: set[str] = set()  # ids of the memory-held events the fallback file keeps
        self.restored_from_fallback = 0  # events a previous process left in the fallback file
        if fallback is not None:
            try:
                self._fallback = FallbackFile(fallback)
                left = self._fallback.events()
            except (OSError, sqlite3.Error) as exc:
                self._fallback, self._fallback_error = None, f"{fallback}: {exc}"
            else:
                self._restore(left)

    def _restore(self, left: list[KeptEvent]) -> None:
        """Take in, oldest first, the events an earlier process kept in the fallback file."""
        self._kept = {event.event_id for event in left}
        for event in left:
            self.put(
                event.event_id,
                event.topic,
                event.payload,
                SEVERITY_NAME[event.rank],
                event.created_wall_s,
                event.facts or facts_of_payload(event.payload),
            )
            with self._lock:
                if not any(held.event_id == event.event_id for held in self._memory):
                    self._forget_kept_locked(event.event_id)
        self.restored_from_fallback = len(left)

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Owner-only whatever the umask: SQLite gives the -wal and -shm files the database's mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            os.chmod(self.path, 0o600)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
        except (OSError, sqlite3.Error) as exc:
            raise _open_error(self.path, exc) from exc
        try:
            # WAL: commits append to the log instead of rewriting pages, and readers never block writers.
            db.execute("PRAGMA journal_mode=WAL")
            # FULL, not NORMAL: in WAL mode NORMAL can lose the last commits on power loss (not on a
            # crash), and a car loses power abruptly. Events are rare (a few a minute), so one fsync
            # per put/ack costs nothing that matters, and a returned put() survives a power cut.
            db.execute("PRAGMA synchronous=FULL")
            db.execute(f"PRAGMA wal_autocheckpoint={_WAL_AUTOCHECKPOINT_PAGES}")
            db.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT_BYTES}")
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise OutboxContentError(self.path, f"the database is damaged ({check}); move it away to start empty")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise OutboxContentError(self.path, f"written by a newer cabin-monitor (schema {version})")
            db.executescript(_SCHEMA)
            self._has_fact_columns = _add_fact_columns(db)
            if version != SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._last_row_id = db.execute(
                "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0), "
                "COALESCE((SELECT MAX(row_id) FROM outbox), 0))"
            ).fetchone()[0]
        except sqlite3.Error as exc:
            db.close()
            if _is_damage(exc):
                raise OutboxContentError(
                    self.path, f"not a usable SQLite outbox ({exc}); move it away to start with an empty outbox"
                ) from exc
            raise _open_error(self.path, exc) from exc
        except OutboxError:
            db.close()
            raise
        return db

    def replace_damaged(self, reason: str) -> MovedAside:
        """The file turned out damaged while running: move it aside and go on with a new one holding the rows that
        can still be read, under their own row ids (so the sender's window stays right). Logged."""
        with self._lock:
            self._db.close()
            aside = _move_aside(self.path)
            last_row_id = self._last_row_id
            self._db = self._open()
            self._last_row_id = max(last_row_id, self._last_row_id)
            salvaged = salvage(aside, self.max_events)
            columns = _ROW_COLUMNS if self._has_fact_columns else _BASE_COLUMNS
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                for item in salvaged:
                    values: tuple[object, ...] = (
                        item.row_id,
                        item.event_id,
                        item.topic,
                        item.payload,
                        SEVERITY_RANK[item.severity],
                        item.created_wall_s,
                    )
                    if self._has_fact_columns:
                        values += NO_FACTS if item.facts is None else item.facts.columns()
                    self._db.execute(
                        f"INSERT OR IGNORE INTO outbox ({columns}) VALUES ({', '.join('?' * len(values))})", values
                    )
            self._undeleted &= {item.row_id for item in salvaged}
            moved = MovedAside(aside, reason, len(salvaged))
            self.replaced.append(moved)
        log.error(
            "outbox file damaged while running; moved aside, its readable rows taken into a new one",
            path=str(self.path),
            moved_to=str(aside),
            reason=reason,
            salvaged=len(salvaged),
        )
        return moved

    def _open_for_reading(self) -> sqlite3.Connection:
        """A connection that only reads the file (or, when it cannot be read, an empty stand-in); writes through it
        fail as write faults, so events go to memory and deletes wait, as when a disk fills mid-run."""
        wal = Path(f"{self.path}-wal")
        # Without a WAL to take in, an immutable connection reads the file as it is and needs no -shm.
        no_wal = not wal.exists() or wal.stat().st_size == 0
        for query in ("mode=ro&immutable=1",) if no_wal else ("mode=ro",):
            db: sqlite3.Connection | None = None
            try:
                db = sqlite3.connect(f"{self.path.resolve().as_uri()}?{query}", uri=True, check_same_thread=False)
                db.isolation_level = None
                present = {row[1] for row in db.execute("PRAGMA table_info(outbox)").fetchall()}
                if present:
                    self._has_fact_columns = all(column in present for column in _FACT_COLUMNS)
                    self._last_row_id = db.execute("SELECT COALESCE(MAX(row_id), 0) FROM outbox").fetchone()[0]
                    db.execute("PRAGMA query_only=1")
                    return db
            except (OSError, sqlite3.Error):
                pass
            if db is not None:
                db.close()
        # Nothing readable: ids given now must come after any the file holds, once it can be read.
        self._last_row_id = int(time.time() * 1000)
        db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        db.executescript(_SCHEMA)
        db.execute("PRAGMA query_only=1")
        return db

    def _reopen_locked(self) -> bool:
        """While only reading: open the file for writing again; whether it worked (the fault stays if not)."""
        if not self._reading_only:
            return True
        last_row_id = self._last_row_id
        try:
            db = self._open()
        except OutboxError:
            self._last_row_id = last_row_id
            return False
        self._db.close()
        self._db, self._reading_only = db, False
        self._last_row_id = max(last_row_id, self._last_row_id)
        return True

    @_salvaging
    def put(
        self,
        event_id: str,
        topic: str,
        payload: bytes,
        severity: str,
        created_wall_s: float,
        facts: EventFacts | None = None,
    ) -> list[DroppedEvent]:
        """Store an event (a no-op if ``event_id`` is already held); returns the events dropped to make room.

        The returned list may contain this very event: when it has expired already, or when the outbox
        is full of events more severe than it. While the file cannot be written the event is held in
        memory (see ``state``), handed out by ``pending`` meanwhile, and written before any later event.
        """
        rank = _rank(severity)
        with self._lock:
            if any(held.event_id == event_id for held in self._memory):
                return []
            self._last_row_id += 1
            event = _HeldEvent(self._last_row_id, event_id, topic, payload, rank, created_wall_s, facts)
            dropped = self._retry_locked(probe=False)  # with nothing held, this event's own insert is the probe
            if not self._memory and not self._reading_only:
                try:
                    dropped += self._insert_locked(event)
                    self._count(dropped)
                    return dropped
                except sqlite3.Error as exc:
                    if not _is_write_fault(exc):
                        raise
                    self._write_fault = exc
            if self._on_disk_locked(event_id):
                self._count(dropped)
                return dropped
            dropped += self._hold_locked(event)
            self._count(dropped)
        return dropped

    def _insert_locked(self, event: _HeldEvent) -> list[DroppedEvent]:
        """Write one event in one transaction; raises ``sqlite3.Error`` (rolled back) if it cannot be written."""
        now = time.time()
        dropped: list[DroppedEvent] = []
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if self._db.execute("SELECT 1 FROM outbox WHERE event_id = ?", (event.event_id,)).fetchone():
                return []
            dropped += self._expire_locked(now)
            refused: DropReason | None = None
            if event.created_wall_s < now - self.max_age_s:
                refused = "expired"
            elif event.facts is not None and self._dropped_starts.pop(event.facts.start_event_id or "", 1) is None:
                refused = "full"  # its start was evicted: an end alone would end nothing the receiver has
            else:
                evicted, fits = self._make_room_locked(event.rank)
                dropped += evicted
                refused = None if fits else "full"
            if refused is None:
                values: tuple[object, ...] = (
                    event.row_id,
                    event.event_id,
                    event.topic,
                    event.payload,
                    event.rank,
                    event.created_wall_s,
                )
                if self._has_fact_columns:
                    values += NO_FACTS if event.facts is None else event.facts.columns()
                columns = _ROW_COLUMNS if self._has_fact_columns else _BASE_COLUMNS
                self._db.execute(f"INSERT INTO outbox ({columns}) VALUES ({', '.join('?' * len(values))})", values)
            else:
                dropped.append(_dropped(event, refused))
                self._note_dropped_start_locked(event)
        return dropped

    def _on_disk_locked(self, event_id: str) -> bool:
        """Whether the file holds ``event_id`` (False when it cannot even be read: holding a copy is the safe side)."""
        try:
            return self._db.execute("SELECT 1 FROM outbox WHERE event_id = ?", (event_id,)).fetchone() is not None
        except sqlite3.Error:
            return False

    def _hold_locked(self, event: _HeldEvent) -> list[DroppedEvent]:
        """Keep an event in memory, evicting like the file does: the oldest of the lowest severity first."""
        if event.created_wall_s < time.time() - self.max_age_s:
            self._forget_kept_locked(event.event_id)
            return [_dropped(event, "expired")]
        if _end_of(event) is not None and self._dropped_starts.pop(_end_of(event) or "", 1) is None:
            self._forget_kept_locked(event.event_id)
            return [_dropped(event, "memory_full")]  # its start was dropped: pairs go together
        if len(self._memory) < self.memory_max_events:
            self._memory.append(event)
            self._keep_locked(event)
            return []
        held_ids = {held.event_id for held in self._memory}

        def last_to_go(held: _HeldEvent) -> bool:
            start = _end_of(held)
            return start is not None and start not in held_ids and not self._on_disk_locked(start)

        # The lowest severity, ends of delivered starts last, the oldest (min() keeps the first).
        victim = min(self._memory, key=lambda held: (held.rank, last_to_go(held)))
        if event.rank < victim.rank:
            self._forget_kept_locked(event.event_id)
            self._note_dropped_start_locked(event)
            return [_dropped(event, "memory_full")]
        gone = [victim, *(held for held in self._memory if _end_of(held) == victim.event_id)]
        for held in gone:
            self._memory.remove(held)
            self._forget_kept_locked(held.event_id)
        if len(gone) == 1:
            self._note_dropped_start_locked(victim)
        self._memory.append(event)
        self._keep_locked(event)
        return [_dropped(held, "memory_full") for held in gone]

    def _note_dropped_start_locked(self, event: _HeldEvent) -> None:
        """A start dropped before its end came: that end is refused when it comes (bounded memory of them)."""
        if event.facts is None or event.facts.phase is not Phase.START:
            return
        self._dropped_starts[event.event_id] = None
        while len(self._dropped_starts) > self.max_events:
            del self._dropped_starts[next(iter(self._dropped_starts))]

    def _keep_locked(self, event: _HeldEvent) -> None:
        """Keep a memory-held event in the fallback file too, if there is one that works."""
        if self._fallback is None or event.event_id in self._kept:
            return
        try:
            self._fallback.add(
                KeptEvent(event.event_id, event.topic, event.payload, event.rank, event.created_wall_s, event.facts)
            )
        except (OSError, sqlite3.Error) as exc:
            self._fallback_error = f"{self._fallback.path}: {exc}"
            return
        self._fallback_error = None
        self._kept.add(event.event_id)

    def _forget_kept_locked(self, event_id: str) -> None:
        """Remove an event from the fallback file once it is delivered, written to the outbox file or dropped."""
        if self._fallback is None or event_id not in self._kept:
            return
        try:
            self._fallback.remove(event_id)
        except (OSError, sqlite3.Error) as exc:
            # Left there, it is taken in again at the next start; the outbox file's unique event ids
            # and the receivers' event_id keep that from doubling a delivered event's effect.
            self._fallback_error = f"{self._fallback.path}: {exc}"
            return
        self._kept.discard(event_id)

    @_salvaging
    def retry_writes(self) -> list[DroppedEvent]:
        """Retry failed deletes and write what is held in memory (with nothing held, a probe write), so that
        ``state`` turns ``ok`` once the file takes writes again; returns the events dropped to make room."""
        with self._lock:
            dropped = self._retry_locked(probe=True)
            self._count(dropped)
        return dropped

    def _retry_locked(self, probe: bool) -> list[DroppedEvent]:
        """Retry failed deletes, then write what memory holds; with ``probe`` and nothing to write, write a probe."""
        if self._write_fault is None or not self._reopen_locked():
            return []
        dropped: list[DroppedEvent] = []
        try:
            if probe and not self._undeleted and not self._memory:
                # Everything held in memory was delivered from there: only a write can tell whether the
                # file takes one again (setting user_version, even to its value, writes a page).
                with self._db:
                    self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            for row_id in sorted(self._undeleted):
                with self._db:
                    self._db.execute("DELETE FROM outbox WHERE row_id = ?", (row_id,))
                self._undeleted.discard(row_id)
            while self._memory:
                dropped += self._insert_locked(self._memory[0])
                self._forget_kept_locked(self._memory.pop(0).event_id)
        except sqlite3.Error as exc:
            if not _is_write_fault(exc):
                raise
            self._write_fault = exc
            return dropped
        self._write_fault = None
        return dropped

    def _make_room_locked(self, rank: int) -> tuple[list[DroppedEvent], bool]:
        """Evict until one more event fits; returns the evicted and False if the newcomer should go instead.

        Pairs go together: a start is evicted with its end (and its end, still to come, refused: see
        ``_dropped_starts``); an end whose start was delivered already goes only when nothing else of its
        severity is left, since without it that start would never end.
        """
        evicted: list[DroppedEvent] = []
        depth: int = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        while depth >= self.max_events:
            victim = self._db.execute(_VICTIM if self._has_fact_columns else _VICTIM_WITHOUT_FACTS).fetchone()
            if rank < victim[2]:
                # Everything held matters more than the newcomer: keep them all and refuse it.
                return evicted, False
            row_id, event_id, severity, created_wall_s, event_type, phase = victim
            self._db.execute("DELETE FROM outbox WHERE row_id = ?", (row_id,))
            evicted.append(DroppedEvent(event_id, SEVERITY_NAME[severity], created_wall_s, "full", event_type))
            depth -= 1
            if phase == Phase.START.value:
                ends = self._db.execute(
                    "SELECT row_id, event_id, severity, created_wall_s, type FROM outbox WHERE start_event_id = ?",
                    (event_id,),
                ).fetchall()
                for end in ends:
                    self._db.execute("DELETE FROM outbox WHERE row_id = ?", (end[0],))
                    evicted.append(DroppedEvent(end[1], SEVERITY_NAME[end[2]], end[3], "full", end[4]))
                    depth -= 1
                if not ends:
                    self._dropped_starts[event_id] = None
                    while len(self._dropped_starts) > self.max_events:
                        del self._dropped_starts[next(iter(self._dropped_starts))]
        return evicted, True

    @_salvaging
    def pending(self, limit: int, after_row_id: int = 0) -> list[OutboxItem]:
        """Up to ``limit`` events with ``row_id > after_row_id``, oldest first: those on disk, then those in memory."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_ROW_COLUMNS if self._has_fact_columns else _ROW_COLUMNS_WITHOUT_FACTS} FROM outbox "
                "WHERE row_id > ? ORDER BY row_id LIMIT ?",
                (after_row_id, limit + len(self._undeleted)),
            ).fetchall()
            items = [_row_item(r) for r in rows if r[0] not in self._undeleted][:limit]
            for held in self._memory:
                if len(items) >= limit:
                    break
                if held.row_id > after_row_id:
                    items.append(_item(held))
        return items

    @_salvaging
    def ack(self, row_id: int) -> bool:
        """Remove a delivered event; False if it was no longer held (already acked, evicted or expired).

        An event still in memory is forgotten: it is never written to the file. A delete that cannot be
        written is retried later; the row is not handed out by ``pending`` meanwhile.
        """
        with self._lock:
            for index, held in enumerate(self._memory):
                if held.row_id == row_id:
                    del self._memory[index]
                    self._forget_kept_locked(held.event_id)
                    return True
            if row_id in self._undeleted:
                return False
            if self._reading_only:
                self._undeleted.add(row_id)
                return True
            try:
                with self._db:
                    return self._db.execute("DELETE FROM outbox WHERE row_id = ?", (row_id,)).rowcount == 1
            except sqlite3.Error as exc:
                if not _is_write_fault(exc):
                    raise
                self._write_fault = exc
                self._undeleted.add(row_id)
                return True

    @_salvaging
    def expire(self, now_wall_s: float | None = None) -> list[DroppedEvent]:
        """Drop events older than ``max_age_s`` (on disk and in memory); returns them.

        Pairs go together, as in eviction: a start expires with its end, however young, and an end still to
        come is refused; an end whose start was delivered never expires (without it that start would never
        end for the receiver), and goes only when room is needed.
        """
        now = time.time() if now_wall_s is None else now_wall_s
        with self._lock:
            dropped: list[DroppedEvent] = []
            if not self._reading_only:  # else the file's rows expire once it can be written
                try:
                    with self._db:
                        self._db.execute("BEGIN IMMEDIATE")
                        dropped = self._expire_locked(now)
                except sqlite3.Error as exc:
                    if not _is_write_fault(exc):
                        raise
                    self._write_fault = exc  # tried again at the next expiry
            dropped += self._expire_memory_locked(now - self.max_age_s)
            self._count(dropped)
        return dropped

    def _expire_memory_locked(self, cutoff_wall_s: float) -> list[DroppedEvent]:
        expired_starts = {
            held.event_id
            for held in self._memory
            if held.created_wall_s < cutoff_wall_s and held.facts is not None and held.facts.phase is Phase.START
        }
        held_ids = {held.event_id for held in self._memory}

        def goes(held: _HeldEvent) -> bool:
            start = _end_of(held)
            if start is not None and (start in expired_starts or self._dropped_starts.pop(start, 1) is None):
                return True  # the end of a start that went
            delivered = start is not None and start not in held_ids and not self._on_disk_locked(start)
            return held.created_wall_s < cutoff_wall_s and not delivered

        gone = [held for held in self._memory if goes(held)]
        ended = {_end_of(held) for held in gone}
        for held in gone:
            self._memory.remove(held)
            self._forget_kept_locked(held.event_id)
            if held.event_id not in ended:
                self._note_dropped_start_locked(held)
        return [_dropped(held, "expired") for held in gone]

    def _expire_locked(self, now_wall_s: float) -> list[DroppedEvent]:
        # Wall-clock ages: a clock set backwards only delays expiry; one set forwards (first NTP sync
        # after a dead RTC) can expire events early, which is counted like any other expiry.
        cutoff = now_wall_s - self.max_age_s
        # SELECT then DELETE rather than DELETE ... RETURNING, which needs SQLite 3.35 (Debian 11 has 3.34).
        rows = self._db.execute(_EXPIRED if self._has_fact_columns else _EXPIRED_WITHOUT_FACTS, (cutoff,)).fetchall()
        self._db.executemany("DELETE FROM outbox WHERE row_id = ?", [(r[0],) for r in rows])
        ended = {r[6] for r in rows if r[5] == Phase.END.value}
        for r in rows:
            if r[5] == Phase.START.value and r[1] not in ended:
                self._dropped_starts[r[1]] = None  # its end, when it comes, is refused
        while len(self._dropped_starts) > self.max_events:
            del self._dropped_starts[next(iter(self._dropped_starts))]
        return [
            DroppedEvent(r[1], SEVERITY_NAME[r[2]], r[3], "expired", r[4]) for r in rows if r[0] not in self._undeleted
        ]

    def _count(self, dropped: list[DroppedEvent]) -> None:
        for d in dropped:
            self._dropped[d.reason] += 1
            kind = d.type or "unknown"
            self._dropped_by_type[kind] = self._dropped_by_type.get(kind, 0) + 1

    @_salvaging
    def depth(self) -> int:
        """Events held, on disk and in memory."""
        with self._lock:
            if self._undeleted:
                rows = {r[0] for r in self._db.execute("SELECT row_id FROM outbox").fetchall()}
                on_disk = len(rows - self._undeleted)
            else:
                on_disk = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
            return on_disk + len(self._memory)

    @property
    def state(self) -> OutboxState:
        """``OK``; ``DISK_FULL`` or ``UNWRITABLE`` from a failed write until a write works again."""
        with self._lock:
            fault = self._write_fault
        if fault is None:
            return OutboxState.OK
        if _primary_code(fault) == _SQLITE_FULL or "disk is full" in str(fault):
            return OutboxState.DISK_FULL
        return OutboxState.UNWRITABLE

    @property
    def write_error(self) -> str | None:
        """What the last failed write said, while ``state`` is not ``ok``."""
        with self._lock:
            return None if self._write_fault is None else str(self._write_fault)

    @property
    def memory_depth(self) -> int:
        """Events held in memory because the file could not be written."""
        with self._lock:
            return len(self._memory)

    @property
    def memory_event_ids(self) -> list[str]:
        """The ids of the events held in memory, oldest first."""
        with self._lock:
            return [held.event_id for held in self._memory]

    @property
    def unkept_event_ids(self) -> list[str]:
        """The ids of the memory-held events that no fallback file keeps, oldest first: lost if the process
        ends before they are written or acknowledged."""
        with self._lock:
            return [held.event_id for held in self._memory if held.event_id not in self._kept]

    @property
    def fallback_path(self) -> Path | None:
        """The fallback file in use, if any."""
        return None if self._fallback is None else self._fallback.path

    @property
    def fallback_error(self) -> str | None:
        """Why the fallback file could not be opened or last failed to keep or forget an event."""
        with self._lock:
            return self._fallback_error

    @property
    def dropped_total(self) -> int:
        """Events dropped since this object was created."""
        with self._lock:
            return sum(self._dropped.values())

    @property
    def dropped_by_reason(self) -> dict[str, int]:
        """``{"full": n, "expired": m, "memory_full": k}`` since this object was created."""
        with self._lock:
            return dict(self._dropped)

    @property
    def dropped_by_type(self) -> dict[str, int]:
        """Events dropped since this object was created, per event type (``unknown`` for rows without facts)."""
        with self._lock:
            return dict(self._dropped_by_type)

    def close(self) -> None:
        """Close the database (and the fallback file); what is pending there stays for the next start."""
        with self._lock:
            self._db.close()
            if self._fallback is not None:
                self._fallback.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _rank(severity: str) -> int:
    try:
        return SEVERITY_RANK[severity]
    except KeyError:
        raise ValueError(f"severity must be one of {sorted(SEVERITY_RANK)}, got {severity!r}") from None


def _end_of(event: _HeldEvent) -> str | None:
    """The start's ``event_id`` when ``event`` is an end, else None."""
    if event.facts is None or event.facts.phase is not Phase.END:
        return None
    return event.facts.start_event_id


def _dropped(event: _HeldEvent, reason: DropReason) -> DroppedEvent:
    event_type = None if event.facts is None else event.facts.type
    return DroppedEvent(event.event_id, SEVERITY_NAME[event.rank], event.created_wall_s, reason, event_type)


def _item(event: _HeldEvent) -> OutboxItem:
    return OutboxItem(
        event.row_id,
        event.event_id,
        event.topic,
        event.payload,
        SEVERITY_NAME[event.rank],
        event.created_wall_s,
        event.facts,
    )


def _row_item(row: tuple[Any, ...]) -> OutboxItem:
    """The item of a row selected as ``_ROW_COLUMNS``."""
    payload = bytes(row[3])
    # NULL facts: a row written before they had columns (or not an event).
    facts = EventFacts.from_columns(row[6:]) or facts_of_payload(payload)
    return OutboxItem(row[0], row[1], row[2], payload, SEVERITY_NAME[row[4]], row[5], facts)


def _add_fact_columns(db: sqlite3.Connection) -> bool:
    """Give a file written before the facts had columns those columns (NULL in its rows), in one transaction;
    False when it cannot be written now.

    Such a file (full disk, read-only) opens as before and gets them at a later start: until then its
    rows' facts, and those of events written meanwhile, are read from their payloads.
    """
    present = {row[1] for row in db.execute("PRAGMA table_info(outbox)").fetchall()}
    missing = [column for column in _FACT_COLUMNS if column not in present]
    if not missing:
        return True
    try:
        db.execute("BEGIN IMMEDIATE")
        for column in missing:
            db.execute(f"ALTER TABLE outbox ADD COLUMN {column} TEXT")
        db.execute("COMMIT")
    except sqlite3.Error as exc:
        if db.in_transaction:
            db.execute("ROLLBACK")
        if not _is_write_fault(exc):
            raise
        return False
    return True


def _primary_code(exc: sqlite3.Error) -> int | None:
    code: int | None = getattr(exc, "sqlite_errorcode", None)  # Python >= 3.11
    return None if code is None else code & 0xFF


def _is_damage(exc: sqlite3.Error) -> bool:
    """Whether SQLite says the file itself is damaged or not a database (and not that it cannot be written)."""
    code = _primary_code(exc)
    if code is not None:
        return code in _DAMAGE_CODES
    text = str(exc)
    return "not a database" in text or "malformed" in text


def _is_write_fault(exc: sqlite3.Error) -> bool:
    """Whether a failed write is the environment's doing (full, read-only, I/O, locked), so worth retrying."""
    code = _primary_code(exc)
    if code is not None:
        return code in _WRITE_FAULT_CODES
    text = str(exc)
    return any(s in text for s in ("disk is full", "readonly", "disk I/O", "unable to open", "locked"))


def _open_error(path: Path, exc: OSError | sqlite3.Error) -> OutboxError:
    """The error for an outbox that cannot be opened, naming the file or folder at fault and why."""
    folder = path.parent
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    code = exc.errno if isinstance(exc, OSError) else None
    if code == errno.ENOSPC or (isinstance(exc, sqlite3.Error) and _primary_code(exc) == _SQLITE_FULL):
        return OutboxError(path, f"no space left in {folder} ({reason}); free some space there")
    writable_hint = "make it writable or point state_dir / outbox.path elsewhere"
    if _read_only_mount(folder):
        return OutboxNotWritableError(path, f"the folder {folder} is read-only ({reason}); {writable_hint}")
    if folder.is_dir() and not os.access(folder, os.W_OK):
        return OutboxNotWritableError(path, f"the folder {folder} is not writable ({reason}); {writable_hint}")
    if path.is_file() and (_read_only_mount(path) or not os.access(path, os.W_OK)):
        return OutboxNotWritableError(
            path, f"the file is not writable (read-only mount, immutable or permissions: {reason}); {writable_hint}"
        )
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutboxNotWritableError(path, f"cannot write it ({reason}); {writable_hint}")
    return OutboxError(path, f"cannot open: {reason}")


def _is_open_write_fault(exc: OutboxError) -> bool:
    """Whether an outbox could not be opened because its disk is full or cannot be written (not damage)."""
    if isinstance(exc, OutboxNotWritableError):
        return True
    cause = exc.__cause__
    if isinstance(cause, sqlite3.Error):
        return _is_write_fault(cause)
    return isinstance(cause, OSError) and cause.errno in (
        errno.ENOSPC,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.EIO,
    )


def _start_fault(path: Path, exc: OutboxError) -> sqlite3.Error:
    """The write fault an outbox that could not be opened for writing reports (``state``, ``write_error``)."""
    try:
        full = os.statvfs(path.parent).f_bavail == 0
    except OSError:
        full = False
    # "disk is full" is what ``state`` reads as DISK_FULL, as SQLite's own message for a full disk.
    return sqlite3.OperationalError(f"database or disk is full: {exc}" if full else str(exc))


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class MovedAside:
    """A damaged outbox file that ``open_outbox`` moved out of the way, and why."""

    moved_to: Path
    reason: str
    salvaged: int = 0  # readable rows taken from it into the new outbox


def open_outbox(
    path: Path, max_events: int, max_age_s: float, memory_max_events: int = 1000, fallback: Path | None = None
) -> tuple[Outbox, MovedAside | None]:
    """Open the outbox; a file SQLite says is damaged or foreign is moved aside (and returned), a new one started
    with the rows that can still be read from it (``salvage``), in their order.

    A daemon that refused to start over a damaged file would be restarted into the same
    refusal forever; the moved file is kept for a closer look. A file or
    folder that cannot be written or a full disk is never a reason to move pending events aside: the
    outbox then opens reading what it can (``state`` says why), as ``Outbox`` does.
    """
    try:
        return Outbox(path, max_events, max_age_s, memory_max_events, fallback), None
    except OutboxContentError as exc:
        reason = str(exc)
    aside = _move_aside(path)
    outbox = Outbox(path, max_events, max_age_s, memory_max_events, fallback)
    salvaged = salvage(aside, max_events)
    for item in salvaged:
        outbox.put(item.event_id, item.topic, item.payload, item.severity, item.created_wall_s, item.facts)
    return outbox, MovedAside(aside, reason, len(salvaged))


def _move_aside(path: Path) -> Path:
    """Move the outbox file (with its -wal and -shm) out of the way; where it went."""
    aside = path.with_name(f"{path.name}.unusable-{time.strftime('%Y%m%dT%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        candidate = Path(f"{path}{suffix}")
        if candidate.exists():
            candidate.rename(Path(f"{aside}{suffix}"))
    return aside


def salvage(path: Path, max_events: int) -> list[OutboxItem]:
    """The rows of a damaged outbox file that can still be read, oldest first (none when nothing can).

    A whole scan first; when a damaged page stops it, each row id between the lowest and the highest is
    looked up on its own (a lookup only reads the pages on its way), at most ``SALVAGE_SPAN`` times
    ``max_events`` of them.
    """
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return []
    try:
        columns = _salvage_columns(db)
        if columns is None:
            return []
        try:
            rows = db.execute(f"SELECT {columns} FROM outbox ORDER BY row_id").fetchall()
        except sqlite3.Error:
            rows = _rows_one_by_one(db, columns, max_events * SALVAGE_SPAN)
        return [item for item in map(_salvaged_item, rows) if item is not None]
    finally:
        db.close()


SALVAGE_SPAN = 10  # row ids looked up one by one, per event the outbox may hold


def _salvage_columns(db: sqlite3.Connection) -> str | None:
    try:
        present = {row[1] for row in db.execute("PRAGMA table_info(outbox)").fetchall()}
    except sqlite3.Error:
        return None
    if not present:
        return None
    return _ROW_COLUMNS if all(column in present for column in _FACT_COLUMNS) else _ROW_COLUMNS_WITHOUT_FACTS


def _rows_one_by_one(db: sqlite3.Connection, columns: str, most: int) -> list[tuple[Any, ...]]:
    bounds: list[int] = []
    for query in ("SELECT MIN(row_id) FROM outbox", "SELECT MAX(row_id) FROM outbox"):
        with contextlib.suppress(sqlite3.Error):
            bounds.append(db.execute(query).fetchone()[0])
    if len(bounds) < 2 or bounds[0] is None or bounds[1] is None:
        return []
    low, high = bounds[0], min(bounds[1], bounds[0] + most)
    rows = []
    for row_id in range(low, high + 1):
        try:
            row = db.execute(f"SELECT {columns} FROM outbox WHERE row_id = ?", (row_id,)).fetchone()
        except sqlite3.Error:
            continue
        if row is not None:
            rows.append(row)
    return rows


def _salvaged_item(row: tuple[Any, ...]) -> OutboxItem | None:
    """The item of a salvaged row, or None when what it holds is not a usable row (damage that still reads)."""
    try:
        if not isinstance(row[1], str) or not isinstance(row[2], str) or row[4] not in SEVERITY_NAME:
            return None
        return _row_item(row)
    except (TypeError, ValueError):
        return None
