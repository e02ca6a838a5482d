"""``report``'s ``index.html``: one interactive page, plotly's JavaScript inlined: no server, works offline.

It holds the summary table; the rules in force (each value that differs from the recording's own
rules highlighted, and every change made while recording); per recording, a zoomable timeline per
occupant (a panel per rule with series, as in the PNGs, the "in view" strip below, the x axes zoom
together) and every event, each row leading to its alert's window on the occupant's timeline.

Every time on the page, axes, event table and windows, is seconds since the recording's first frame
on the recording's clock (``capture_s``: for a video file its own media clock); UTC wall-clock
times are given beside them for reference.

May import ``config``, ``messages``, ``record``, ``rules``, ``bus.payloads`` (UTC times as events give them)
and plotly; writes no file.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from cabin_monitor.bus.payloads import utc_iso
from cabin_monitor.config import RulesConfig
from cabin_monitor.messages import Event, Phase
from cabin_monitor.record.replay import Alert, SessionReplay, Summary, TracePoint
from cabin_monitor.rules import RULE_NAMES, Rule

# A longer series is thinned to the lowest and highest value of each of this many buckets / 2, so an
# hour at 30 frames/s stays a page of a few MB and the peaks that open events stay visible.
MAX_POINTS_PER_SERIES = 20_000
# An event's window shows this much before and after it, at least, or half its length if longer.
WINDOW_MARGIN_S = 5.0
_PANEL_HEIGHT_PX = 220
_STRIP_HEIGHT_PX = 70
_DASH = {True: "dash", False: "dot"}  # the threshold an event opens at; the one it closes at
_THRESHOLD_COLOR = {True: "#d62728", False: "#ff7f0e"}
_PRESENCE_COLOR = "#2ca02c"


@dataclass(frozen=True)
class SessionView:
    """One recording's replay, its alerts, and the rules it was made with (when its first file opened)."""

    replay: SessionReplay
    alerts: Sequence[Alert]
    recorded_rules: RulesConfig


def page(sessions: Sequence[SessionView], summary: Summary, rules_source: str) -> str:
    """The whole page; ``rules_source`` says where the rules in force came from (e.g. the ``--set`` values)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>cabin-monitor report</title>",
        f"<style>{_CSS}</style>",
        f"<script>{get_plotlyjs()}</script></head><body>",
        "<h1>cabin-monitor report</h1>",
        f"<p>{summary.sessions} recordings, {len(summary.vehicles)} vehicles, "
        f"{summary.overall.seconds / 3600:.2f} h of readings, {summary.frames} frames. Times are seconds since "
        "each recording's first frame on the recording's clock (a video file's own); drag on a timeline to zoom, "
        "double-click to see it all, click an event to see its window.</p>",
        *_summary_table(summary),
        *_rules_section(sessions, rules_source),
    ]
    for number, view in enumerate(sessions):
        parts += _session_section(view, number)
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts)


def plot_id(session_number: int, occupant_id: str) -> str:
    """The HTML id of an occupant's timeline."""
    return f"timeline-{session_number}-{''.join(c if c.isalnum() else '-' for c in occupant_id)}"


# -- the summary and the rules in force -------------------------------------------------------


def _summary_table(summary: Summary) -> list[str]:
    esc = html.escape
    parts = [
        "<h2>Summary</h2><table><tr><th>scope</th><th>hours</th>",
        *(f"<th>{esc(rule)}: alerts</th><th>per hour</th><th>time in alert (s)</th>" for rule in RULE_NAMES),
        "</tr>",
    ]
    scopes = [("all", summary.overall), *sorted(summary.vehicles.items())]
    scopes += [(f"{v} / {o}", t) for (v, o), t in sorted(summary.occupants.items())]
    for name, tally in scopes:
        cells = "".join(
            f"<td>{tally.count[r]}</td><td>{tally.per_hour(r):.2f}</td><td>{tally.alert_s[r]:.1f}</td>"
            for r in RULE_NAMES
        )
        parts.append(f"<tr><td>{esc(name)}</td><td>{tally.seconds / 3600:.2f}</td>{cells}</tr>")
    parts.append("</table>")
    return parts


def flat_rules(rules: RulesConfig) -> dict[str, Any]:
    """Every rule value by its dotted key (``rules.stress.enter_score``), as JSON values."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}", value)
        else:
            flat[prefix] = node

    walk("rules", rules.model_dump(mode="json"))
    return flat


def _rules_section(sessions: Sequence[SessionView], rules_source: str) -> list[str]:
    """A table per distinct (recorded, in force) pair of rules, the values that differ highlighted."""
    groups: dict[tuple[str, str], list[SessionView]] = {}
    for view in sessions:
        pair = (view.recorded_rules.model_dump_json(), view.replay.rules[0][1].model_dump_json())
        groups.setdefault(pair, []).append(view)
    parts = [f"<h2>Rules in force</h2><p>{html.escape(rules_source)}</p>"]
    for members in groups.values():
        recorded = flat_rules(members[0].recorded_rules)
        in_force = flat_rules(members[0].replay.rules[0][1])
        changed = [key for key in in_force if in_force[key] != recorded.get(key)]
        names = ", ".join(f"{v.replay.vehicle_id} · {v.replay.session_id[:8]}" for v in members)
        parts.append(
            f"<div class='rules'><p>{html.escape(names)}: "
            + ("1 value differs" if len(changed) == 1 else f"{len(changed)} values differ")
            + " from the recording's own rules"
            + (": " + ", ".join(f"<code>{html.escape(k)}</code>" for k in changed) if changed else "")
            + f"</p><details{' open' if changed else ''}><summary>all {len(in_force)} values</summary>"
            "<table><tr><th>rule</th><th>in force</th><th>recording's own</th></tr>"
        )
        for key, value in in_force.items():
            mark = " class='changed'" if key in changed else ""
            parts.append(
                f"<tr{mark}><td>{html.escape(key)}</td><td>{_value(value)}</td>"
                f"<td>{_value(recorded.get(key))}</td></tr>"
            )
        parts.append("</table></details></div>")
    parts += _changes_while_recording(sessions)
    return parts


def _changes_while_recording(sessions: Sequence[SessionView]) -> list[str]:
    """The rules changes replayed from the recordings (``config/set``, SIGHUP), each with what it changed."""
    lines = []
    for view in sessions:
        replay = view.replay
        for (_, before), (since_s, after) in zip(replay.rules, replay.rules[1:], strict=False):
            old, new = flat_rules(before), flat_rules(after)
            diff = ", ".join(
                f"<code>{html.escape(k)}</code> {_value(old.get(k))} → {_value(v)}"
                for k, v in new.items()
                if v != old.get(k)
            )
            at = _at(replay, since_s)
            lines.append(
                f"<li>{html.escape(replay.vehicle_id)} · {html.escape(replay.session_id[:8])} at {at:.2f} s: "
                f"{diff or 'no value changed'}</li>"
            )
    return ["<p>Changed while recording, and replayed so:</p><ul>", *lines, "</ul>"] if lines else []


def _value(value: Any) -> str:
    return html.escape(json.dumps(value))


# -- one recording ------------------------------------------------------------------------------


def _at(replay: SessionReplay, capture_s: float) -> float:
    """``capture_s`` as seconds since the recording's first frame: the page's clock."""
    return capture_s - (replay.first_s if replay.first_s is not None else capture_s)


def _session_section(view: SessionView, number: int) -> list[str]:
    replay = view.replay
    esc = html.escape
    start = utc_iso(replay.first_wall_s) if replay.first_wall_s is not None else "?"
    parts = [
        f"<h2>{esc(replay.vehicle_id)} · session {esc(replay.session_id)}</h2>"
        f"<p>from {start}, {replay.duration_s:.1f} s, {replay.frames} frames, {len(view.alerts)} alerts</p>"
    ]
    for occupant_id in sorted(replay.presence):
        found = [a for a in view.alerts if a.occupant_id == occupant_id]
        figure = timeline(replay, occupant_id, found)
        parts.append(
            figure.to_html(
                full_html=False,
                include_plotlyjs=False,
                div_id=plot_id(number, occupant_id),
                config={"displaylogo": False, "responsive": True},
            )
        )
    parts.append(
        "<div class='events'><table><tr><th>at (s)</th><th>type</th><th>phase</th><th>occupant</th><th>seat</th>"
        "<th>score</th><th>severity</th><th>frame</th><th>wall clock (UTC)</th></tr>"
    )
    windows = event_windows(replay.events, view.alerts)
    for event in replay.events:
        start_s, end_s = windows.get(event.event_id, (event.capture_s, event.capture_s))
        parts.append(
            f"<tr class='event' tabindex='0' data-plot='{plot_id(number, event.occupant_id)}' "
            f"data-at-s='{_at(replay, event.capture_s):.4f}' data-start-s='{_at(replay, start_s):.4f}' "
            f"data-end-s='{_at(replay, end_s):.4f}'><td>{_at(replay, event.capture_s):.2f}</td>"
            f"<td>{esc(event.type)}</td><td>{event.phase.value}</td><td>{esc(event.occupant_id)}</td>"
            f"<td>{esc(event.seat or '')}</td><td>{event.score:.3f}</td><td>{event.severity}</td>"
            f"<td>{event.frame_id}</td><td>{utc_iso(event.wall_time_s)}</td></tr>"
        )
    parts.append("</table></div>")
    return parts


def event_windows(events: Sequence[Event], found: Sequence[Alert]) -> dict[str, tuple[float, float]]:
    """Each event's alert (start and end, capture clock) by event id: a start's own, an end's that it ends."""
    by_start = {(a.occupant_id, a.type, a.start_s): a for a in found}
    starts = {e.event_id: e for e in events if e.phase is Phase.START}
    windows: dict[str, tuple[float, float]] = {}
    for event in events:
        start = event if event.phase is Phase.START else starts.get(event.start_event_id or "")
        alert = None if start is None else by_start.get((start.occupant_id, start.type, start.capture_s))
        if alert is not None:
            windows[event.event_id] = (alert.start_s, alert.end_s)
    return windows


# -- the timeline -----------------------------------------------------------------------------


def timeline(replay: SessionReplay, occupant_id: str, found: Sequence[Alert]) -> go.Figure:
    """One occupant's interactive timeline: a panel per rule with series, then the "in view" strip."""
    charted = [rule for rule in replay.rule_types if rule.series]
    rows = len(charted) + 1
    fig = make_subplots(
        rows=rows,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.04,
        row_heights=[3] * len(charted) + [1],
    )
    points = [p for p in replay.trace if p.occupant_id == occupant_id]
    for row, rule in enumerate(charted, start=1):
        _panel(fig, row, rule, replay, points)
    _shade(fig, rows, "in view", replay.presence.get(occupant_id, []), replay, _PRESENCE_COLOR, 0.6)
    rows_of = {rule.name: row for row, rule in enumerate(charted, start=1)}
    for rule in replay.rule_types:
        spans = [(a.start_s, a.end_s) for a in found if a.type == rule.name]
        if spans:
            _shade(fig, rows_of.get(rule.name, rows), f"{rule.name} events", spans, replay, rule.shade, 0.25)
    fig.update_yaxes(range=[0.0, 1.0], fixedrange=True)  # drag zooms time only
    fig.update_yaxes(showticklabels=False, title_text="in view", row=rows, col=1)
    fig.update_xaxes(range=[0.0, max(replay.duration_s, 1e-6)])
    fig.update_xaxes(title_text="seconds since the recording started (recording clock)", row=rows, col=1)
    counts = ", ".join(f"{sum(a.type == r.name for a in found)} {r.short_name}" for r in replay.rule_types)
    fig.update_layout(
        title_text=html.escape(f"{occupant_id} · {counts}"),
        height=_PANEL_HEIGHT_PX * len(charted) + _STRIP_HEIGHT_PX + 140,
        template="plotly_white",
        hovermode="x",
        dragmode="zoom",
        margin={"l": 70, "r": 20, "t": 50, "b": 50},
        legend={"orientation": "h", "y": -0.12 if charted else -0.5},
    )
    return fig


def _panel(fig: go.Figure, row: int, rule: Rule[Any, Any], replay: SessionReplay, points: Sequence[TracePoint]) -> None:
    """A rule's series and its thresholds (one step per stretch of time its rules were in force)."""
    times = [_at(replay, p.capture_s) for p in points]
    for series in rule.series:
        x, y = thin(times, [p.values.get(series.key) for p in points], MAX_POINTS_PER_SERIES)
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                name=series.label,
                mode="lines",
                line={"color": series.color, "width": 1.5 if series is rule.series[0] else 1.0}
                | ({"dash": "dashdot"} if series.dashed else {}),
                legendgroup=rule.name,
                hovertemplate="%{y:.3f}",
            ),
            row=row,
            col=1,
        )
    for threshold in rule.thresholds:
        x, y = [], []
        values = set()
        for start_s, end_s, rules in _stretches(replay):
            value = rule.threshold(rules, threshold)
            values.add(value)
            x += [_at(replay, start_s), _at(replay, end_s), None]
            y += [value, value, None]
        label = threshold.field + (f" = {values.pop():g}" if len(values) == 1 else " (changed while recording)")
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                name=label,
                mode="lines",
                line={"color": _THRESHOLD_COLOR[threshold.opens], "dash": _DASH[threshold.opens], "width": 1.0},
                legendgroup=rule.name,
                hovertemplate=f"{threshold.field} %{{y:g}}<extra></extra>",
            ),
            row=row,
            col=1,
        )
    fig.update_yaxes(title_text=rule.title, row=row, col=1)


def _stretches(replay: SessionReplay) -> Iterator[tuple[float, float, RulesConfig]]:
    """(start, end, rules) per stretch of the recording one set of rules was in force."""
    if replay.first_s is None or replay.last_s is None:
        return
    changes = replay.rules
    for i, (since_s, rules) in enumerate(changes):
        start_s = max(since_s, replay.first_s)
        end_s = changes[i + 1][0] if i + 1 < len(changes) else replay.last_s
        if end_s >= start_s:
            yield start_s, end_s, rules


def _shade(
    fig: go.Figure,
    row: int,
    name: str,
    spans: Sequence[tuple[float, float]],
    replay: SessionReplay,
    color: str,
    opacity: float,
) -> None:
    """``spans`` (capture clock) as filled boxes over the whole height of panel ``row``, one trace for all."""
    x: list[float | None] = []
    y: list[float | None] = []
    for start_s, end_s in spans:
        a, b = _at(replay, start_s), _at(replay, end_s)
        x += [a, b, b, a, a, None]
        y += [0.0, 0.0, 1.0, 1.0, 0.0, None]
    fig.add_trace(
        go.Scatter(
            x=x,
            y=y,
            name=name,
            mode="lines",
            fill="toself",
            fillcolor=color,
            opacity=opacity,
            line={"width": 0, "color": color},
            hoveron="fills",
            hoverinfo="name",
        ),
        row=row,
        col=1,
    )


def thin(
    times: Sequence[float], values: Sequence[float | None], max_points: int
) -> tuple[list[float | None], list[float | None]]:
    """At most about ``max_points`` of a series: each bucket's lowest and highest value, in time order; a bucket
    with a gap (None) keeps the gap."""
    if len(times) <= max_points:
        return [round(t, 4) for t in times], [None if v is None else round(v, 4) for v in values]
    step = math.ceil(2 * len(times) / max_points)
    x: list[float | None] = []
    y: list[float | None] = []
    for first in range(0, len(times), step):
        bucket = [(i, v) for i in range(first, min(first + step, len(times))) if (v := values[i]) is not None]
        if len(bucket) < min(step, len(times) - first):
            x.append(round(times[first], 4))
            y.append(None)
        if bucket:
            low = min(bucket, key=lambda iv: iv[1])
            high = max(bucket, key=lambda iv: iv[1])
            for i, v in sorted({low, high}):
                x.append(round(times[i], 4))
                y.append(round(v, 4))
    return x, y


_CSS = (
    "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child{text-align:left}"
    "tr.changed td{background:#fff3b0;font-weight:bold}"
    "div.events{max-height:40vh;overflow:auto;display:inline-block}div.events table{margin:0}"
    "tr.event{cursor:pointer}tr.event:hover td{background:#eef4ff}tr.event.shown td{background:#d6e4ff}"
)

# Clicking (or Enter on) an event row zooms every x axis of its occupant's timeline to the event's
# window and brings the timeline into view.
_SCRIPT = f"""
(function () {{
  var margin = {WINDOW_MARGIN_S};
  function showWindow(row) {{
    var plot = document.getElementById(row.dataset.plot);
    if (!plot) return;
    var start = parseFloat(row.dataset.startS), end = parseFloat(row.dataset.endS);
    var pad = Math.max(margin, (end - start) / 2);
    var update = {{}};
    Object.keys(plot.layout).filter(function (k) {{ return /^xaxis\\d*$/.test(k); }}).forEach(function (k) {{
      update[k + '.range'] = [start - pad, end + pad];
    }});
    document.querySelectorAll('tr.event.shown').forEach(function (r) {{ r.classList.remove('shown'); }});
    row.classList.add('shown');
    plot.scrollIntoView({{block: 'nearest'}});
    return Plotly.relayout(plot, update);
  }}
  document.querySelectorAll('tr.event').forEach(function (row) {{
    row.addEventListener('click', function () {{ showWindow(row); }});
    row.addEventListener('keydown', function (ev) {{ if (ev.key === 'Enter') showWindow(row); }});
  }});
}})();
"""
