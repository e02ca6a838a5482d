"""Typed, immutable messages passed between the daemon's parts, and the types they share.

Every message derived from a frame carries the ``frame_id`` of the frame it came from and that
frame's monotonic capture time ``capture_s``, so any stage can tell how old its input is. The
snapshots at the end are what the runtime tells the bus about itself (the health topic).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
ImageArray = npt.NDArray[np.uint8]
Severity = Literal["info", "warning", "critical"]  # lowest first: a full outbox drops the lowest first
_END_NAMESPACE = uuid.UUID("5b0e7c1e-3f7a-4a43-9c2e-6d1f0b8e2a47")


def utc_iso(wall_time_s: float) -> str:
    """UTC epoch seconds as ISO-8601 with millisecond precision and a ``Z``: ``2024-05-01T12:00:00.250Z``."""
    when = datetime.fromtimestamp(wall_time_s, tz=timezone.utc)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Frame:
    """One camera image (BGR, HxWx3 uint8)."""

    frame_id: int
    capture_s: float  # monotonic clock, seconds
    wall_time_s: float  # UTC epoch seconds at capture
    image: ImageArray
    media_s: float | None = None  # seconds into a video file (its own clock); None for cameras and streams


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

    def observation(self) -> Observation:
        """What the rules judge of this reading."""
        return Observation(self.frame_id, self.capture_s, self.wall_time_s, self.occupant_id, self.seat, self.emotions)


@dataclass(frozen=True, slots=True)
class Observation:
    """One occupant in one frame as the rules judge it: who, where, when, and the model's probabilities.

    The live pipeline derives it from an ``EmotionReading``; a replay builds it from a recording.
    """

    frame_id: int
    capture_s: float
    wall_time_s: float
    occupant_id: str
    seat: str | None
    emotions: Mapping[str, float]  # class name -> probability, model order


class Phase(str, Enum):
    """Events open with ``start`` and close with ``end``."""

    START = "start"
    END = "end"


def end_event_id(start_event_id: str) -> str:
    """The ``event_id`` of the ``end`` of the event started by ``start_event_id``: one per start, whoever ends it.

    The rules engine and the next start after a crash (``bus.ledger``) give an end the same id: should
    a crash come after an end was delivered and before the ledger noted it, the interrupted end the
    next start sends is a duplicate of that ``event_id``, which subscribers drop.
    """
    return str(uuid.uuid5(_END_NAMESPACE, start_event_id))


@dataclass(frozen=True, slots=True)
class Event:
    """A rule firing for one occupant, as produced by the rules engine."""

    event_id: str  # UUID, shared by nothing else; an end's is ``end_event_id(start_event_id)``
    type: str  # the rule's name: stress | unexpected_expression | occupant_lost (``rules.RULE_NAMES``)
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
    interrupted: bool = False  # on ``end``: the run that started it ended without ending it


@dataclass(frozen=True, slots=True)
class FrameResult:
    """Everything the pipeline learned from one frame."""

    frame: Frame
    readings: tuple[EmotionReading, ...]
    events: tuple[Event, ...]
    shadow_events: tuple[Event, ...] = ()  # the shadow rules' events, when a shadow set runs
    stage_ms: dict[str, float] = field(default_factory=dict)
    faces_in_view: int = 0  # occupants found (detected or followed) this frame; some may wait to be read
    detected: bool = True  # whether the detector ran on this frame (else faces were followed by landmarks)


class CameraState(str, Enum):
    """What the capture side is doing, as reported in health."""

    STARTING = "starting"
    STREAMING = "streaming"
    STALLED = "stalled"
    REOPENING = "reopening"
    ENDED = "ended"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class CaptureStats:
    """Counters of one source."""

    state: CameraState = CameraState.STARTING
    frames: int = 0
    corrupt_frames: int = 0
    read_failures: int = 0
    reopen_count: int = 0
    last_error: str | None = None
    source: str = ""


class OutboxState(str, Enum):
    """Whether the outbox file takes writes, as reported in health; not ``ok``: new events wait in memory."""

    OK = "ok"
    DISK_FULL = "disk_full"
    UNWRITABLE = "unwritable"


@dataclass(frozen=True, slots=True)
class Refusal:
    """An event the broker refused (an MQTT 5 PUBACK with a failure reason code)."""

    event_id: str
    reason: str  # the reason code's name, e.g. "Not authorized"
    reason_code: int  # e.g. 0x87
    wall_time_s: float  # UTC epoch seconds of the PUBACK


@dataclass(frozen=True, slots=True)
class SinkStats:
    """What a sink reports for the health payload."""

    connected: bool
    reconnects: int  # connections re-established after the first one
    outbox_depth: int  # on disk and in memory
    dropped_total: int
    dropped_by_reason: dict[str, int]
    published_total: int  # events delivered (acknowledged by the broker, or printed)
    outbox_state: OutboxState = OutboxState.OK
    outbox_memory_depth: int = 0
    outbox_memory_unkept: int = 0  # of those, events no fallback file keeps (lost if the process ends now)
    outbox_error: str | None = None  # why the outbox file cannot be written
    refused_total: int = 0  # PUBACKs that refused an event
    last_refusal: Refusal | None = None
    refusing: bool = False  # events are held back after a refusal, retried with backoff
    refusals_detectable: bool = True  # False on MQTT 3.1.1: the broker drops what its ACL refuses, unseen
    dropped_by_type: dict[str, int] = field(default_factory=dict)  # event type -> events dropped


HealthStatus = Literal["ok", "degraded", "error"]
RemoteAction = Literal["set", "get", "reset"]  # config/<action>: the request topics


@dataclass(frozen=True, slots=True)
class RemoteRequest:
    """One operator request as it came off the broker: ``config/<action>``, its bytes, its retain flag."""

    action: RemoteAction
    payload: bytes
    retained: bool  # a retained message replayed by the broker, never a live request
    received_s: float  # monotonic clock, seconds
    oversize_bytes: int = 0  # > 0: the payload had this many bytes, over the limit, and was not kept (empty)

    @property
    def size_bytes(self) -> int:
        """The payload's size as it came off the broker."""
        return self.oversize_bytes or len(self.payload)


@dataclass(frozen=True, slots=True)
class RemoteStats:
    """What became of operators' requests since start-up."""

    received: int  # handed over by the broker connection
    answered: int  # answers published (applied, refused or busy)
    busy: int  # answered "busy": over the rate limit, not applied
    dropped: int  # not even queued (the queue was full): no answer
    queued: int  # waiting for the worker now


@dataclass(frozen=True, slots=True)
class Histogram:
    """Latencies counted since start-up: how many were at most each upper bound, and their sum."""

    bounds_s: tuple[float, ...]  # upper bounds, ascending; +Inf is implied
    cumulative: tuple[int, ...]  # one per bound, then the +Inf bucket: every observation
    sum_s: float

    @property
    def count(self) -> int:
        """How many latencies were observed."""
        return self.cumulative[-1]


@dataclass(frozen=True, slots=True)
class PipelineMetrics:
    """What the pipeline counted since start-up, for the metrics endpoint."""

    stage_latency: dict[str, Histogram]  # by stage
    frame_to_reading: Histogram  # capture to reading, measured at camera pace only
    events: dict[tuple[str, str], int]  # events handed to the sink, by (type, phase)


@dataclass(frozen=True, slots=True)
class HealthSnapshot:
    """The daemon's view of itself at one moment: camera, frames, model, sink and the failure, if any."""

    wall_time_s: float  # UTC epoch seconds
    camera: CaptureStats
    camera_fps: float  # frames delivered by the source per second
    processed_fps: float  # frames through the stages per second
    frames_processed: int
    dropped_frames: int  # replaced in the mailbox before inference took them
    stale_frames: int  # skipped as older than max_frame_age_ms
    model_path: str
    providers_requested: tuple[str, ...]
    provider_in_use: str
    sink: SinkStats
    broker_required: bool  # a broker is configured, so losing it degrades the daemon
    failure: str | None = None  # why a stage thread died
    remote: RemoteStats | None = None  # operators' requests, with a broker
    model_version: str = ""  # the model's own metadata, "unknown" when it has none

    @property
    def status(self) -> HealthStatus:
        """``error`` after a stage failure or with a failed camera; ``degraded`` while the camera or broker is away,
        the outbox cannot be written or the broker refuses events."""
        if self.failure or self.camera.state == CameraState.FAILED:
            return "error"
        if (
            self.camera.state in (CameraState.STALLED, CameraState.REOPENING)
            or (self.broker_required and not self.sink.connected)
            or self.sink.outbox_state != OutboxState.OK
            or self.sink.refusing
        ):
            return "degraded"
        return "ok"

    @property
    def last_error(self) -> str | None:
        """The stage failure, or else the camera's last error."""
        return self.failure or self.camera.last_error
