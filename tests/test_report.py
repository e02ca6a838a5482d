"""report: a timeline PNG of the documented size per occupant, and an HTML page that names every event."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pytest

from cabin_monitor.cli import main
from cabin_monitor.record.replay import alerts, replay_session
from cabin_monitor.rules import RULES
from cabin_monitor.tools.report import PNG_HEIGHT_PX, PNG_WIDTH_PX, timeline_figure
from tests.support.grin_rule import GrinRule, smiling_session


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
    assert page.count("<tr><td>20") == len(live)  # one row per event, each starting with its UTC time
    for event in live:
        assert f"<tr><td>{event['ts']}</td><td>{event['type']}</td><td>{event['phase']}</td>" in page
    assert "data:image/png;base64," in page and "stress" in page
    assert "\r" not in capsys.readouterr().err  # quiet in a pipe


def test_report_with_stricter_rules_shows_fewer_events(
    live_recording: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """--set applies to the report's replay: at enter_score 0.99 the page lists no stress event."""
    folder, live = live_recording
    out = tmp_path / "strict"
    assert main(["report", str(folder), "--out", str(out), "--set", "rules.stress.enter_score=0.99"]) == 0
    page = (out / "index.html").read_text()
    assert "</td><td>stress</td>" not in page
    assert any(e["type"] == "stress" for e in live)


def test_a_new_rule_type_gets_its_own_panel() -> None:
    """A replay with a test-only rule type draws a panel for it, after the shipped rules' and before the strip."""
    replay = replay_session(smiling_session(), trace=True, rule_types=(*RULES, GrinRule()))
    fig = timeline_figure(replay, "occupant-1", alerts(replay))
    try:
        assert [ax.get_ylabel() for ax in fig.axes] == ["stress", "unexpected expression", "grin", "in view"]
        grin = fig.axes[2]
        assert [line.get_label() for line in grin.get_lines()] == ["grin score"]
        assert [str(c.get_label()) for c in grin.collections] == ["enter_score", "exit_score"]
        assert len(grin.patches) == 1  # its alert, shaded
        assert "0 stress, 0 onset, 0 lost, 1 grin" in fig.get_suptitle()
    finally:
        plt.close(fig)
