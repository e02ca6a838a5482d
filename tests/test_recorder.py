"""The recorder thread: rotated, capped, finished files; never a wait for the inference thread; a full disk survived."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cabin_monitor.config import RecordConfig, RulesConfig
from cabin_monitor.record.files import open_file, read_entries
from cabin_monitor.record.format import Closing, FrameSample, RulesChange
from cabin_monitor.runtime.recorder import Recorder
from tests.support.helpers import wait_until
from tests.support.recordings import CLASSES, one_occupant, session_meta


def test_files_rotate_by_size_stay_under_the_cap_and_carry_their_session(tmp_path: Path) -> None:
    """Small files and cap: several finished files, the oldest deleted, the newest segments kept, metadata in each."""
    cfg = RecordConfig(dir=tmp_path, max_file_mb=0.02, max_total_mb=0.1, row_group_rows=64, queue_max_frames=10000)
    recorder = Recorder(cfg, session_meta())
    recorder.start()
    for result in one_occupant(8000):
        recorder.record_frame(result, ())
    recorder.record_rules(RulesConfig.model_validate({"stress": {"enter_score": 0.8}}), 2000.0, 1.7e9 + 2000.0)
    recorder.record_close((), 2000.0, 1.7e9 + 2000.0)
    recorder.stop(30.0)
    files = sorted(tmp_path.glob("*.parquet"), key=lambda p: open_file(p).meta.segment)
    assert recorder.files_written > len(files) >= 2  # some were deleted by the cap
    assert not list(tmp_path.glob("*.partial"))
    assert sum(p.stat().st_size for p in files) <= cfg.max_total_mb * 1e6
    segments = [open_file(p).meta.segment for p in files]
    assert segments == list(range(recorder.files_written - len(files), recorder.files_written))
    last = open_file(files[-1])
    assert (last.meta.vehicle_id, last.meta.model_version, last.meta.class_names) == ("car-17", "0.6.0", CLASSES)
    tail = list(read_entries(last))
    assert isinstance(tail[-2], RulesChange) and isinstance(tail[-1], Closing)
    assert tail[-2].rules.stress.enter_score == 0.8
    assert recorder.dropped_frames == recorder.lost_rows == 0


def test_a_file_closes_when_old_enough_and_the_next_one_names_the_rules_then_in_force(tmp_path: Path) -> None:
    """Past max_file_age_s the file is finished even while idle; the next file's metadata has the changed rules."""
    now = [0.0]
    recorder = Recorder(RecordConfig(dir=tmp_path, max_file_age_s=60.0), session_meta(), clock=lambda: now[0])
    recorder.start()
    batch = one_occupant(20)
    for result in list(batch)[:10]:
        recorder.record_frame(result, ())
    recorder.record_rules(RulesConfig.model_validate({"smoothing_s": 0.2}), 1.0, 2.0)
    wait_until(lambda: recorder._queue.empty(), what="the writer took the frames")
    now[0] = 61.0
    wait_until(lambda: recorder.files_written == 1, what="the first file closed by age")
    for result in one_occupant(5, seed=2):
        recorder.record_frame(result, ())
    recorder.stop(30.0)
    first, second = sorted((open_file(p) for p in tmp_path.glob("*.parquet")), key=lambda f: f.meta.segment)
    assert first.meta.rules == RulesConfig() and second.meta.rules.smoothing_s == 0.2
    assert [type(e) for e in read_entries(first)] == [FrameSample] * 10 + [RulesChange]


def test_an_unfinished_file_of_an_earlier_run_is_deleted_at_start(tmp_path: Path) -> None:
    """A .parquet.partial (no footer: a crash) cannot be read, so start deletes it."""
    leftover = tmp_path / "car-17-20260101T000000Z-deadbeef-00004.parquet.partial"
    leftover.write_bytes(b"PAR1 half a row group")
    recorder = Recorder(RecordConfig(dir=tmp_path), session_meta())
    recorder.start()
    recorder.stop(10.0)
    assert not leftover.exists()


def test_a_writer_that_is_behind_costs_the_inference_thread_nothing_but_a_count(tmp_path: Path) -> None:
    """With the writer not taking frames, record_frame returns at once and counts what did not fit."""
    # Never started: nothing drains.
    recorder = Recorder(RecordConfig(dir=tmp_path, queue_max_frames=10), session_meta())
    for result in one_occupant(25):
        recorder.record_frame(result, ())
    assert recorder.dropped_frames == 15


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, mounted for the test (root only)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_loses_rows_but_neither_the_recorder_nor_the_caller_fails(tiny_tmpfs: Path) -> None:
    """On a full filesystem writes fail; the rows are counted as lost, the thread ends cleanly at stop."""
    cfg = RecordConfig(dir=tiny_tmpfs, max_file_mb=0.1, max_total_mb=100, row_group_rows=512, queue_max_frames=40000)
    recorder = Recorder(cfg, session_meta())
    recorder.start()
    for result in one_occupant(30000):
        recorder.record_frame(result, ())
    recorder.stop(60.0)
    assert recorder.lost_rows > 0
    assert recorder._thread is not None and not recorder._thread.is_alive()
    for path in tiny_tmpfs.glob("*.parquet"):  # what was finished is whole
        assert open_file(path).rows > 0
