"""``fleet report --out DIR``: the alert rates of ``fleet.rates`` as one HTML page with interactive plots.

``DIR/index.html`` and ``DIR/plotly.min.js`` (the page works offline); alerts per day and rule, alerts per
vehicle-hour of the top vehicles, and the rules that differ from the fleet's usual values.
"""

from __future__ import annotations

import html
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.offline
import psycopg

from cabin_monitor.fleet.rates import report

_DAY_RULE = """
SELECT to_char(date_trunc('day', ts), 'YYYY-MM-DD'), rule, count(*) FROM events
WHERE phase = 'start' AND ts >= %s AND ts < %s GROUP BY 1, 2 ORDER BY 1, 2
"""
_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>cabin-monitor fleet: {title}</title>
<script src="plotly.min.js"></script>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:.2em .8em;text-align:left}}</style></head>
<body><h1>Fleet alerts {title}</h1>
<p>{summary}</p>
{per_day}
{per_vehicle}
<h2>Rules that differ from the fleet's usual values</h2>
{rules}
</body></html>
"""


def write_report(conn: psycopg.Connection[Any], out: Path, start: datetime, end: datetime, top: int = 20) -> Path:
    """Write ``out/index.html`` (and the plotting library beside it); the page's path."""
    data = report(conn, start, end, "vehicle", top)
    rows = conn.execute(_DAY_RULE, (start, end)).fetchall()
    out.mkdir(parents=True, exist_ok=True)
    (out / "plotly.min.js").write_text(plotly.offline.get_plotlyjs())
    title = f"{start:%Y-%m-%d %H:%M} – {end:%Y-%m-%d %H:%M} UTC"
    fleet = data["fleet"]
    page = _PAGE.format(
        title=html.escape(title),
        summary=html.escape(
            f"{fleet['alerts']} alerts in {fleet['vehicle_hours']:.1f} vehicle-hours: "
            f"{fleet['per_vehicle_hour']:.3f} per vehicle-hour."
        ),
        per_day=_figure(_per_day(rows)),
        per_vehicle=_figure(_per_vehicle(data["top_vehicles"])),
        rules=_rules_table(data["rules_differing"], data["usual_rules"]),
    )
    path = out / "index.html"
    path.write_text(page)
    return path


def _figure(fig: go.Figure) -> str:
    text: str = fig.to_html(full_html=False, include_plotlyjs=False)
    return text


def _per_day(rows: list[tuple[str, str, int]]) -> go.Figure:
    days = sorted({d for d, _, _ in rows})
    fig = go.Figure(layout={"title": "Alerts per day", "barmode": "stack", "yaxis": {"title": "alerts"}})
    for rule in sorted({r for _, r, _ in rows}):
        counts = {d: n for d, r, n in rows if r == rule}
        fig.add_bar(x=days, y=[counts.get(d, 0) for d in days], name=rule)
    return fig


def _per_vehicle(top: list[dict[str, Any]]) -> go.Figure:
    fig = go.Figure(layout={"title": "Alerts per vehicle-hour, top vehicles", "yaxis": {"title": "per vehicle-hour"}})
    fig.add_bar(
        x=[t["vehicle_id"] for t in top],
        y=[t["per_vehicle_hour"] for t in top],
        text=[f"{t['alerts']} in {t['vehicle_hours']:.1f} h" for t in top],
    )
    return fig


def _rules_table(differ: dict[str, dict[str, Any]], usual: dict[str, Any]) -> str:
    if not differ:
        return "<p>None: every vehicle runs the fleet's usual rules.</p>"
    cells = "".join(
        f"<tr><td>{html.escape(v)}</td><td>{html.escape(path)}</td><td>{html.escape(json.dumps(value))}</td>"
        f"<td>{html.escape(json.dumps(usual[path]))}</td></tr>"
        for v, paths in differ.items()
        for path, value in paths.items()
    )
    return f"<table><tr><th>vehicle</th><th>rule value</th><th>in force</th><th>usually</th></tr>{cells}</table>"
