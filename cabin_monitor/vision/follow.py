"""Following faces between detector runs with the model's own landmarks, and the per-frame reading budget.

The 68 points the model found in a face in frame N give that face's keypoints in frame N+1
(as MediaPipe's face landmarker and openpilot track), so the detector need only run every few
frames: to find new faces, and to check that each followed face is still there. Pure logic:
``FrameProcessor`` calls it between the stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cabin_monitor.messages import EmotionReading, Face, FloatArray, TrackedFace
from cabin_monitor.vision.framing import five_points_from_68
from cabin_monitor.vision.track import iou

Box = tuple[float, float, float, float]

# A followed face whose eye distance changes more than this between frames has been lost:
# faces do not grow or shrink that fast, landmarks read off a background do.
MAX_EYE_DISTANCE_RATIO = 1.5


def keypoints_from_landmarks(landmarks: FloatArray) -> FloatArray:
    """The detector's four keypoints (eye centres, nose tip, mouth centre) from 68 landmarks."""
    five = five_points_from_68(landmarks)
    return np.stack([five[0], five[1], five[2], (five[3] + five[4]) / 2]).astype(np.float32)


@dataclass(frozen=True, slots=True)
class BoxShape:
    """Where the detector put a face's box, relative to its keypoints: in eye distances from their centre."""

    dx: float
    dy: float
    width: float
    height: float


def _eye_distance(keypoints: FloatArray) -> float:
    return float(np.linalg.norm(keypoints[1] - keypoints[0]))


def box_shape(box: Box, keypoints: FloatArray) -> BoxShape:
    """The shape of a detected box relative to the face's keypoints."""
    eyes = max(1e-3, _eye_distance(keypoints))
    cx, cy = keypoints.mean(axis=0)
    x, y, w, h = box
    return BoxShape((x + w / 2 - cx) / eyes, (y + h / 2 - cy) / eyes, w / eyes, h / eyes)


def box_around(keypoints: FloatArray, shape: BoxShape) -> Box:
    """The box a detector would draw around these keypoints."""
    eyes = _eye_distance(keypoints)
    cx, cy = keypoints.mean(axis=0)
    w, h = shape.width * eyes, shape.height * eyes
    return (float(cx + shape.dx * eyes - w / 2), float(cy + shape.dy * eyes - h / 2), float(w), float(h))


# A followed face the detector misses this many times in a row is let go; once is forgiven,
# as detectors miss a face now and then that the landmarks still hold.
MAX_DETECTOR_MISSES = 2


@dataclass
class _Followed:
    keypoints: FloatArray
    shape: BoxShape
    score: float
    misses: int = 0


class FaceFollower:
    """Decides when the detector runs, and where each occupant's face is in between.

    The detector runs on every ``every_frames``-th frame, and at once when a new face awaits
    confirmation, when nobody is being followed, or when a followed face was lost.
    """

    def __init__(self, every_frames: int, min_eye_px: float = 4.0) -> None:
        self.every_frames = every_frames
        self.min_eye_px = min_eye_px
        self._followed: dict[str, _Followed] = {}
        self._frames_since_detection = 0
        self._lost = False

    def detect_now(self, awaiting_confirmation: bool) -> bool:
        """Whether this frame's faces come from the detector."""
        return (
            awaiting_confirmation
            or self._lost
            or not self._followed
            or self._frames_since_detection >= self.every_frames - 1
        )

    def faces(self, frame_id: int, capture_s: float) -> list[Face]:
        """Each followed occupant's face in this frame, where its landmarks put it last."""
        return [self._face(f, frame_id, capture_s) for f in self._followed.values()]

    def fill_in(self, detected: list[Face], frame_id: int, capture_s: float) -> list[Face]:
        """The detector's faces, plus the followed faces it missed for the first time."""
        out = list(detected)
        for followed in self._followed.values():
            face = self._face(followed, frame_id, capture_s)
            if all(iou(face.box, d.box) < 0.3 for d in detected):
                followed.misses += 1
                if followed.misses < MAX_DETECTOR_MISSES:
                    out.append(face)
            else:
                followed.misses = 0
        return out

    @staticmethod
    def _face(followed: _Followed, frame_id: int, capture_s: float) -> Face:
        return Face(
            frame_id=frame_id,
            capture_s=capture_s,
            box=box_around(followed.keypoints, followed.shape),
            score=followed.score,
            keypoints=followed.keypoints,
        )

    def observe(
        self,
        tracked: Sequence[TrackedFace],
        readings: Sequence[EmotionReading],
        detected: bool,
        frame_w: int,
        frame_h: int,
    ) -> None:
        """Take in this frame's occupants and what the model read in them."""
        if detected:
            # Occupants neither found by the detector nor filled in are no longer followed.
            before = self._followed
            self._followed = {}
            for t in tracked:
                kept = before.get(t.occupant_id)
                if kept is not None and kept.misses > 0:
                    self._followed[t.occupant_id] = kept  # filled in: keep its shape and its count
                else:
                    shape = box_shape(t.face.box, t.face.keypoints)
                    self._followed[t.occupant_id] = _Followed(t.face.keypoints, shape, t.face.score)
            self._frames_since_detection = 0
            self._lost = False
        else:
            self._frames_since_detection += 1
        for reading in readings:
            followed = self._followed.get(reading.occupant_id)
            if followed is None:
                continue
            keypoints = keypoints_from_landmarks(reading.landmarks)
            if self._plausible(followed.keypoints, keypoints, frame_w, frame_h):
                followed.keypoints = keypoints
            else:
                del self._followed[reading.occupant_id]
                self._lost = True

    def _plausible(self, before: FloatArray, after: FloatArray, frame_w: int, frame_h: int) -> bool:
        eyes_before, eyes_after = _eye_distance(before), _eye_distance(after)
        if not np.all(np.isfinite(after)) or eyes_after < self.min_eye_px:
            return False
        ratio = eyes_after / max(1e-3, eyes_before)
        cx, cy = after.mean(axis=0)
        inside = 0 <= cx < frame_w and 0 <= cy < frame_h
        return inside and 1 / MAX_EYE_DISTANCE_RATIO <= ratio <= MAX_EYE_DISTANCE_RATIO


class ReadingBudget:
    """At most ``max_faces`` faces read per frame; when more are in view, the longest unread go first.

    With five occupants and a budget of three, each is read on three frames of five: 18 Hz
    from a 30 fps camera. The rules smooth over time and are given each reading's own capture
    time, so an occupant skipped on a frame is judged as before. ``max_faces`` 0: no limit.
    """

    def __init__(self, max_faces: int) -> None:
        self.max_faces = max_faces
        self._last_read_s: dict[str, float] = {}
        self._reads: dict[str, int] = {}

    def select(self, tracked: Sequence[TrackedFace], now_s: float) -> list[TrackedFace]:
        """The faces to read this frame, in their original order."""
        if self.max_faces == 0 or len(tracked) <= self.max_faces:
            chosen = list(tracked)
        else:
            # Longest unread first; among faces last read together, the least read (or the first would win every tie).
            order = sorted(range(len(tracked)), key=lambda i: self._priority(tracked[i].occupant_id))
            keep = set(order[: self.max_faces])
            chosen = [t for i, t in enumerate(tracked) if i in keep]
        for t in chosen:
            self._last_read_s[t.occupant_id] = now_s
            self._reads[t.occupant_id] = self._reads.get(t.occupant_id, 0) + 1
        if len(self._last_read_s) > 4 * max(8, len(tracked)):
            live = {t.occupant_id for t in tracked}
            self._last_read_s = {k: v for k, v in self._last_read_s.items() if k in live}
            self._reads = {k: v for k, v in self._reads.items() if k in live}
        return chosen

    def _priority(self, occupant_id: str) -> tuple[float, int]:
        return self._last_read_s.get(occupant_id, float("-inf")), self._reads.get(occupant_id, 0)
