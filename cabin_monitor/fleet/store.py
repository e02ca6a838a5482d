"""Writing classified records to the fleet store, one transaction per batch, idempotent on ``event_id``.

Live events go to ``events``, shadow events to ``shadow_events`` only; every ``rules/state`` also adds a row
to ``rules_state_history`` (whether it had a shadow set), beside the latest in ``rules_state``.

``write_records`` runs on a connection the caller owns and commits; should PostgreSQL refuse a record's
data (``DataError``), the batch is written again record by record under savepoints and each refused one
goes to quarantine, so one bad message never holds up the stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import cast

import psycopg

from cabin_monitor.fleet.db import ensure_partitions, month_start
from cabin_monitor.fleet.records import (
    ConfigResultRecord,
    EventRecord,
    HealthRecord,
    Quarantined,
    Reason,
    Record,
    RulesStateRecord,
    ShadowEventRecord,
    StatusRecord,
)

_INSERT_EVENTS = """
WITH batch AS (
    SELECT * FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[],
                         %s::timestamptz[], %s::text[]::jsonb[])
        AS b(event_id, vehicle_id, type, phase, rule, severity, ts, payload)
), new AS (
    INSERT INTO {ids} (event_id, ts) SELECT event_id, ts FROM batch ON CONFLICT DO NOTHING RETURNING event_id
)
INSERT INTO {events} (event_id, vehicle_id, type, phase, rule, severity, ts, payload)
SELECT b.event_id, b.vehicle_id, b.type, b.phase, b.rule, b.severity, b.ts, b.payload
FROM batch b JOIN new USING (event_id)
"""
_INSERT_LIVE_EVENTS = _INSERT_EVENTS.format(ids="event_ids", events="events")
_INSERT_SHADOW_EVENTS = _INSERT_EVENTS.format(ids="shadow_event_ids", events="shadow_events")
_UPSERT_HEALTH = """
INSERT INTO health_latest (vehicle_id, ts, status, payload) VALUES (%s, %s, %s, %s::jsonb)
ON CONFLICT (vehicle_id) DO UPDATE SET ts = EXCLUDED.ts, status = EXCLUDED.status, payload = EXCLUDED.payload,
    received_at = now()
WHERE health_latest.ts <= EXCLUDED.ts
"""
_STATUS_RANK = "CASE {} WHEN 'error' THEN 2 WHEN 'degraded' THEN 1 ELSE 0 END"
_UPSERT_HEALTH_HOURLY = f"""
INSERT INTO health_hourly (vehicle_id, hour, first_ts, last_ts, samples, worst_status)
VALUES (%s, date_trunc('hour', %s::timestamptz), %s, %s, %s, %s)
ON CONFLICT (vehicle_id, hour) DO UPDATE SET
    first_ts = least(health_hourly.first_ts, EXCLUDED.first_ts),
    last_ts = greatest(health_hourly.last_ts, EXCLUDED.last_ts),
    samples = health_hourly.samples + EXCLUDED.samples,
    worst_status = CASE WHEN {_STATUS_RANK.format("EXCLUDED.worst_status")} > {
    _STATUS_RANK.format("health_hourly.worst_status")
} THEN EXCLUDED.worst_status ELSE health_hourly.worst_status END
"""
_UPSERT_RULES = """
INSERT INTO rules_state (vehicle_id, ts, cause, request_id, payload) VALUES (%s, %s, %s, %s, %s::jsonb)
ON CONFLICT (vehicle_id) DO UPDATE SET ts = EXCLUDED.ts, cause = EXCLUDED.cause, request_id = EXCLUDED.request_id,
    payload = EXCLUDED.payload, received_at = now()
WHERE rules_state.ts <= EXCLUDED.ts
"""
_INSERT_RULES_HISTORY = """
INSERT INTO rules_state_history (vehicle_id, ts, has_shadow) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING
"""
_INSERT_RESULT = """
INSERT INTO config_results (vehicle_id, request_id, action, ok, ts, payload) VALUES (%s, %s, %s, %s, %s, %s::jsonb)
ON CONFLICT DO NOTHING
"""
_UPSERT_STATUS = """
INSERT INTO vehicle_status (vehicle_id, status) VALUES (%s, %s)
ON CONFLICT (vehicle_id) DO UPDATE SET status = EXCLUDED.status, received_at = now()
"""
_INSERT_QUARANTINE = "INSERT INTO quarantine (topic, payload, reason, detail) VALUES (%s, %s, %s, %s)"


@dataclass
class WriteCounts:
    """What a batch added to the store."""

    events_new: int = 0
    events_duplicate: int = 0
    shadow_events_new: int = 0
    shadow_events_duplicate: int = 0
    other: int = 0
    quarantined: int = 0
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)

    def add(self, other: WriteCounts) -> None:
        """Add ``other``'s counts to these."""
        self.events_new += other.events_new
        self.events_duplicate += other.events_duplicate
        self.shadow_events_new += other.shadow_events_new
        self.shadow_events_duplicate += other.shadow_events_duplicate
        self.other += other.other
        self.quarantined += other.quarantined
        for reason, n in other.quarantined_by_reason.items():
            self.quarantined_by_reason[reason] = self.quarantined_by_reason.get(reason, 0) + n


class PartitionCache:
    """The months whose ``events`` partition is known to exist, so a batch creates only new ones."""

    def __init__(self) -> None:
        self._months: set[datetime] = set()

    def ensure(self, conn: psycopg.Connection[object], times: Sequence[datetime]) -> None:
        """Create the partitions of the months not seen before (in a transaction of their own)."""
        missing = [t for t in times if month_start(t) not in self._months]
        if missing:
            self._months |= ensure_partitions(conn, missing)


def write_records(
    conn: psycopg.Connection[object], records: Sequence[Record], partitions: PartitionCache, prefix: str = "cabin"
) -> WriteCounts:
    """Store ``records`` in one transaction (committed on return); a record PostgreSQL refuses is quarantined,
    as is an event from before the retention horizon (its month was dropped: storing it would bring it back)."""
    records = _before_retention(conn, records, prefix)
    partitions.ensure(conn, [r.ts for r in records if isinstance(r, EventRecord | ShadowEventRecord)])
    try:
        with conn.transaction():
            return _write(conn, records)
    except psycopg.DataError:
        pass
    counts = WriteCounts()
    with conn.transaction():
        for record in records:
            try:
                with conn.transaction():
                    counts.add(_write(conn, [record]))
            except psycopg.DataError as exc:
                counts.add(_write(conn, [_refused(record, exc, prefix)]))
    return counts


_RETAINED: dict[str, type[EventRecord | ShadowEventRecord]] = {
    "events": EventRecord,
    "shadow_events": ShadowEventRecord,
}
_TOPIC_SUFFIX = {
    EventRecord: "events",
    ShadowEventRecord: "shadow/events",
    HealthRecord: "health",
    RulesStateRecord: "rules/state",
    ConfigResultRecord: "config/result",
    StatusRecord: "status",
}


def _before_retention(conn: psycopg.Connection[object], records: Sequence[Record], prefix: str) -> list[Record]:
    rows = cast(list[tuple[str, datetime]], conn.execute("SELECT table_name, kept_from FROM retention").fetchall())
    conn.commit()  # idle again, for the partitions' own transaction
    horizon = {_RETAINED[name]: kept_from for name, kept_from in rows if name in _RETAINED}
    kept: list[Record] = []
    for r in records:
        if isinstance(r, EventRecord | ShadowEventRecord) and type(r) in horizon and r.ts < horizon[type(r)]:
            detail = f"{r.ts.isoformat()} is before the retention horizon {horizon[type(r)].isoformat()}"
            kept.append(_quarantined(r, Reason.BEFORE_RETENTION, detail, prefix))
        else:
            kept.append(r)
    return kept


def _refused(record: Record, exc: psycopg.DataError, prefix: str) -> Quarantined:
    if isinstance(record, Quarantined):
        raise exc  # the quarantine row itself was refused: nothing is left to fall back on
    return _quarantined(record, Reason.REFUSED_BY_STORE, str(exc).strip(), prefix)


def _quarantined(record: Record, reason: Reason, detail: str, prefix: str) -> Quarantined:
    assert not isinstance(record, Quarantined)
    if isinstance(record, StatusRecord):
        vehicle, raw = record.vehicle_id, record.status.encode()
    elif isinstance(record, ConfigResultRecord):
        vehicle, raw = record.vehicle_id, record.json_text.encode()
    else:
        vehicle, raw = record.payload.vehicle_id, record.json_text.encode()
    topic = f"{prefix}/{vehicle}/{_TOPIC_SUFFIX[type(record)]}"
    return Quarantined(topic, raw, reason, detail)


def _write_events(
    conn: psycopg.Connection[object], statement: str, records: Sequence[EventRecord | ShadowEventRecord]
) -> tuple[int, int]:
    """Insert the events not stored yet; (new, duplicate)."""
    events: dict[str, EventRecord | ShadowEventRecord] = {}
    for r in records:
        events.setdefault(r.payload.event_id, r)
    if not events:
        return 0, 0
    # Rows in key order, here and below: ingest processes writing the same rows lock them in one order,
    # so they wait for each other instead of deadlocking.
    cur = conn.execute(statement, _event_columns([events[k] for k in sorted(events)]))
    return cur.rowcount, len(records) - cur.rowcount


def _write(conn: psycopg.Connection[object], records: Sequence[Record]) -> WriteCounts:
    counts = WriteCounts()
    counts.events_new, counts.events_duplicate = _write_events(
        conn, _INSERT_LIVE_EVENTS, [r for r in records if isinstance(r, EventRecord)]
    )
    counts.shadow_events_new, counts.shadow_events_duplicate = _write_events(
        conn, _INSERT_SHADOW_EVENTS, [r for r in records if isinstance(r, ShadowEventRecord)]
    )
    with conn.cursor() as cur:
        counts.other += _write_health(cur, [r for r in records if isinstance(r, HealthRecord)])
        rules = sorted(_latest_rules([r for r in records if isinstance(r, RulesStateRecord)]), key=_vehicle)
        cur.executemany(
            _UPSERT_RULES,
            [(r.payload.vehicle_id, r.ts, r.payload.cause, r.payload.request_id, r.json_text) for r in rules],
        )
        history = {
            (r.payload.vehicle_id, r.ts): r.payload.shadow is not None
            for r in records
            if isinstance(r, RulesStateRecord)
        }
        cur.executemany(_INSERT_RULES_HISTORY, [(v, ts, shadow) for (v, ts), shadow in sorted(history.items())])
        results = [r for r in records if isinstance(r, ConfigResultRecord)]
        cur.executemany(
            _INSERT_RESULT,
            [
                (r.vehicle_id, r.payload.request_id or "", r.payload.action, r.payload.ok, r.ts, r.json_text)
                for r in results
            ],
        )
        statuses = {r.vehicle_id: r.status for r in records if isinstance(r, StatusRecord)}
        cur.executemany(_UPSERT_STATUS, sorted(statuses.items()))
        bad = [r for r in records if isinstance(r, Quarantined)]
        cur.executemany(_INSERT_QUARANTINE, [(q.topic, q.payload, q.reason.value, q.detail) for q in bad])
    counts.other += len(rules) + len(results) + len(statuses)
    counts.quarantined = len(bad)
    for q in bad:
        counts.quarantined_by_reason[q.reason.value] = counts.quarantined_by_reason.get(q.reason.value, 0) + 1
    return counts


def _vehicle(record: RulesStateRecord) -> str:
    return record.payload.vehicle_id


def _latest_rules(records: Sequence[RulesStateRecord]) -> list[RulesStateRecord]:
    # One upsert per vehicle: a statement may not change the same row twice.
    latest: dict[str, RulesStateRecord] = {}
    for r in records:
        if r.payload.vehicle_id not in latest or latest[r.payload.vehicle_id].ts <= r.ts:
            latest[r.payload.vehicle_id] = r
    return list(latest.values())


def _event_columns(events: Sequence[EventRecord | ShadowEventRecord]) -> tuple[list[object], ...]:
    p = [e.payload for e in events]
    return (
        [x.event_id for x in p],
        [x.vehicle_id for x in p],
        [x.type for x in p],
        [x.phase for x in p],
        [x.rule for x in p],
        [x.severity for x in p],
        [e.ts for e in events],
        [e.json_text for e in events],
    )


def _write_health(cur: psycopg.Cursor[object], health: Sequence[HealthRecord]) -> int:
    if not health:
        return 0
    latest: dict[str, HealthRecord] = {}
    hourly: dict[tuple[str, datetime], list[HealthRecord]] = {}
    for h in health:
        vehicle = h.payload.vehicle_id
        if vehicle not in latest or latest[vehicle].ts <= h.ts:
            latest[vehicle] = h
        hourly.setdefault((vehicle, h.ts.replace(minute=0, second=0, microsecond=0)), []).append(h)
    cur.executemany(_UPSERT_HEALTH, [(v, h.ts, h.payload.status, h.json_text) for v, h in sorted(latest.items())])
    rows = []
    for (vehicle, hour), group in sorted(hourly.items()):
        worst = max((h.payload.status for h in group), key=("ok", "degraded", "error").index)
        rows.append((vehicle, hour, min(h.ts for h in group), max(h.ts for h in group), len(group), worst))
    cur.executemany(_UPSERT_HEALTH_HOURLY, rows)
    return len(health)
