"""Recordings in memory: one occupant, neutral but for stretches of one emotion, with their own clocks."""

from __future__ import annotations

import dataclasses

from cabin_monitor.config import EMOTIONS_7
from cabin_monitor.record.format import Entry, FrameSample, OccupantSample, RecordingMeta
from tests.support.recordings import session_meta

# long_session: a video file processed at twice its speed, so its wall clock runs apart from its own clock.
ANGRY_S = ((600.0, 630.0), (1300.0, 1340.0))  # seconds into the recording
CAPTURE_T0_S = 5000.0  # the capture clock of the first frame (a file's clock: its start plus the media time)
WALL_T0_S = 1_700_000_000.0
WALL_PER_MEDIA_S = 0.5


def one_occupant_session(
    vehicle_id: str,
    session_id: str,
    duration_s: float,
    fps: float,
    emotion: str,
    spans_s: tuple[tuple[float, float], ...],
    *,
    capture_t0_s: float = 0.0,
    wall_per_media_s: float = 1.0,
) -> list[RecordingMeta | Entry]:
    """A driver reading neutral, but ``emotion`` at 0.9 within ``spans_s`` (seconds into the recording)."""
    meta = dataclasses.replace(
        session_meta(vehicle_id),
        session_id=session_id,
        class_names=EMOTIONS_7,
        model_version="1",
        model_name="test",
        source_kind="file",
        opened_wall_time_s=WALL_T0_S,
    )
    items: list[RecordingMeta | Entry] = [meta]
    for frame_id in range(round(duration_s * fps)):
        media_s = frame_id / fps
        share = 0.9 if any(start <= media_s < end for start, end in spans_s) else 0.0
        raw = tuple(share if name == emotion else 1.0 - share if name == "neutral" else 0.0 for name in EMOTIONS_7)
        occupant = OccupantSample("occupant-1", "driver", 120.0, 120.0, 0.9, raw, raw)
        wall_s = WALL_T0_S + wall_per_media_s * media_s
        items.append(FrameSample(frame_id, capture_t0_s + media_s, wall_s, media_s, (occupant,)))
    return items


def long_session(minutes: float = 25.0, fps: float = 10.0) -> list[RecordingMeta | Entry]:
    """``minutes`` at ``fps``, angry (0.9) within ``ANGRY_S``, processed at twice the video's speed."""
    return one_occupant_session(
        "car-42",
        "fedcba9876543210",
        minutes * 60,
        fps,
        "anger",
        ANGRY_S,
        capture_t0_s=CAPTURE_T0_S,
        wall_per_media_s=WALL_PER_MEDIA_S,
    )


def smiling_session(fps: float = 30.0) -> list[RecordingMeta | Entry]:
    """Neutral for 5 s, smiling (happiness 0.9) for 3 s, neutral for 2 s."""
    return one_occupant_session("car-17", "0123456789abcdef", 10.0, fps, "happiness", ((5.0, 8.0),))
