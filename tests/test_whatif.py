"""Fleet what-if: one summary whichever way replay runs (in-process, local workers, a cluster), threshold sweeps."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from cabin_monitor.cli import main
from cabin_monitor.record.files import expand, open_file, sessions
from cabin_monitor.record.replay import RulesChoice
from cabin_monitor.record.whatif import fold, merge, replay_unit
from cabin_monitor.tools.sweep import parse_axis, pick
from tests.support.dask_cluster import dask_cluster
from tests.support.recordings import make_fleet

Live = tuple[Path, list[dict[str, Any]]]
VEHICLES = ("car-1", "car-2", "car-3")
SWEEP = "rules.stress.enter_score=0.45:0.95:0.1"


@pytest.fixture(scope="module")
def fleet(live_recording: Live, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three vehicles' folders, each holding the live recording as its own."""
    return make_fleet(live_recording[0], VEHICLES, tmp_path_factory.mktemp("fleet"))


def summary_of(args: list[str], path: Path) -> dict[str, Any]:
    """``replay ARGS --no-events --summary-json PATH``, which must succeed, and the JSON it wrote."""
    assert main(["replay", *args, "--no-events", "--summary-json", str(path)]) == 0
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def test_the_summary_is_identical_in_process_on_local_workers_and_on_a_cluster(fleet: Path, tmp_path: Path) -> None:
    """A sweep over three vehicles gives the same JSON in-process, with --workers 2 and on a scheduler with two
    workers started as processes; the inputs named by a file:// glob."""
    args = [f"file://{fleet}/*", "--sweep", SWEEP]
    in_process = summary_of(args, tmp_path / "in-process.json")
    assert set(in_process["a"]["vehicles"]) == set(VEHICLES) and len(in_process["sweep"]) == 6
    assert summary_of([*args, "--workers", "2"], tmp_path / "local.json") == in_process
    with dask_cluster(tmp_path, workers=2) as address:
        assert summary_of([*args, "--scheduler", address], tmp_path / "cluster.json") == in_process


def test_a_sweep_equals_separate_replays_and_a_stricter_enter_score_never_adds_alerts(
    fleet: Path, tmp_path: Path
) -> None:
    """Each swept value's overall block is that of a replay with --set at that value; stress alerts only fall."""
    swept = summary_of([str(fleet), "--sweep", SWEEP], tmp_path / "sweep.json")["sweep"]
    values = [entry["value"] for entry in swept]
    assert values == [0.45, 0.55, 0.65, 0.75, 0.85, 0.95]
    for entry in swept:
        alone = summary_of([str(fleet), "--set", f"rules.stress.enter_score={entry['value']}"], tmp_path / "one.json")
        assert entry["overall"] == alone["a"]["overall"]
    stress = [entry["overall"]["alerts"]["stress"] for entry in swept]
    assert stress == sorted(stress, reverse=True)
    assert stress[0] == len(VEHICLES) and stress[-1] == 0


def test_a_grid_sweep_gives_every_pair_and_each_equals_its_replay(fleet: Path, tmp_path: Path) -> None:
    """Two paths: one entry per pair with both values, each equal to a replay setting both."""
    grid = summary_of(
        [str(fleet), "--sweep", "rules.stress.enter_score=0.6:0.9:0.3", "--sweep", "rules.stress.sustain_s=1:9:8"],
        tmp_path / "grid.json",
    )["sweep"]
    pairs = [(e["values"]["rules.stress.enter_score"], e["values"]["rules.stress.sustain_s"]) for e in grid]
    assert pairs == [(0.6, 1), (0.6, 9), (0.9, 1), (0.9, 9)]
    for entry, (enter_score, sustain_s) in zip(grid, pairs, strict=True):
        sets = ["--set", f"rules.stress.enter_score={enter_score}", "--set", f"rules.stress.sustain_s={sustain_s}"]
        assert entry["overall"] == summary_of([str(fleet), *sets], tmp_path / "one.json")["a"]["overall"]


def test_a_target_rate_names_the_value_meeting_it_and_the_rollout_command(
    fleet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--target-rate 0: the least strict value without a stress alert, with the ready fleet rollout command."""
    document = summary_of([str(fleet), "--sweep", SWEEP, "--target-rate", "0"], tmp_path / "target.json")
    err = capsys.readouterr().err
    first_quiet = next(e["value"] for e in document["sweep"] if e["overall"]["alerts"]["stress"] == 0)
    command = f"cabin-monitor fleet rollout --all --set rules.stress.enter_score={first_quiet}"
    assert document["target"] == {"alerts_per_vehicle_hour": 0.0, "met_by": {"value": first_quiet}, "command": command}
    assert command in err and "car-1" in err


def test_partial_summaries_merge_associatively_into_the_whole(fleet: Path) -> None:
    """(a+b)+c == a+(b+c) for three sessions' summaries, and the fold counts every session and alert."""
    found = sessions([open_file(p) for p in expand([str(fleet)])])
    a, b, c = (replay_unit(s, [RulesChoice()])[0].summary for s in found)
    left, right = merge(merge(a, b), c), merge(a, merge(b, c))
    assert left.sessions == right.sessions == 3
    assert left.overall.count == right.overall.count and left.overall.seconds == pytest.approx(right.overall.seconds)
    assert set(left.vehicles) == set(VEHICLES) and fold([a, b, c]).as_json() == left.as_json()


def test_sweep_values_and_the_choice_for_a_target() -> None:
    """START:STOP:STEP includes STOP, keeps integers whole; the pick is the least strict value meeting the rate."""
    assert parse_axis("rules.stress.enter_score=0.5:0.7:0.1").values == (0.5, 0.6, 0.7)
    assert parse_axis("rules.stress.sustain_s=1:5:2").values == (1, 3, 5)
    assert pick([3.0, 2.0, 0.5, 0.0, 0.0], target=1.0) == 2
    assert pick([0.0, 0.0, 2.0], target=1.0) == 1
    assert pick([3.0, 2.0], target=1.0) is None


def test_bad_sweeps_and_a_missing_fleet_extra_are_one_line_errors(
    fleet: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A malformed or invalid sweep, --target-rate alone, and --workers without Dask exit 2 with the reason."""
    assert main(["replay", str(fleet), "--sweep", "rules.stress.enter_score=0.9:0.5:0.1"]) == 2
    assert main(["replay", str(fleet), "--sweep", "rules.stress.enter_score=0.3:0.5:0.1"]) == 2
    assert main(["replay", str(fleet), "--target-rate", "1"]) == 2
    monkeypatch.setitem(sys.modules, "distributed", None)
    assert main(["replay", str(fleet), "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "needs STEP > 0 and STOP >= START" in err and "exit_score (0.4) must be below enter_score (0.3)" in err
    assert "--target-rate chooses among the values of --sweep" in err
    assert "need Dask: pip install 'cabin-monitor[fleet]'" in err
