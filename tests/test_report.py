"""report: a timeline PNG of the documented size per occupant, and an HTML page that names every event."""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pyarrow.parquet as pq
import pytest

from cabin_monitor.cli import main
from cabin_monitor.record.files import expand, open_file, session_items, sessions
from cabin_monitor.record.replay import alerts, replay_session
from cabin_monitor.rules import RULES
from cabin_monitor.tools.report import PNG_HEIGHT_PX, PNG_WIDTH_PX, timeline_figure
from cabin_monitor.tools.report_page import timeline
from tests.support.grin_rule import GrinRule
from tests.support.sessions import smiling_session


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_report_draws_the_timeline_at_its_size_and_lists_every_event(
    live_recording: tuple[Path, list[dict[str, Any]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One PNG of PNG_WIDTH_PX x PNG_HEIGHT_PX for the clip's occupant; index.html names each event with its time."""
    folder, live = live_recording
    out = tmp_path / "report"
    assert main(["report", str(folder), "--out", str(out)]) == 0
    (png,) = out.glob("*.png")
    assert "occupant-1" in png.name
    assert png_size(png) == (PNG_WIDTH_PX, PNG_HEIGHT_PX)
    page = (out / "index.html").read_text()
    rows = re.findall(r"<tr class='event'.*?</tr>", page)
    assert len(rows) == len(live)  # one row per event
    for row, event in zip(rows, live, strict=True):
        assert f"<td>{event['type']}</td><td>{event['phase']}</td>" in row and f"<td>{event['ts']}</td>" in row
    assert "Plotly.newPlot" in page and "stress" in page and "<h2>Rules in force</h2>" in page
    assert re.findall(r"<script[^>]*\ssrc=", page) == []  # plotly.js inlined: nothing to fetch
    assert "\r" not in capsys.readouterr().err  # quiet in a pipe


def test_report_times_agree_with_the_recordings_clock(
    live_recording: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """Each event's time in the table and each alert's shading is its video time less the first frame's, as recorded."""
    folder, _ = live_recording
    (path,) = folder.glob("*.parquet")
    table = pq.read_table(path, columns=["kind", "media_s", "event_type", "event_phase"]).to_pylist()
    first_media_s = next(r["media_s"] for r in table if r["kind"] in ("reading", "frame"))
    recorded = [
        (r["event_type"], r["event_phase"], r["media_s"] - first_media_s) for r in table if r["kind"] == "event"
    ]
    assert main(["report", str(folder), "--out", str(tmp_path)]) == 0
    page = (tmp_path / "index.html").read_text()
    shown = re.findall(r"data-at-s='([^']+)'.*?<td>([a-z_]+)</td><td>(start|end)</td>", page)
    assert [(kind, phase) for _, kind, phase in shown] == [(kind, phase) for kind, phase, _ in recorded]
    assert [float(at) for at, _, _ in shown] == pytest.approx([at for _, _, at in recorded], abs=1e-3)
    (session,) = sessions([open_file(p) for p in expand([str(folder)])])
    replay = replay_session(session_items(session), trace=True)
    figure = timeline(replay, "occupant-1", alerts(replay))
    (shading,) = [t for t in figure.data if t.name == "stress events"]
    stress_starts = [at for kind, phase, at in recorded if (kind, phase) == ("stress", "start")]
    assert list(shading.x[::6]) == pytest.approx(stress_starts, abs=1e-3)


def test_report_with_stricter_rules_shows_fewer_events(
    live_recording: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """--set applies to the report's replay: at enter_score 0.99 the page lists no stress event."""
    folder, live = live_recording
    out = tmp_path / "strict"
    assert main(["report", str(folder), "--out", str(out), "--set", "rules.stress.enter_score=0.99"]) == 0
    page = (out / "index.html").read_text()
    assert "<td>stress</td><td>start</td>" not in page
    assert any(e["type"] == "stress" for e in live)
    assert "with --set rules.stress.enter_score=0.99." in page
    assert "<tr class='changed'><td>rules.stress.enter_score</td><td>0.99</td><td>0.6</td></tr>" in page


def test_a_new_rule_type_gets_its_own_panel() -> None:
    """A replay with a test-only rule type draws a panel for it, after the shipped rules' and before the strip."""
    replay = replay_session(smiling_session(), trace=True, rule_types=(*RULES, GrinRule()))
    fig = timeline_figure(replay, "occupant-1", alerts(replay))
    try:
        assert [ax.get_ylabel() for ax in fig.axes] == ["stress", "unexpected expression", "grin", "in view"]
        grin = fig.axes[2]
        assert [line.get_label() for line in grin.get_lines()] == ["grin score"]
        assert [str(c.get_label()) for c in grin.collections] == ["enter_score = 0.8", "exit_score = 0.5"]
        assert len(grin.patches) == 1  # its alert, shaded
        assert "0 stress, 0 onset, 0 lost, 1 grin" in fig.get_suptitle()
    finally:
        plt.close(fig)
