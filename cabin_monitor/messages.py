"""Typed, immutable messages passed between pipeline stages.

Every message carries the ``frame_id`` of the frame it came from and that
frame's monotonic capture time ``capture_s``, so any stage can tell how old
its input is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
ImageArray = npt.NDArray[np.uint8]
Severity = Literal["info", "warning", "critical"]  # lowest first: a full outbox drops the lowest first


@dataclass(frozen=True, slots=True)
class Frame:
    """One camera image (BGR, HxWx3 uint8)."""

    frame_id: int
    capture_s: float  # monotonic clock, seconds
    wall_time_s: float  # UTC epoch seconds at capture
    image: ImageArray


@dataclass(frozen=True, slots=True)
class Face:
    """A detected face in frame pixels.

    ``keypoints`` is [4, 2]: right eye (image left), left eye, nose tip and
    mouth centre, the points every supported detector provides.
    """

    frame_id: int
    capture_s: float
    box: tuple[float, float, float, float]  # x, y, width, height in pixels
    score: float
    keypoints: FloatArray


@dataclass(frozen=True, slots=True)
class TrackedFace:
    """A face with the occupant it belongs to."""

    face: Face
    occupant_id: str
    seat: str | None


@dataclass(frozen=True, slots=True)
class AlignedFace:
    """A canonical grey crop of a tracked face and the frame-to-crop transform."""

    tracked: TrackedFace
    crop: ImageArray  # S x S uint8
    frame_to_crop: FloatArray  # 2 x 3 affine, continuous pixel coordinates


@dataclass(frozen=True, slots=True)
class EmotionReading:
    """The model's reading of one occupant in one frame."""

    frame_id: int
    capture_s: float
    wall_time_s: float
    occupant_id: str
    seat: str | None
    box: tuple[float, float, float, float]
    face_score: float
    emotions: dict[str, float]  # class name -> probability, model order
    landmarks: FloatArray  # [68, 2] frame pixels

    @property
    def top_emotion(self) -> str:
        """The most probable class."""
        return max(self.emotions, key=lambda k: self.emotions[k])


class Phase(str, Enum):
    """Events open with ``start`` and close with ``end``."""

    START = "start"
    END = "end"


@dataclass(frozen=True, slots=True)
class Event:
    """A rule firing for one occupant, as produced by the rules engine."""

    event_id: str  # UUID, shared by nothing else
    type: str  # stress | unexpected_expression | occupant_lost
    phase: Phase
    rule: str  # the configured rule name
    occupant_id: str
    seat: str | None
    capture_s: float  # monotonic time of the reading that triggered it
    wall_time_s: float  # UTC epoch seconds of that reading
    score: float
    emotions: dict[str, float]
    started_wall_time_s: float | None = None  # on ``end``: when the event started
    start_event_id: str | None = None  # on ``end``: the ``event_id`` of its start
    severity: Severity = "warning"
    frame_id: int = -1


@dataclass(frozen=True, slots=True)
class FrameResult:
    """Everything the pipeline learned from one frame."""

    frame: Frame
    readings: tuple[EmotionReading, ...]
    events: tuple[Event, ...]
    stage_ms: dict[str, float] = field(default_factory=dict)
