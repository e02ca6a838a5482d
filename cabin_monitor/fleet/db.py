"""The fleet store in PostgreSQL: versioned migrations, the connection pool, monthly event partitions.

``upgrade`` applies every migration not yet in ``schema_migrations``, each in its own transaction, so it
can be run again at any time. Imports psycopg only (the ``fleet`` extra).

Idempotency: ``events`` is partitioned by month on ``ts``, and PostgreSQL only enforces a unique key on a
partitioned table when the key holds the partition key, so ``(ts, event_id)`` alone would store one event
twice whenever two copies carry different times. Copies of a re-sent event carry the same ``ts`` (the
outbox keeps the payload as written), but an end the daemon sends again as ``interrupted`` after a crash
has the same ``event_id`` and a later ``ts``. ``event_ids`` (not partitioned, ``event_id`` its primary key)
is therefore the one place that says whether an event is already stored: a batch inserts its ids there
with ``ON CONFLICT DO NOTHING`` and only the ids that went in are written to ``events``, in the same
transaction. The first copy to arrive is the one kept. ``shadow_events`` and ``shadow_event_ids`` (the events of a
vehicle's shadow rules) work the same way, apart from the live ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of the schema: its version (ascending, never reused), a name, and its SQL."""

    version: int
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "events, health, rules, config results, quarantine",
        """
        CREATE TABLE event_ids (
            event_id uuid PRIMARY KEY,
            ts timestamptz NOT NULL
        );
        CREATE TABLE events (
            event_id uuid NOT NULL,
            vehicle_id text NOT NULL,
            type text NOT NULL,
            phase text NOT NULL CHECK (phase IN ('start', 'end')),
            rule text NOT NULL,
            severity text NOT NULL,
            ts timestamptz NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now(),
            payload jsonb NOT NULL,
            PRIMARY KEY (ts, event_id)
        ) PARTITION BY RANGE (ts);
        CREATE INDEX events_vehicle_ts ON events (vehicle_id, ts);
        CREATE TABLE health_latest (
            vehicle_id text PRIMARY KEY,
            ts timestamptz NOT NULL,
            status text NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now(),
            payload jsonb NOT NULL
        );
        -- One row per vehicle and hour: when it first and last reported health in that hour.
        CREATE TABLE health_hourly (
            vehicle_id text NOT NULL,
            hour timestamptz NOT NULL,
            first_ts timestamptz NOT NULL,
            last_ts timestamptz NOT NULL,
            samples integer NOT NULL,
            worst_status text NOT NULL,
            PRIMARY KEY (vehicle_id, hour)
        );
        CREATE TABLE rules_state (
            vehicle_id text PRIMARY KEY,
            ts timestamptz NOT NULL,
            cause text NOT NULL,
            request_id text,
            received_at timestamptz NOT NULL DEFAULT now(),
            payload jsonb NOT NULL
        );
        CREATE TABLE config_results (
            vehicle_id text NOT NULL,
            request_id text NOT NULL DEFAULT '',
            action text NOT NULL,
            ok boolean NOT NULL,
            ts timestamptz NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now(),
            payload jsonb NOT NULL,
            PRIMARY KEY (vehicle_id, request_id, action, ts)
        );
        CREATE INDEX config_results_request ON config_results (request_id);
        CREATE TABLE vehicle_status (
            vehicle_id text PRIMARY KEY,
            status text NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE quarantine (
            id bigserial PRIMARY KEY,
            topic text NOT NULL,
            payload bytea NOT NULL,
            reason text NOT NULL,
            detail text NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    Migration(
        2,
        "rollouts",
        """
        CREATE TABLE rollouts (
            rollout_id text PRIMARY KEY,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now(),
            state text NOT NULL,
            changes jsonb NOT NULL,
            plan jsonb NOT NULL
        );
        CREATE TABLE rollout_vehicles (
            rollout_id text NOT NULL REFERENCES rollouts ON DELETE CASCADE,
            vehicle_id text NOT NULL,
            wave integer NOT NULL,
            state text NOT NULL,
            request_id text,
            previous jsonb,
            errors jsonb,
            sent_at timestamptz,
            answered_at timestamptz,
            PRIMARY KEY (rollout_id, vehicle_id)
        );
        CREATE TABLE rollout_steps (
            id bigserial PRIMARY KEY,
            rollout_id text NOT NULL REFERENCES rollouts ON DELETE CASCADE,
            at timestamptz NOT NULL DEFAULT now(),
            step text NOT NULL,
            detail jsonb NOT NULL
        );
        CREATE INDEX rollout_steps_rollout ON rollout_steps (rollout_id, id);
        """,
    ),
    Migration(
        3,
        "shadow events, rules/state history",
        """
        CREATE TABLE shadow_event_ids (
            event_id uuid PRIMARY KEY,
            ts timestamptz NOT NULL
        );
        CREATE TABLE shadow_events (
            event_id uuid NOT NULL,
            vehicle_id text NOT NULL,
            type text NOT NULL,
            phase text NOT NULL CHECK (phase IN ('start', 'end')),
            rule text NOT NULL,
            severity text NOT NULL,
            ts timestamptz NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now(),
            payload jsonb NOT NULL,
            PRIMARY KEY (ts, event_id)
        ) PARTITION BY RANGE (ts);
        CREATE INDEX shadow_events_vehicle_ts ON shadow_events (vehicle_id, ts);
        -- Every rules/state received (rules_state keeps the latest only): from when to when a shadow set ran.
        CREATE TABLE rules_state_history (
            vehicle_id text NOT NULL,
            ts timestamptz NOT NULL,
            has_shadow boolean NOT NULL,
            PRIMARY KEY (vehicle_id, ts)
        );
        INSERT INTO rules_state_history (vehicle_id, ts, has_shadow)
        SELECT vehicle_id, ts, payload ? 'shadow' FROM rules_state;
        """,
    ),
    Migration(
        4,
        "retention horizon",
        """
        -- Set by 'fleet retention': events before kept_from were dropped, and copies arriving late are quarantined.
        CREATE TABLE retention (
            table_name text PRIMARY KEY,
            kept_from timestamptz NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
)
# Tables partitioned by month on ts, each with its partitions named <table>_YYYY_MM.
PARTITIONED_TABLES = ("events", "shadow_events")

_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
# Held while migrating and while creating partitions, so two processes never do either at once.
SCHEMA_LOCK = 7_140_215


def upgrade(dsn: str, migrations: Iterable[Migration] = MIGRATIONS) -> list[int]:
    """Apply every migration not applied yet, in order; the versions applied now (empty when up to date)."""
    applied_now: list[int] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(_MIGRATIONS_TABLE)
        for migration in sorted(migrations, key=lambda m: m.version):
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                row = conn.execute(
                    "SELECT 1 FROM schema_migrations WHERE version = %s", (migration.version,)
                ).fetchone()
                if row is not None:
                    continue
                conn.execute(migration.sql.encode())  # several statements: no parameters
                conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (migration.version, migration.name)
                )
                applied_now.append(migration.version)
        now = datetime.now(timezone.utc)
        ensure_partitions(conn, [now, _next_month(month_start(now))])
    return applied_now


def applied_versions(dsn: str) -> list[int]:
    """The versions in ``schema_migrations``, ascending."""
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]


def month_start(ts: datetime) -> datetime:
    """The first instant (UTC) of the month ``ts`` falls in."""
    ts = ts.astimezone(timezone.utc)
    return datetime(ts.year, ts.month, 1, tzinfo=timezone.utc)


def _next_month(start: datetime) -> datetime:
    return start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)


def partition_name(start: datetime, table: str = "events") -> str:
    """``<table>_YYYY_MM``: the partition of ``table`` for the month starting at ``start``."""
    return f"{table}_{start.year:04d}_{start.month:02d}"


def ensure_partitions(conn: psycopg.Connection[object], times: Iterable[datetime]) -> set[datetime]:
    """Create the monthly partitions of ``events`` and ``shadow_events`` the times fall in, where missing; the
    month starts covered.

    Runs in a transaction of its own on ``conn`` (which must be idle), under the schema lock.
    """
    months = {month_start(t) for t in times}
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        for start in sorted(months):
            for table in PARTITIONED_TABLES:
                # DDL takes no bind parameters: the bounds go in as literals.
                conn.execute(
                    sql.SQL("CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
                        sql.Identifier(partition_name(start, table)),
                        sql.Identifier(table),
                        sql.Literal(start),
                        sql.Literal(_next_month(start)),
                    )
                )
    return months


def open_pool(dsn: str, *, max_size: int = 4) -> ConnectionPool:
    """A connection pool on ``dsn``, opened and checked (raises ``psycopg.OperationalError`` if unreachable)."""
    pool = ConnectionPool(dsn, min_size=1, max_size=max_size, open=False)
    pool.open(wait=True, timeout=10.0)
    return pool
