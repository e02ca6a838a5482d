"""``cabin-monitor report``: a timeline picture per occupant of each recording, and one interactive HTML page.

Each timeline (PNG, always ``PNG_WIDTH_PX`` x ``PNG_HEIGHT_PX``) shows, over the time since the
recording started (media time for a video file), one panel per rule that exposes series
(``Rule.series``, in the order of the rules): its series, its thresholds (``Rule.thresholds``: the
one an event opens at dashed, the one it closes at dotted) as they were in force, and its events
shaded. Below them a strip shows when the occupant was in view, shaded with the events of the rules
without series. With the shipped rules that is the stress score with ``enter_score`` and
``exit_score``; the unexpected-expression fast average and baseline with ``min_score`` and
``exit_score``; and ``occupant_lost`` on the strip.

The scores are those of a replay with the chosen rules (the recording's own by default), so a
picture shows what a threshold change would do. ``index.html`` (``tools.report_page``) draws the same
timelines zoomable, with the summary table, the rules in force and every event, and needs no other
file. Pictures and page run on the recording's clock.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

from cabin_monitor.bus.payloads import utc_iso
from cabin_monitor.config import RulesConfig
from cabin_monitor.errors import ConfigurationError
from cabin_monitor.record.replay import Alert, RulesChoice, SessionReplay, TracePoint, alerts, summarize
from cabin_monitor.rules import Rule, Threshold
from cabin_monitor.tools.progress import Progress
from cabin_monitor.tools.replay import check_choice, load_recordings, replay_all, replay_rows, rules_choice
from cabin_monitor.tools.report_page import SessionView, page

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

PNG_WIDTH_PX = 1200
PNG_HEIGHT_PX = 640
_DPI = 100
# The threshold an event opens at, and the one it closes at.
_THRESHOLD_STYLE = {True: ("#d62728", "--"), False: ("#ff7f0e", ":")}
_Scale = Callable[[float], float]  # capture time -> the timeline's x


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
    with Progress("report", replay_rows(loaded), stream=err) as progress:
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
    views = [
        SessionView(replay, session_alerts, session.files[0].meta.rules)
        for replay, session_alerts, session in zip(replays, found, loaded.sessions, strict=True)
    ]
    index = out / "index.html"
    index.write_text(page(views, summarize(replays, found), rules_source(choice, args.config, args.set)), "utf-8")
    print(f"report: {sum(len(p) for p in pictures)} timelines and {index}", file=err)
    return 0


def rules_source(choice: RulesChoice, config: str | None, sets: Sequence[str]) -> str:
    """Where the rules in force come from, in words."""
    base = f"the rules of {config}" if config else "each recording's own rules (changes made while recording included)"
    return base + (", with " + ", ".join(f"--set {item}" for item in sets) if choice.patch else "") + "."


def draw_timeline(replay: SessionReplay, occupant_id: str, found: Sequence[Alert], path: Path) -> None:
    """One occupant's timeline, written to ``path`` as a PNG of ``PNG_WIDTH_PX`` x ``PNG_HEIGHT_PX``."""
    fig = timeline_figure(replay, occupant_id, found)
    try:
        fig.savefig(path, dpi=_DPI)
    finally:
        plt.close(fig)


def timeline_figure(replay: SessionReplay, occupant_id: str, found: Sequence[Alert]) -> Figure:
    """One occupant's timeline: a panel per rule with series, then the "in view" strip (close it when done)."""
    charted = [rule for rule in replay.rule_types if rule.series]
    fig, axes = plt.subplots(
        len(charted) + 1,
        1,
        figsize=(PNG_WIDTH_PX / _DPI, PNG_HEIGHT_PX / _DPI),
        dpi=_DPI,
        sharex=True,
        squeeze=False,
        gridspec_kw={"height_ratios": [3] * len(charted) + [1]},
        layout="constrained",
    )
    try:
        _draw(fig, axes[:, 0], charted, replay, occupant_id, found)
    except BaseException:
        plt.close(fig)
        raise
    return fig


def _draw(
    fig: Figure,
    axes: Any,
    charted: Sequence[Rule[Any, Any]],
    replay: SessionReplay,
    occupant_id: str,
    found: Sequence[Alert],
) -> None:
    """Draw the panels of ``charted`` and the strip (``axes``, the strip last), the alerts and the title."""
    span_s = replay.duration_s
    minutes = span_s > 900
    scale = 60.0 if minutes else 1.0
    t0 = replay.first_s or 0.0

    def x(t: float) -> float:
        return (t - t0) / scale

    panels = dict(zip((rule.name for rule in charted), axes[:-1], strict=True))
    ax_seen = axes[-1]
    points = [p for p in replay.trace if p.occupant_id == occupant_id]
    for rule in charted:
        _panel(panels[rule.name], rule, replay, points, x)
    for start, end in replay.presence.get(occupant_id, []):
        ax_seen.axvspan(x(start), x(end), color="#2ca02c", alpha=0.6, lw=0)
    shades = {rule.name: rule.shade for rule in replay.rule_types}
    for alert in found:
        ax = panels.get(alert.type, ax_seen)
        ax.axvspan(x(alert.start_s), x(alert.end_s), color=shades.get(alert.type, "#7f7f7f"), alpha=0.25, lw=0)
    ax_seen.set_yticks([])
    ax_seen.set_ylabel("in view")
    ax_seen.set_xlim(0.0, max(span_s / scale, 1e-6))
    unit = "minutes" if minutes else "seconds"
    ax_seen.set_xlabel(f"{unit} since the recording started (recording clock)")
    for ax in panels.values():
        ax.legend(loc="upper right", fontsize=8)
    began = utc_iso(replay.first_wall_s) if replay.first_wall_s is not None else "?"
    counts = ", ".join(f"{sum(a.type == r.name for a in found)} {r.short_name}" for r in replay.rule_types)
    fig.suptitle(
        f"{replay.vehicle_id} · session {replay.session_id[:8]} · {occupant_id} · from {began} · {counts}",
        fontsize=11,
    )


def _panel(ax: Any, rule: Rule[Any, Any], replay: SessionReplay, points: Sequence[TracePoint], x: _Scale) -> None:
    """One rule's panel: its series over time, and its thresholds as they were in force."""
    times = [x(p.capture_s) for p in points]
    for series in rule.series:
        width = 1.2 if series is rule.series[0] else 1.0  # the first is the rule's score
        ax.plot(
            times,
            [_nan(p.values.get(series.key)) for p in points],
            color=series.color,
            lw=width,
            ls="-." if series.dashed else "-",
            label=series.label,
        )
    for threshold in rule.thresholds:
        _threshold(ax, replay, x, rule, threshold)
    ax.set_ylabel(rule.title)
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _threshold(ax: Any, replay: SessionReplay, x: _Scale, rule: Rule[Any, Any], threshold: Threshold) -> None:
    """A threshold as a horizontal line per stretch of time its rules were in force."""
    if replay.first_s is None or replay.last_s is None:
        return
    color, style = _THRESHOLD_STYLE[threshold.opens]
    changes: list[tuple[float, RulesConfig]] = replay.rules
    values = {rule.threshold(rules, threshold) for _, rules in changes}
    label = f"{threshold.field} = {values.pop():g}" if len(values) == 1 else threshold.field
    for i, (since, rules) in enumerate(changes):
        start = max(since, replay.first_s)
        end = changes[i + 1][0] if i + 1 < len(changes) else replay.last_s
        if end >= start:
            ax.hlines(
                rule.threshold(rules, threshold),
                x(start),
                x(end),
                colors=color,
                linestyles=style,
                lw=1.0,
                label=label if i == 0 else None,
            )
