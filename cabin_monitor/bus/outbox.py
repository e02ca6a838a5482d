"""Durable event outbox on SQLite.

Every event is written here before it is published and removed only when the
broker acknowledges it, so events survive a lost connection, a crash and a
power cut. The outbox is bounded: when full, the oldest event of the lowest
severity goes first; events older than ``max_age_s`` are dropped. Nothing is
dropped silently: ``put`` and ``expire`` return what they dropped, and the
counters feed the health payload.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, get_args

from cabin_monitor.errors import RuntimeFault
from cabin_monitor.messages import Severity

SEVERITY_RANK = {name: rank for rank, name in enumerate(get_args(Severity))}
SEVERITY_NAME = {rank: name for name, rank in SEVERITY_RANK.items()}
DropReason = Literal["full", "expired"]
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    -- AUTOINCREMENT: a row id is never reused, so "rows after the last one sent" stays right
    -- even after the newest row was acknowledged and deleted.
    row_id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    severity INTEGER NOT NULL,
    created_wall_s REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_eviction ON outbox (severity, row_id);
CREATE INDEX IF NOT EXISTS outbox_age ON outbox (created_wall_s);
"""


class OutboxError(RuntimeFault):
    """The outbox file cannot be opened or used."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        super().__init__(f"outbox {path}: {reason}")


class OutboxContentError(OutboxError):
    """The outbox file opens, but what it holds is damaged or not ours; moving it aside would let a new one start."""


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One pending event: the exact bytes to publish and where."""

    row_id: int  # increases with insertion order
    event_id: str
    topic: str
    payload: bytes
    severity: str
    created_wall_s: float


@dataclass(frozen=True, slots=True)
class DroppedEvent:
    """An event the outbox gave up on, for the caller to log."""

    event_id: str
    severity: str
    created_wall_s: float
    reason: DropReason


class Outbox:
    """A bounded, persistent FIFO of events awaiting a broker acknowledgement; safe to share between threads."""

    def __init__(self, path: Path | str, max_events: int = 10000, max_age_s: float = 7 * 86400) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events}")
        if max_age_s <= 0:
            raise ValueError(f"max_age_s must be > 0, got {max_age_s}")
        self.path = Path(path)
        self.max_events = max_events
        self.max_age_s = max_age_s
        # One connection shared by the pipeline thread (put) and the MQTT threads (pending, ack),
        # serialised by this lock.
        self._lock = threading.Lock()
        self._dropped: dict[str, int] = {"full": 0, "expired": 0}
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Owner-only whatever the umask: SQLite gives the -wal and -shm files the database's mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            os.chmod(self.path, 0o600)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(self.path, f"cannot open: {exc}") from exc
        try:
            # WAL: commits append to the log instead of rewriting pages, and readers never block writers.
            db.execute("PRAGMA journal_mode=WAL")
            # FULL, not NORMAL: in WAL mode NORMAL can lose the last commits on power loss (not on a
            # crash), and a car loses power abruptly. Events are rare (a few a minute), so one fsync
            # per put/ack costs nothing that matters, and a returned put() survives a power cut.
            db.execute("PRAGMA synchronous=FULL")
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise OutboxContentError(self.path, f"the database is damaged ({check}); move it away to start empty")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise OutboxContentError(self.path, f"written by a newer cabin-monitor (schema {version})")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            db.close()
            raise OutboxContentError(
                self.path, f"not a usable SQLite outbox ({exc}); move it away to start with an empty outbox"
            ) from exc
        except OutboxError:
            db.close()
            raise
        return db

    def put(
        self, event_id: str, topic: str, payload: bytes, severity: str, created_wall_s: float
    ) -> list[DroppedEvent]:
        """Store an event (a no-op if ``event_id`` is already held); returns the events dropped to make room.

        The returned list may contain this very event: when it has expired already, or when the outbox
        is full of events more severe than it.
        """
        rank = _rank(severity)
        now = time.time()
        dropped: list[DroppedEvent] = []
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if self._db.execute("SELECT 1 FROM outbox WHERE event_id = ?", (event_id,)).fetchone():
                return []
            dropped += self._expire_locked(now)
            refused: DropReason | None = None
            if created_wall_s < now - self.max_age_s:
                refused = "expired"
            else:
                evicted, fits = self._make_room_locked(rank)
                dropped += evicted
                refused = None if fits else "full"
            if refused is None:
                self._db.execute(
                    "INSERT INTO outbox (event_id, topic, payload, severity, created_wall_s) VALUES (?, ?, ?, ?, ?)",
                    (event_id, topic, payload, rank, created_wall_s),
                )
            else:
                dropped.append(DroppedEvent(event_id, severity, created_wall_s, refused))
            self._count(dropped)
        return dropped

    def _make_room_locked(self, rank: int) -> tuple[list[DroppedEvent], bool]:
        """Evict until one more event fits; returns the evicted and False if the newcomer should go instead."""
        evicted: list[DroppedEvent] = []
        depth: int = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        while depth >= self.max_events:
            victim = self._db.execute(
                "SELECT row_id, event_id, severity, created_wall_s FROM outbox ORDER BY severity, row_id LIMIT 1"
            ).fetchone()
            if rank < victim[2]:
                # Everything held matters more than the newcomer: keep them all and refuse it.
                return evicted, False
            self._db.execute("DELETE FROM outbox WHERE row_id = ?", (victim[0],))
            evicted.append(DroppedEvent(victim[1], SEVERITY_NAME[victim[2]], victim[3], "full"))
            depth -= 1
        return evicted, True

    def pending(self, limit: int, after_row_id: int = 0) -> list[OutboxItem]:
        """Up to ``limit`` events with ``row_id > after_row_id``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT row_id, event_id, topic, payload, severity, created_wall_s FROM outbox "
                "WHERE row_id > ? ORDER BY row_id LIMIT ?",
                (after_row_id, limit),
            ).fetchall()
        return [OutboxItem(r[0], r[1], r[2], bytes(r[3]), SEVERITY_NAME[r[4]], r[5]) for r in rows]

    def ack(self, row_id: int) -> bool:
        """Remove a delivered event; False if it was no longer held (already acked, evicted or expired)."""
        with self._lock, self._db:
            return self._db.execute("DELETE FROM outbox WHERE row_id = ?", (row_id,)).rowcount == 1

    def expire(self, now_wall_s: float | None = None) -> list[DroppedEvent]:
        """Drop events older than ``max_age_s``; returns them."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            dropped = self._expire_locked(time.time() if now_wall_s is None else now_wall_s)
            self._count(dropped)
        return dropped

    def _expire_locked(self, now_wall_s: float) -> list[DroppedEvent]:
        # Wall-clock ages: a clock set backwards only delays expiry; one set forwards (first NTP sync
        # after a dead RTC) can expire events early, which is counted like any other expiry.
        cutoff = now_wall_s - self.max_age_s
        # SELECT then DELETE rather than DELETE ... RETURNING, which needs SQLite 3.35 (Debian 11 has 3.34).
        rows = self._db.execute(
            "SELECT event_id, severity, created_wall_s FROM outbox WHERE created_wall_s < ? ORDER BY row_id", (cutoff,)
        ).fetchall()
        if rows:
            self._db.execute("DELETE FROM outbox WHERE created_wall_s < ?", (cutoff,))
        return [DroppedEvent(r[0], SEVERITY_NAME[r[1]], r[2], "expired") for r in rows]

    def _count(self, dropped: list[DroppedEvent]) -> None:
        for d in dropped:
            self._dropped[d.reason] += 1

    def depth(self) -> int:
        """Events held."""
        with self._lock:
            count: int = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        return count

    @property
    def dropped_total(self) -> int:
        """Events dropped since this object was created."""
        with self._lock:
            return sum(self._dropped.values())

    @property
    def dropped_by_reason(self) -> dict[str, int]:
        """``{"full": n, "expired": m}`` since this object was created."""
        with self._lock:
            return dict(self._dropped)

    def close(self) -> None:
        """Close the database; what is pending stays on disk for the next start."""
        with self._lock:
            self._db.close()

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


def open_outbox(path: Path, max_events: int, max_age_s: float) -> tuple[Outbox, Path | None]:
    """Open the outbox; a damaged or foreign file is moved aside (and returned) and an empty one started.

    A daemon that refused to start over a damaged file would be restarted into the same
    refusal forever; the moved file keeps whatever can still be salvaged from it.
    """
    try:
        return Outbox(path, max_events, max_age_s), None
    except OutboxContentError:
        pass  # a path or permission problem (plain OutboxError) is not solved by moving the file
    aside = path.with_name(f"{path.name}.unusable-{time.strftime('%Y%m%dT%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        candidate = Path(f"{path}{suffix}")
        if candidate.exists():
            candidate.rename(Path(f"{aside}{suffix}"))
    return Outbox(path, max_events, max_age_s), aside
