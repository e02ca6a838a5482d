"""``fleet retention``: how far back the store keeps what it holds.

Events and shadow events go by whole months: every monthly partition that ends before the month of the cutoff
is dropped (no row-by-row delete, no bloat), with the ``event_ids`` rows of the same span, and ``retention``
records the month kept from, so that a copy of a dropped event arriving late is quarantined rather than stored
again. The other tables lose their rows from before the cutoff; each vehicle keeps its latest
``rules_state_history`` row (the shadow rates start from it), and roll-outs are deleted only once ended.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import cast

import psycopg
from psycopg import sql

from cabin_monitor.fleet.db import PARTITIONED_TABLES, SCHEMA_LOCK, month_start, partition_name

# table -> the rows that go, with %(cutoff)s (the cutoff) and %(kept_from)s (the first month kept).
_ROWS_BEFORE = {
    "event_ids": "ts < %(kept_from)s",
    "shadow_event_ids": "ts < %(kept_from)s",
    "health_hourly": "hour < %(cutoff)s",
    "rules_state_history": "ts < %(cutoff)s AND ts < (SELECT max(h.ts) FROM rules_state_history h "
    "WHERE h.vehicle_id = rules_state_history.vehicle_id)",
    "config_results": "ts < %(cutoff)s",
    "quarantine": "received_at < %(cutoff)s",
    "rollouts": "updated_at < %(cutoff)s AND state IN ('done', 'aborted')",
}


@dataclass(frozen=True, slots=True)
class Retention:
    """What a retention run dropped (or, dry, would drop)."""

    cutoff: datetime
    kept_from: datetime
    partitions: tuple[str, ...]
    rows: dict[str, int]


def partitions_before(conn: psycopg.Connection[object], table: str, kept_from: datetime) -> list[str]:
    """The monthly partitions of ``table`` for months before ``kept_from``, oldest first."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = %s::regclass ORDER BY c.relname",
        (table,),
    ).fetchall()
    names = [name for (name,) in cast(list[tuple[str]], rows)]
    return [name for name in names if name < partition_name(kept_from, table)]


def apply_retention(conn: psycopg.Connection[object], cutoff: datetime, *, dry_run: bool = False) -> Retention:
    """Drop what is older than ``cutoff`` (events by whole months), in one transaction; with ``dry_run``, count."""
    kept_from = month_start(cutoff)
    params = {"cutoff": cutoff, "kept_from": kept_from}
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))  # no partition made meanwhile
        partitions = tuple(name for table in PARTITIONED_TABLES for name in partitions_before(conn, table, kept_from))
        rows: dict[str, int] = {}
        for table, condition in _ROWS_BEFORE.items():
            if dry_run:
                query = sql.SQL("SELECT count(*) FROM {} WHERE " + condition).format(sql.Identifier(table))
                (count,) = cast(tuple[int], conn.execute(query, params).fetchone())
                rows[table] = count
            else:
                query = sql.SQL("DELETE FROM {} WHERE " + condition).format(sql.Identifier(table))
                rows[table] = conn.execute(query, params).rowcount
        if not dry_run:
            for name in partitions:
                conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
            for table in PARTITIONED_TABLES:
                conn.execute(
                    "INSERT INTO retention (table_name, kept_from) VALUES (%s, %s) ON CONFLICT (table_name) DO "
                    "UPDATE SET kept_from = greatest(retention.kept_from, EXCLUDED.kept_from), applied_at = now()",
                    (table, kept_from),
                )
    return Retention(cutoff, kept_from, partitions, rows)


def format_retention(result: Retention, *, dry_run: bool) -> str:
    """The lines ``fleet retention`` prints."""
    verb = "would drop" if dry_run else "dropped"
    lines = [
        f"cutoff {result.cutoff:%Y-%m-%d %H:%M} UTC; events and shadow events kept from {result.kept_from:%Y-%m-%d}",
        f"partitions {verb}: {', '.join(result.partitions) or 'none'}",
    ]
    lines += [f"  {table:<20} {n:>10} rows {verb}" for table, n in result.rows.items()]
    return "\n".join(lines)
