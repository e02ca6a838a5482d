"""``cabin-monitor report``: a timeline picture per occupant of each recording, and one HTML page with them all.

Each timeline (PNG, always ``PNG_WIDTH_PX`` x ``PNG_HEIGHT_PX``) has three panels over the time since
the recording started (media time for a video file):

1. the stress rule's group score (the smoothed sum of its classes) with ``enter_score`` and
   ``exit_score``, stress events shaded;
2. the unexpected-expression rule's fast average and the slow baseline it is compared with, with
   ``min_score`` and ``exit_score``, onset events shaded;
3. when the occupant was in view, ``occupant_lost`` events shaded.

The scores are those of a replay with the chosen rules (the recording's own by default), so a
picture shows what a threshold change would do. ``index.html`` holds the pictures inline, the
summary table and every event, and needs no other file.
"""

from __future__ import annotations

import base64
import html
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

from cabin_monitor.bus.payloads import utc_iso
from cabin_monitor.config import RulesConfig
from cabin_monitor.errors import ConfigurationError
from cabin_monitor.record.replay import Alert, SessionReplay, Summary, alerts, summarize
from cabin_monitor.rules import LOST, ONSET, RULE_NAMES, STRESS
from cabin_monitor.tools.progress import Progress
from cabin_monitor.tools.replay import check_choice, load_recordings, replay_all, rules_choice

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt

PNG_WIDTH_PX = 1200
PNG_HEIGHT_PX = 640
_DPI = 100
_SHADE = {STRESS: "#d62728", ONSET: "#9467bd", LOST: "#7f7f7f"}


def report_command(args: Any) -> int:
    """The ``report`` sub-command."""
    err = sys.stderr
    out = Path(args.out)
    choice = rules_choice(args.config, args.set)
    loaded = load_recordings(args.recordings, err)
    check_choice(choice, loaded.sessions[0].files[0].meta, "rules")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(f"report: cannot create {out}: {exc.strerror or exc}") from None
    with Progress("report", sum(len(s.files) for s in loaded.sessions), stream=err) as progress:
        replays = replay_all(loaded, [choice], progress, trace=True)[0]
    found = [alerts(r) for r in replays]
    pictures: list[list[Path]] = []
    with Progress("timelines", sum(len(r.presence) for r in replays), stream=err) as progress:
        for replay, session_alerts in zip(replays, found, strict=True):
            drawn = []
            for occupant_id in sorted(replay.presence):
                path = out / f"timeline-{replay.vehicle_id}-{replay.session_id[:8]}-{occupant_id}.png"
                draw_timeline(replay, occupant_id, [a for a in session_alerts if a.occupant_id == occupant_id], path)
                drawn.append(path)
                progress.advance()
            pictures.append(drawn)
    page = out / "index.html"
    page.write_text(html_page(replays, found, pictures, summarize(replays, found)), encoding="utf-8")
    print(f"report: {sum(len(p) for p in pictures)} timelines and {page}", file=err)
    return 0


def draw_timeline(replay: SessionReplay, occupant_id: str, found: Sequence[Alert], path: Path) -> None:
    """One occupant's timeline, written to ``path`` as a PNG of ``PNG_WIDTH_PX`` x ``PNG_HEIGHT_PX``."""
    t0 = replay.first_s or 0.0
    span_s = replay.duration_s
    minutes = span_s > 900
    scale = 60.0 if minutes else 1.0

    def x(t: float) -> float:
        return (t - t0) / scale

    points = [p for p in replay.trace if p.occupant_id == occupant_id]
    fig, (ax_stress, ax_onset, ax_seen) = plt.subplots(
        3,
        1,
        figsize=(PNG_WIDTH_PX / _DPI, PNG_HEIGHT_PX / _DPI),
        dpi=_DPI,
        sharex=True,
        gridspec_kw={"height_ratios": [3, 3, 1]},
        layout="constrained",
    )
    try:
        times = [x(p.capture_s) for p in points]
        ax_stress.plot(times, [_nan(p.stress_score) for p in points], color="#1f77b4", lw=1.2, label="stress score")
        _thresholds(ax_stress, replay, x, lambda r: r.stress.enter_score, "enter_score", "#d62728", "--")
        _thresholds(ax_stress, replay, x, lambda r: r.stress.exit_score, "exit_score", "#ff7f0e", ":")
        ax_stress.set_ylabel("stress")
        ax_onset.plot(times, [_nan(p.onset_score) for p in points], color="#9467bd", lw=1.2, label="fast average")
        ax_onset.plot(times, [_nan(p.onset_baseline) for p in points], color="#555555", lw=1.0, label="baseline")
        _thresholds(ax_onset, replay, x, lambda r: r.unexpected_expression.min_score, "min_score", "#d62728", "--")
        _thresholds(ax_onset, replay, x, lambda r: r.unexpected_expression.exit_score, "exit_score", "#ff7f0e", ":")
        ax_onset.set_ylabel("unexpected expression")
        for ax in (ax_stress, ax_onset):
            ax.set_ylim(0.0, 1.0)
            ax.grid(alpha=0.3)
        for start, end in replay.presence.get(occupant_id, []):
            ax_seen.axvspan(x(start), x(end), color="#2ca02c", alpha=0.6, lw=0)
        for alert in found:
            ax = {STRESS: ax_stress, ONSET: ax_onset}.get(alert.type, ax_seen)
            ax.axvspan(x(alert.start_s), x(alert.end_s), color=_SHADE.get(alert.type, "#7f7f7f"), alpha=0.25, lw=0)
        ax_seen.set_yticks([])
        ax_seen.set_ylabel("in view")
        ax_seen.set_xlim(0.0, max(span_s / scale, 1e-6))
        ax_seen.set_xlabel("minutes since the recording started" if minutes else "seconds since the recording started")
        ax_stress.legend(loc="upper right", fontsize=8)
        ax_onset.legend(loc="upper right", fontsize=8)
        began = utc_iso(replay.first_wall_s) if replay.first_wall_s is not None else "?"
        fig.suptitle(
            f"{replay.vehicle_id} · session {replay.session_id[:8]} · {occupant_id} · from {began}"
            f" · {sum(a.type == STRESS for a in found)} stress, {sum(a.type == ONSET for a in found)} onset,"
            f" {sum(a.type == LOST for a in found)} lost",
            fontsize=11,
        )
        fig.savefig(path, dpi=_DPI)
    finally:
        plt.close(fig)


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _thresholds(ax: Any, replay: SessionReplay, x: Any, pick: Any, label: str, color: str, style: str) -> None:
    """A threshold as a horizontal line per stretch of time its rules were in force."""
    if replay.first_s is None or replay.last_s is None:
        return
    changes: list[tuple[float, RulesConfig]] = replay.rules
    for i, (since, rules) in enumerate(changes):
        start = max(since, replay.first_s)
        end = changes[i + 1][0] if i + 1 < len(changes) else replay.last_s
        if end >= start:
            ax.hlines(
                pick(rules), x(start), x(end), colors=color, linestyles=style, lw=1.0, label=label if i == 0 else None
            )


def html_page(
    replays: Sequence[SessionReplay],
    found: Sequence[Sequence[Alert]],
    pictures: Sequence[Sequence[Path]],
    summary: Summary,
) -> str:
    """The self-contained report page: the summary table, then per recording its timelines and every event."""
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>cabin-monitor report</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child{text-align:left}"
        "img{max-width:100%}</style></head><body>",
        "<h1>cabin-monitor report</h1>",
        f"<p>{summary.sessions} recordings, {len(summary.vehicles)} vehicles, "
        f"{summary.overall.seconds / 3600:.2f} h of readings, {summary.frames} frames.</p>",
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
    for replay, session_alerts, drawn in zip(replays, found, pictures, strict=True):
        start = utc_iso(replay.first_wall_s) if replay.first_wall_s is not None else "?"
        parts.append(
            f"<h2>{esc(replay.vehicle_id)} · session {esc(replay.session_id)}</h2>"
            f"<p>from {start}, {replay.duration_s:.1f} s, {replay.frames} frames, {len(session_alerts)} alerts</p>"
        )
        for path in drawn:
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            parts.append(f"<p><img alt='{esc(path.name)}' src='data:image/png;base64,{data}'></p>")
        parts.append(
            "<table><tr><th>time (UTC)</th><th>type</th><th>phase</th><th>occupant</th><th>seat</th>"
            "<th>score</th><th>severity</th><th>frame</th></tr>"
        )
        for event in replay.events:
            parts.append(
                f"<tr><td>{utc_iso(event.wall_time_s)}</td><td>{esc(event.type)}</td><td>{event.phase.value}</td>"
                f"<td>{esc(event.occupant_id)}</td><td>{esc(event.seat or '')}</td><td>{event.score:.3f}</td>"
                f"<td>{event.severity}</td><td>{event.frame_id}</td></tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
