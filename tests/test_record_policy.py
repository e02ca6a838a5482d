"""Rotation and the folder cap: when a file closes, which old files go."""

from __future__ import annotations

from cabin_monitor.record.policy import FileInfo, RotationPolicy

POLICY = RotationPolicy(max_file_bytes=100, max_file_age_s=60.0, max_total_bytes=350)


def test_a_file_rotates_when_big_or_old_enough() -> None:
    """Below both limits a file stays open; reaching either closes it."""
    assert not POLICY.should_rotate(99, opened_s=0.0, now_s=59.9)
    assert POLICY.should_rotate(100, opened_s=0.0, now_s=1.0)
    assert POLICY.should_rotate(10, opened_s=0.0, now_s=60.0)


def test_the_oldest_files_go_until_one_more_file_fits_under_the_cap() -> None:
    """Oldest first, by modification time, until the closed files leave room for the file being written."""
    files = [FileInfo(f"f{i}", 100, mtime_s=float(t)) for i, t in enumerate([30, 10, 20, 40])]
    assert [f.name for f in POLICY.over_cap(files)] == ["f1", "f2"]  # 400 -> 200 <= 350 - 100
    assert POLICY.over_cap(files[:2]) == []
