"""A long recording's items, in memory, whose wall clock runs apart from its own clock (a video file processed
at twice its speed), with two stretches of anger that open stress events."""

from __future__ import annotations

from cabin_monitor.config import EMOTIONS_7, RulesConfig
from cabin_monitor.record.format import Entry, FrameSample, OccupantSample, RecordingMeta

ANGRY_S = ((600.0, 630.0), (1300.0, 1340.0))  # seconds into the recording
CAPTURE_T0_S = 5000.0  # the capture clock of the first frame (a file's clock: its start plus the media time)
WALL_T0_S = 1_700_000_000.0
WALL_PER_MEDIA_S = 0.5  # processed twice as fast as the video runs


def long_session(minutes: float = 25.0, fps: float = 10.0) -> list[RecordingMeta | Entry]:
    """One occupant, neutral but for ``ANGRY_S`` (anger 0.9), ``minutes`` long at ``fps``."""
    meta = RecordingMeta(
        vehicle_id="car-42",
        session_id="fedcba9876543210",
        segment=0,
        class_names=EMOTIONS_7,
        model_version="1",
        model_name="test",
        rules=RulesConfig(),
        source_kind="file",
        opened_wall_time_s=WALL_T0_S,
    )
    items: list[RecordingMeta | Entry] = [meta]
    for frame_id in range(round(minutes * 60 * fps)):
        media_s = frame_id / fps
        anger = 0.9 if any(start <= media_s < end for start, end in ANGRY_S) else 0.0
        raw = tuple(anger if name == "anger" else 1.0 - anger if name == "neutral" else 0.0 for name in EMOTIONS_7)
        occupant = OccupantSample("occupant-1", "driver", 120.0, 120.0, 0.9, raw, raw)
        wall_s = WALL_T0_S + WALL_PER_MEDIA_S * media_s
        items.append(FrameSample(frame_id, CAPTURE_T0_S + media_s, wall_s, media_s, (occupant,)))
    return items
