"""Shadow against live: alerts per vehicle-hour of each vehicle's shadow rules and of its live rules, same hours.

Only the time a vehicle ran a shadow set counts: from each ``rules/state`` with a ``shadow`` block to the
vehicle's next ``rules/state`` (``rules_state_history``), clipped to the window; its vehicle-hours are its health
hours within that time (as in ``rates``), its live alerts the starts in ``events`` and its shadow alerts the
starts in ``shadow_events`` within it. The values that differ are those of the latest ``rules/state``.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import psycopg

from cabin_monitor.fleet.rates import flatten, rate_dict
from cabin_monitor.fleet.rollout import Rate

_COMPARE = """
WITH changes AS (
    SELECT vehicle_id, ts, has_shadow,
           lead(ts, 1, 'infinity'::timestamptz) OVER (PARTITION BY vehicle_id ORDER BY ts) AS until
    FROM rules_state_history
), spans AS (
    SELECT vehicle_id, greatest(ts, %(start)s) AS s, least(until, %(end)s) AS e FROM changes
    WHERE has_shadow AND until > %(start)s AND ts < %(end)s
), hours AS (
    SELECT sp.vehicle_id, sum(extract(epoch FROM least(h.last_ts, sp.e) - greatest(h.first_ts, sp.s))) / 3600.0 AS n
    FROM spans sp JOIN health_hourly h ON h.vehicle_id = sp.vehicle_id AND h.last_ts > sp.s AND h.first_ts < sp.e
    GROUP BY 1
), live AS (
    SELECT sp.vehicle_id, count(*) AS n
    FROM spans sp JOIN events ev ON ev.vehicle_id = sp.vehicle_id AND ev.ts >= sp.s AND ev.ts < sp.e
    WHERE ev.phase = 'start' GROUP BY 1
), shadow AS (
    SELECT sp.vehicle_id, count(*) AS n
    FROM spans sp JOIN shadow_events ev ON ev.vehicle_id = sp.vehicle_id AND ev.ts >= sp.s AND ev.ts < sp.e
    WHERE ev.phase = 'start' GROUP BY 1
)
SELECT v.vehicle_id, coalesce(hours.n, 0), coalesce(live.n, 0), coalesce(shadow.n, 0)
FROM (SELECT DISTINCT vehicle_id FROM spans) v
    LEFT JOIN hours USING (vehicle_id) LEFT JOIN live USING (vehicle_id) LEFT JOIN shadow USING (vehicle_id)
ORDER BY 1
"""


def shadow_differences(payload: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """Path -> ``{"live", "shadow"}`` for every value the shadow rules of a ``rules/state`` set otherwise; None
    when it has no shadow set."""
    shadow = payload.get("shadow")
    if shadow is None:
        return None
    live, trial = flatten(payload["rules"]), flatten(shadow["rules"])
    return {
        path: {"live": live.get(path), "shadow": value}
        for path, value in sorted(trial.items())
        if live.get(path) != value
    }


def compare(conn: psycopg.Connection[Any], start: datetime, end: datetime) -> dict[str, Any]:
    """Everything ``fleet rates --shadow`` prints: per vehicle that ran a shadow set and overall, live and shadow
    alerts per vehicle-hour over the hours it ran one, and the shadow values that differ now."""
    rows = conn.execute(_COMPARE.encode(), {"start": start, "end": end}).fetchall()
    latest = dict(conn.execute("SELECT vehicle_id, payload FROM rules_state").fetchall())
    vehicles = []
    for vehicle, hours, live, shadow in rows:
        state = latest.get(vehicle)
        vehicles.append(
            {
                "vehicle_id": vehicle,
                "live": rate_dict(Rate(int(live), float(hours))),
                "shadow": rate_dict(Rate(int(shadow), float(hours))),
                "shadow_differs": None if state is None else shadow_differences(state),
            }
        )
    total_hours = sum(float(r[1]) for r in rows)
    return {
        "since": start.isoformat(),
        "until": end.isoformat(),
        "fleet": {
            "vehicles": len(rows),
            "live": rate_dict(Rate(sum(int(r[2]) for r in rows), total_hours)),
            "shadow": rate_dict(Rate(sum(int(r[3]) for r in rows), total_hours)),
        },
        "vehicles": vehicles,
    }


def format_compare(data: dict[str, Any]) -> str:
    """``compare`` as text for a terminal."""
    fleet = data["fleet"]
    lines = [
        f"live against shadow rules {data['since']} .. {data['until']}: {fleet['vehicles']} vehicles ran a shadow set",
        "",
        f"{'vehicle':<24} {'veh-hours':>10} {'live':>6} {'per v-h':>9} {'shadow':>7} {'per v-h':>9}",
    ]
    rows = [("all", fleet)] + [(v["vehicle_id"], v) for v in data["vehicles"]]
    for name, r in rows:
        live, shadow = r["live"], r["shadow"]
        lines.append(
            f"{name:<24} {live['vehicle_hours']:>10.2f} {live['alerts']:>6} {live['per_vehicle_hour']:>9.3f} "
            f"{shadow['alerts']:>7} {shadow['per_vehicle_hour']:>9.3f}"
        )
    lines += ["", "shadow values that differ from the live ones (latest rules/state):"]
    for v in data["vehicles"]:
        differs = v["shadow_differs"]
        if differs is None:
            lines.append(f"  {v['vehicle_id']:<22} no shadow set now")
        for path, values in (differs or {}).items():
            lines.append(
                f"  {v['vehicle_id']:<22} {path} = {json.dumps(values['shadow'])} (live {json.dumps(values['live'])})"
            )
    if not data["vehicles"]:
        lines.append("  none")
    return "\n".join(lines)
