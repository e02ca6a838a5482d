"""Tests of the per-frame stages wired together, on real frames."""

from __future__ import annotations

from pathlib import Path

import cv2

from cabin_monitor.assets import sample_path
from cabin_monitor.config import Config, PrivacyConfig
from cabin_monitor.messages import Frame
from cabin_monitor.runtime.processor import STAGES, FrameProcessor


def frames(n: int) -> list[Frame]:
    """The first n frames of the bundled single-face clip, 1/30 s apart."""
    cap = cv2.VideoCapture(str(sample_path("single_face.mp4")))
    out = []
    for i in range(n):
        ok, image = cap.read()
        assert ok
        out.append(Frame(frame_id=i, capture_s=i / 30, wall_time_s=1.7e9 + i / 30, image=image))
    cap.release()
    return out


def test_a_face_becomes_an_occupant_with_readings_and_stage_timings() -> None:
    """After the tracker confirms the face, each frame yields one reading with landmarks on the face."""
    proc = FrameProcessor(Config())
    results = [proc.process(f) for f in frames(10)]
    proc.close()
    assert [len(r.readings) for r in results[:2]] == [0, 0]  # not confirmed yet
    assert all(len(r.readings) == 1 for r in results[2:])
    reading = results[-1].readings[0]
    x, y, w, h = reading.box
    cx, cy = reading.landmarks.mean(0)
    assert x < cx < x + w and y < cy < y + h
    assert set(results[-1].stage_ms) == set(STAGES)


def test_crops_stay_in_memory_by_default_and_are_written_only_when_enabled(tmp_path: Path) -> None:
    """Crops are off by default; with save_crops on, each reading's crop is written as a grey PNG."""
    assert Config().privacy.save_crops is False
    crops = tmp_path / "crops"
    proc = FrameProcessor(Config(privacy=PrivacyConfig(save_crops=True, crops_dir=crops)))
    for f in frames(5):
        proc.process(f)
    proc.close()
    saved = sorted(crops.glob("*.png"))
    assert len(saved) == 3
    size = proc.model.input_size
    assert cv2.imread(str(saved[0]), cv2.IMREAD_GRAYSCALE).shape == (size, size)
