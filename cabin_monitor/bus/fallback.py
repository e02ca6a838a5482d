"""A second file, on another filesystem, for the events the outbox file cannot take.

While the outbox file cannot be written (disk full, remounted read-only, I/O errors) the outbox holds
new events in memory; each is also written here, so a daemon that crashes, is killed by the watchdog
or is restarted meanwhile does not lose them. Under systemd the default place is
``$RUNTIME_DIRECTORY`` (``/run/cabin-monitor``, a RAM filesystem that outlives the process but not a
reboot). The next ``Outbox`` to open moves what it finds here into the outbox file, in the order the
events were accepted, before any new event. An event leaves this file when it is acknowledged,
written to the outbox file, dropped or expired.

Each event keeps its ``EventFacts`` beside its bytes, as in the outbox file; a file written before
they had columns gets them (NULL in its rows) when opened.

Imports ``bus.facts``.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from cabin_monitor.bus.facts import COLUMNS as FACT_COLUMNS
from cabin_monitor.bus.facts import NO_FACTS, EventFacts

_SCHEMA = """
CREATE TABLE IF NOT EXISTS held (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- acceptance order
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
"""
_COLUMNS = f"event_id, topic, payload, severity, created_wall_s, {', '.join(FACT_COLUMNS)}"


@dataclass(frozen=True, slots=True)
class KeptEvent:
    """One event kept in the fallback file."""

    event_id: str
    topic: str
    payload: bytes
    rank: int  # severity rank, as in the outbox
    created_wall_s: float
    facts: EventFacts | None = None  # None: not an event, or kept by a daemon that did not keep facts


class FallbackFile:
    """The fallback file; not thread-safe (the outbox calls it under its own lock).

    Every method raises ``sqlite3.Error`` or ``OSError`` when the file cannot be used; the outbox then
    goes on with memory alone and says so.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=5.0)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL: in WAL mode a commit survives the process dying (the case this file is for); the
            # RAM filesystem it lives on does not survive a power cut anyway.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            present = {row[1] for row in self._db.execute("PRAGMA table_info(held)").fetchall()}
            for column in FACT_COLUMNS:
                if column not in present:
                    self._db.execute(f"ALTER TABLE held ADD COLUMN {column} TEXT")
        except sqlite3.Error:
            self._db.close()
            raise

    def add(self, event: KeptEvent) -> None:
        """Keep ``event`` (a no-op when it is kept already)."""
        values: tuple[object, ...] = (event.event_id, event.topic, event.payload, event.rank, event.created_wall_s)
        values += NO_FACTS if event.facts is None else event.facts.columns()
        self._db.execute(f"INSERT OR IGNORE INTO held ({_COLUMNS}) VALUES ({', '.join('?' * len(values))})", values)

    def remove(self, event_id: str) -> None:
        """Forget ``event_id`` (a no-op when it is not kept)."""
        self._db.execute("DELETE FROM held WHERE event_id = ?", (event_id,))

    def events(self) -> list[KeptEvent]:
        """Every kept event, in the order they were accepted."""
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM held ORDER BY seq").fetchall()
        return [KeptEvent(r[0], r[1], bytes(r[2]), r[3], r[4], EventFacts.from_columns(r[5:])) for r in rows]

    def close(self) -> None:
        """Close the file; what it keeps stays for the next start."""
        self._db.close()
