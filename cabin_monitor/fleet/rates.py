"""Alert rates from the fleet store: alerts (event starts) per vehicle-hour, and rules that differ from the fleet's.

A vehicle-hour is an hour a vehicle reported health: in ``health_hourly``, the span from its first to its
last health report of each hour, clipped to the window asked for.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Literal

import psycopg

from cabin_monitor.fleet.rollout import Rate

_HOURS = """
SELECT vehicle_id, sum(extract(epoch FROM least(last_ts, %(end)s) - greatest(first_ts, %(start)s))) / 3600.0
FROM health_hourly
WHERE last_ts > %(start)s AND first_ts < %(end)s AND (%(all)s OR vehicle_id = ANY(%(vehicles)s))
GROUP BY vehicle_id
"""
_ALERTS = """
SELECT {key}, count(*) FROM events
WHERE phase = 'start' AND ts >= %(start)s AND ts < %(end)s AND (%(all)s OR vehicle_id = ANY(%(vehicles)s))
GROUP BY 1
"""
GROUP_KEYS = {"vehicle": "vehicle_id", "rule": "rule", "day": "to_char(date_trunc('day', ts), 'YYYY-MM-DD')"}
GroupBy = Literal["vehicle", "rule", "day"]


def _window(start: datetime, end: datetime, vehicles: Sequence[str] | None) -> dict[str, Any]:
    return {"start": start, "end": end, "all": vehicles is None, "vehicles": list(vehicles or [])}


def vehicle_hours(
    conn: psycopg.Connection[Any], start: datetime, end: datetime, vehicles: Sequence[str] | None
) -> dict[str, float]:
    """Vehicle -> hours it reported health in [start, end)."""
    rows = conn.execute(_HOURS, _window(start, end, vehicles)).fetchall()
    return {r[0]: float(r[1]) for r in rows}


def alerts_by(
    conn: psycopg.Connection[Any], key: GroupBy, start: datetime, end: datetime, vehicles: Sequence[str] | None
) -> dict[str, int]:
    """Alerts in [start, end) per vehicle, rule or day."""
    rows = conn.execute(_ALERTS.format(key=GROUP_KEYS[key]).encode(), _window(start, end, vehicles)).fetchall()
    return {str(r[0]): int(r[1]) for r in rows}


def alert_rate(conn: psycopg.Connection[Any], vehicles: Sequence[str], start_s: float, end_s: float) -> Rate:
    """The vehicles' alerts and vehicle-hours in [start_s, end_s) (epoch seconds)."""
    start, end = (datetime.fromtimestamp(t, tz=timezone.utc) for t in (start_s, end_s))
    alerts = sum(alerts_by(conn, "vehicle", start, end, vehicles).values())
    return Rate(alerts, sum(vehicle_hours(conn, start, end, vehicles).values()))


def rules_in_force(conn: psycopg.Connection[Any]) -> dict[str, dict[str, Any]]:
    """Vehicle -> its rules in force (flattened: dotted path -> value), from the latest ``rules/state``."""
    return {v: flatten(payload["rules"]) for v, payload in conn.execute("SELECT vehicle_id, payload FROM rules_state")}


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested rules mapping as dotted path -> value."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        flat.update(flatten(value, f"{path}.") if isinstance(value, dict) else {path: value})
    return flat


def unusual_rules(rules: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The fleet's usual value of every path (the most common) and, per vehicle, the values that differ."""
    counts: dict[str, Counter[str]] = {}
    for flat in rules.values():
        for path, value in flat.items():
            counts.setdefault(path, Counter())[json.dumps(value, sort_keys=True)] += 1
    usual = {path: json.loads(c.most_common(1)[0][0]) for path, c in counts.items()}
    differ = {
        v: {path: value for path, value in flat.items() if value != usual[path]} for v, flat in sorted(rules.items())
    }
    return usual, {v: d for v, d in differ.items() if d}


def report(conn: psycopg.Connection[Any], start: datetime, end: datetime, by: GroupBy, top: int = 10) -> dict[str, Any]:
    """Everything ``fleet rates`` prints: the fleet's rate, the rate per ``by``, top vehicles, unusual rules."""
    hours = vehicle_hours(conn, start, end, None)
    per_vehicle = alerts_by(conn, "vehicle", start, end, None)
    total = Rate(sum(per_vehicle.values()), sum(hours.values()))
    vehicles = sorted(set(hours) | set(per_vehicle))
    vehicle_rates = {v: Rate(per_vehicle.get(v, 0), hours.get(v, 0.0)) for v in vehicles}
    if by == "vehicle":
        groups = {v: rate_dict(r) for v, r in vehicle_rates.items()}
    else:
        groups = {
            k: rate_dict(Rate(n, total.vehicle_hours)) for k, n in sorted(alerts_by(conn, by, start, end, None).items())
        }
    ranked = sorted(vehicle_rates.items(), key=lambda item: (-item[1].per_hour, item[0]))[:top]
    usual, differ = unusual_rules(rules_in_force(conn))
    return {
        "since": start.isoformat(),
        "until": end.isoformat(),
        "fleet": rate_dict(total),
        "by": by,
        "groups": groups,
        "top_vehicles": [{"vehicle_id": v, **rate_dict(r)} for v, r in ranked],
        "usual_rules": usual,
        "rules_differing": differ,
    }


def rate_dict(rate: Rate) -> dict[str, float]:
    """A rate as printed: alerts, vehicle-hours (rounded) and alerts per vehicle-hour."""
    return {"alerts": rate.alerts, "vehicle_hours": round(rate.vehicle_hours, 4), "per_vehicle_hour": rate.per_hour}


def format_report(data: dict[str, Any]) -> str:
    """``report`` as text for a terminal."""
    fleet = data["fleet"]
    lines = [
        f"alerts per vehicle-hour {data['since']} .. {data['until']}: {fleet['per_vehicle_hour']:.3f} "
        f"({fleet['alerts']} alerts in {fleet['vehicle_hours']:.1f} vehicle-hours)",
        "",
        f"{'by ' + data['by']:<24} {'alerts':>8} {'veh-hours':>10} {'per v-h':>9}",
    ]
    for key, r in data["groups"].items():
        lines.append(f"{key:<24} {r['alerts']:>8} {r['vehicle_hours']:>10.2f} {r['per_vehicle_hour']:>9.3f}")
    lines += ["", "top vehicles:"]
    lines += [
        f"  {t['vehicle_id']:<22} {t['per_vehicle_hour']:>9.3f}/h ({t['alerts']} alerts)" for t in data["top_vehicles"]
    ]
    lines += ["", "rules that differ from the fleet's usual values:"]
    for vehicle, paths in data["rules_differing"].items():
        for path, value in paths.items():
            lines.append(
                f"  {vehicle:<22} {path} = {json.dumps(value)} (usually {json.dumps(data['usual_rules'][path])})"
            )
    if not data["rules_differing"]:
        lines.append("  none")
    return "\n".join(lines)
