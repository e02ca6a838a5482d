"""replay: the live events again from a real recording, thresholds that behave, comparisons, fleets, bad files."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from cabin_monitor.cli import main
from cabin_monitor.record.files import expand, open_file, session_items, sessions
from cabin_monitor.record.format import METADATA_KEY, RecordingMeta
from cabin_monitor.record.replay import RulesChoice, alerts, replay_session, summarize
from cabin_monitor.rules import RULES
from cabin_monitor.tools.progress import Progress
from cabin_monitor.tools.replay import load_recordings, replay_all, replay_rows
from tests.support.grin_rule import GRIN, GrinRule
from tests.support.sessions import smiling_session

Live = tuple[Path, list[dict[str, Any]]]
NEW_IDS = ("event_id", "start_event_id")


def printed_lines(text: str) -> list[dict[str, Any]]:
    """The JSON lines of a command's stdout."""
    return [json.loads(line) for line in text.splitlines()]


def test_replay_with_the_recordings_own_rules_prints_exactly_the_live_events(
    live_recording: Live, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every field of every live event payload comes back, in order; only the fresh event ids differ."""
    folder, live = live_recording
    assert {(e["type"], e["phase"]) for e in live} >= {("stress", "start"), ("stress", "end")}
    assert main(["replay", str(folder)]) == 0
    replayed = printed_lines(capsys.readouterr().out)
    assert [{k: v for k, v in e.items() if k not in NEW_IDS} for e in replayed] == [
        {k: v for k, v in e.items() if k not in NEW_IDS} for e in live
    ]
    assert all(r["event_id"] != e["event_id"] for r, e in zip(replayed, live, strict=True))


def test_a_stricter_enter_score_never_yields_more_stress_alerts(live_recording: Live) -> None:
    """Raising rules.stress.enter_score step by step never adds a stress alert, and at 0.99 none is left."""
    (session,) = sessions([open_file(p) for p in expand([str(live_recording[0])])])
    items = list(session_items(session))
    counts = []
    for enter_score in (0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99):
        replay = replay_session(items, RulesChoice(patch={"stress": {"enter_score": enter_score}}))
        counts.append(sum(a.type == "stress" for a in alerts(replay)))
    assert counts == sorted(counts, reverse=True)
    assert counts[0] >= 1 and counts[-1] == 0


def test_compare_prints_the_alert_a_stricter_rule_set_removes_with_its_times(
    live_recording: Live, capsys: pytest.CaptureFixture[str]
) -> None:
    """--compare --set-b enter_score=0.99: one line, the live stress alert 'removed', with its start and end."""
    folder, live = live_recording
    assert main(["replay", str(folder), "--compare", "--set-b", "rules.stress.enter_score=0.99"]) == 0
    captured = capsys.readouterr()
    (change,) = printed_lines(captured.out)
    start = next(e for e in live if e["type"] == "stress" and e["phase"] == "start")
    end = next(e for e in live if e["type"] == "stress" and e["phase"] == "end")
    assert (change["change"], change["type"], change["start_ts"], change["end_ts"]) == (
        "removed",
        "stress",
        start["ts"],
        end["ts"],
    )
    assert "0 alerts added, 1 removed" in captured.err


def test_options_of_the_second_rule_set_need_compare_and_bad_rules_are_refused(
    live_recording: Live, capsys: pytest.CaptureFixture[str]
) -> None:
    """--set-b without --compare, --compare alone, and an invalid --set all exit 2 with the reason."""
    folder = str(live_recording[0])
    assert main(["replay", folder, "--set-b", "rules.stress.enter_score=0.9"]) == 2
    assert main(["replay", folder, "--compare"]) == 2
    assert main(["replay", folder, "--set", "rules.stress.enter_score=1.5"]) == 2
    assert main(["replay", folder, "--set", "stress.enter_score=0.5"]) == 2
    err = capsys.readouterr().err
    assert "describe the second rule set" in err and "needs the second rule set" in err
    assert "rules.stress.enter_score: Input should be less than or equal to 1" in err
    assert "expected rules.<key>" in err


def copy_as_vehicle(source: Path, target: Path, vehicle_id: str) -> None:
    """The recording file again, as if another vehicle had made it."""
    table = pq.read_table(source)
    meta = RecordingMeta.from_json(table.schema.metadata[METADATA_KEY])
    data = json.loads(meta.to_json()) | {"vehicle_id": vehicle_id, "session_id": "0" * 8 + meta.session_id[8:]}
    target.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(data).encode()}), target)


def test_a_fleet_of_folders_is_replayed_with_alert_rates_per_vehicle_and_bad_files_skipped(
    live_recording: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A glob over two vehicles' folders: rates per vehicle and overall; a broken file is named and skipped."""
    (source,) = live_recording[0].glob("*.parquet")
    copy_as_vehicle(source, tmp_path / "fleet" / "car-17" / source.name, "car-17")
    copy_as_vehicle(source, tmp_path / "fleet" / "car-18" / source.name, "car-18")
    (tmp_path / "fleet" / "car-18" / "broken.parquet").write_bytes(b"not parquet at all")
    summary_path = tmp_path / "summary.json"
    code = main(["replay", str(tmp_path / "fleet" / "*"), "--no-events", "--summary-json", str(summary_path)])
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "skipped" in captured.err and "broken.parquet" in captured.err
    assert "\r" not in captured.err  # no progress bar in a pipe
    summary = json.loads(summary_path.read_text())["a"]
    assert set(summary["vehicles"]) == {"car-17", "car-18"}
    for vehicle in summary["vehicles"].values():
        assert vehicle["alerts"]["stress"] == 1
        assert vehicle["alerts_per_hour"]["stress"] == pytest.approx(3600 / (vehicle["hours"] * 3600))
    assert summary["overall"]["alerts"]["stress"] == 2
    assert summary["sessions"] == 2


def test_nothing_to_replay_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty folder or a missing path exits 2 and says so."""
    assert main(["replay", str(tmp_path)]) == 2
    assert main(["replay", str(tmp_path / "nowhere-*.parquet")]) == 2
    err = capsys.readouterr().err
    assert "no recording files" in err and "no such file, folder or match" in err


def test_a_new_rule_types_events_and_series_come_through_the_replay() -> None:
    """With a test-only rule type added, the replay raises its alert, counts it and traces its series."""
    replay = replay_session(smiling_session(), trace=True, rule_types=(*RULES, GrinRule()))
    assert [(e.type, e.phase.value) for e in replay.events] == [(GRIN, "start"), (GRIN, "end")]
    (alert,) = alerts(replay)
    assert (alert.type, alert.start_s, alert.end_s) == (GRIN, 5.0, 8.0)
    assert summarize([replay], [[alert]]).as_json()["overall"]["alerts"][GRIN] == 1
    values = {p.capture_s: p.values for p in replay.trace}
    assert values[6.0]["grin.score"] == pytest.approx(0.9)
    assert values[9.0]["grin.score"] == 0.0
    assert set(values[9.0]) == {
        "stress.score",
        "unexpected_expression.fast",
        "unexpected_expression.baseline",
        "unexpected_expression.rise_level",
        "grin.score",
    }


def test_the_progress_bar_counts_every_row_of_the_recording(live_recording: Live) -> None:
    """Replaying one file, the bar counts its rows (as Parquet counts them) up to 100 %, once per rule set."""
    loaded = load_recordings([str(live_recording[0])], io.StringIO())
    (path,) = expand([str(live_recording[0])])
    rows = pq.read_metadata(path).num_rows
    assert replay_rows(loaded, 2) == 2 * rows
    stream = io.StringIO()
    with Progress("replay", replay_rows(loaded, 2), stream, tty=True) as bar:
        replay_all(loaded, [RulesChoice(), RulesChoice(patch={"stress": {"enter_score": 0.9}})], bar)
        assert bar.done == 2 * rows
    assert f"replay 100% {2 * rows}/{2 * rows}" in stream.getvalue()
