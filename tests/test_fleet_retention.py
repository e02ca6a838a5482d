"""fleet retention on a real store: old months' partitions dropped, late copies of their events quarantined."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

import psycopg

from cabin_monitor.fleet.db import partition_name
from cabin_monitor.fleet.records import classify
from cabin_monitor.fleet.store import PartitionCache, write_records
from tests.support.fleet import (
    FleetCommand,
    event_json,
    fleet_database,
    health_at,
    health_json,
    query,
    requires_postgres,
    shadow_event_json,
)

pytestmark = requires_postgres()
DAY_S = 86400.0


def partitions(dsn: str) -> set[str]:
    """The names of every partition of events and shadow_events."""
    rows = query(dsn, "SELECT relname FROM pg_class WHERE relname ~ '^(shadow_)?events_[0-9]{4}_[0-9]{2}$'")
    return {r[0] for r in rows}


def write(dsn: str, messages: list[tuple[str, bytes]]) -> None:
    """Store ``messages`` as ingest does."""
    with psycopg.connect(dsn) as conn:
        write_records(conn, [classify(t, p) for t, p in messages], PartitionCache())


def test_retention_drops_whole_old_months_and_quarantines_late_copies(tmp_path: Path) -> None:
    """--keep 60d: the month of 100 days ago goes (partitions, ids, health), 40 days ago stays; a copy comes late."""
    now = time.time()
    old_s, kept_s = now - 100 * DAY_S, now - 40 * DAY_S
    old_event = event_json("car-1", ts_s=old_s)
    messages = [("cabin/car-1/events", old_event), ("cabin/car-1/events", event_json("car-1", ts_s=kept_s))]
    messages += [
        ("cabin/car-1/events", event_json("car-1")),
        ("cabin/car-1/shadow/events", shadow_event_json("car-1", old_s)),
    ]
    messages += [("cabin/car-1/health", health_at("car-1", t)) for t in (old_s, kept_s)]
    messages.append(("cabin/car-1/health", health_json("car-1")))
    old_month = partition_name(datetime.fromtimestamp(old_s, timezone.utc))
    with fleet_database() as dsn:
        write(dsn, messages)
        assert {old_month, f"shadow_{old_month}"} <= partitions(dsn)

        dry = FleetCommand(tmp_path, ["retention", "--db", dsn, "--keep", "60d", "--dry-run"])
        assert dry.wait(60) == 0, dry.output()
        assert f"partitions would drop: {old_month}, shadow_{old_month}" in dry.output()
        assert query(dsn, "SELECT count(*) FROM events") == [(3,)]

        run = FleetCommand(tmp_path, ["retention", "--db", dsn, "--keep", "60d"])
        assert run.wait(60) == 0, run.output()
        assert not {old_month, f"shadow_{old_month}"} & partitions(dsn)
        assert query(dsn, "SELECT count(*) FROM events") == [(2,)]
        assert query(dsn, "SELECT count(*) FROM event_ids") == [(2,)]
        assert query(dsn, "SELECT count(*) FROM shadow_event_ids") == [(0,)]
        assert query(dsn, "SELECT count(*) FROM health_hourly") == [(2,)]

        write(dsn, [("cabin/car-1/events", old_event)])  # the vehicle sends it again, months late
        assert query(dsn, "SELECT reason FROM quarantine") == [("before_retention",)]
        assert old_month not in partitions(dsn) and query(dsn, "SELECT count(*) FROM events") == [(2,)]

        short = FleetCommand(tmp_path, ["retention", "--db", dsn, "--keep", "2h"])
        assert short.wait(60) == 2 and "under a day" in short.output()
