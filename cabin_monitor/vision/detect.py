"""Face detection: MediaPipe BlazeFace (Tasks API) or YuNet (OpenCV), behind one interface."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from cabin_monitor.assets import DETECTOR_FILES, find_model
from cabin_monitor.config import DetectorConfig, DetectRegion
from cabin_monitor.errors import ModelNotFoundError
from cabin_monitor.messages import Face, Frame, ImageArray
from cabin_monitor.vision.track import iou

# OpenCV logs a harmless notice per YuNet model load; keep stderr for our own logs.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


class FaceDetector(Protocol):
    """Turns a frame into the faces in it, best first."""

    def detect(self, frame: Frame) -> list[Face]:
        """Faces in ``frame``, highest score first."""
        ...

    def close(self) -> None:
        """Release the backend."""
        ...


def _keep(faces: list[Face], cfg: DetectorConfig) -> list[Face]:
    wide_enough = [f for f in faces if f.box[2] >= cfg.min_face_px]
    wide_enough.sort(key=lambda f: f.score, reverse=True)
    return wide_enough[: cfg.max_faces]


class BlazeFaceDetector:
    """MediaPipe BlazeFace short- or full-range model, or both on the same image, run through ``mediapipe.tasks``.

    With both, each model sees the one converted image, and a face both find counts once.
    """

    def __init__(self, cfg: DetectorConfig) -> None:
        # Imported here: mediapipe takes a second to import and YuNet users never need it.
        from mediapipe.tasks.python import BaseOptions, vision

        self.cfg = cfg
        ranges = ("short", "full") if cfg.range == "both" else (cfg.range,)
        paths = [cfg.model_path or find_model(DETECTOR_FILES[("blazeface", r)]) for r in ranges]
        for path in paths:
            _require_file(path)
        logging.getLogger("absl").setLevel(logging.ERROR)
        self._detectors: list[vision.FaceDetector] = []
        with _native_stderr_silenced():
            try:
                for path in paths:
                    options = vision.FaceDetectorOptions(
                        base_options=BaseOptions(model_asset_path=str(path)),
                        running_mode=vision.RunningMode.IMAGE,
                        min_detection_confidence=cfg.min_score,
                    )
                    self._detectors.append(vision.FaceDetector.create_from_options(options))
                # The first call reallocates its input buffer and says so; get that over with here.
                self.detect(Frame(-1, 0.0, 0.0, np.zeros((128, 128, 3), np.uint8)))
            except BaseException:
                for detector in self._detectors:
                    detector.close()
                raise
        self.model_path = Path(paths[0])

    def detect(self, frame: Frame) -> list[Face]:
        """Faces in ``frame``, highest score first."""
        import mediapipe as mp

        h, w = frame.image.shape[:2]
        rgb = cv2.cvtColor(_bgr(frame.image), cv2.COLOR_BGR2RGB)
        image = mp.Image(image_format=mp.ImageFormat.SRGB, data=rgb)
        detections = [det for detector in self._detectors for det in detector.detect(image).detections]
        faces = []
        for det in detections:
            box = det.bounding_box
            # Keypoints: right eye, left eye, nose tip, mouth centre, right ear, left ear (normalised).
            kp = np.array([[k.x * w, k.y * h] for k in det.keypoints[:4]], dtype=np.float32)
            if kp.shape != (4, 2):
                continue
            score = float(det.categories[0].score) if det.categories else 0.0
            faces.append(
                Face(
                    frame_id=frame.frame_id,
                    capture_s=frame.capture_s,
                    box=(float(box.origin_x), float(box.origin_y), float(box.width), float(box.height)),
                    score=score,
                    keypoints=kp,
                )
            )
        return _keep(merge_duplicates(faces) if len(self._detectors) > 1 else faces, self.cfg)

    def close(self) -> None:
        """Release the MediaPipe graphs."""
        with _native_stderr_silenced():
            for detector in self._detectors:
                detector.close()


class YuNetDetector:
    """OpenCV's YuNet detector (box + 5 keypoints), any input size."""

    def __init__(self, cfg: DetectorConfig) -> None:
        self.cfg = cfg
        path = cfg.model_path or find_model(DETECTOR_FILES[("yunet", cfg.range)])
        _require_file(path)
        self._detector = cv2.FaceDetectorYN.create(str(path), "", (320, 320), cfg.min_score, 0.3, 5000)
        self._size: tuple[int, int] = (320, 320)
        self.model_path = Path(path)

    def detect(self, frame: Frame) -> list[Face]:
        """Faces in ``frame``, highest score first."""
        h, w = frame.image.shape[:2]
        if (w, h) != self._size:
            self._detector.setInputSize((w, h))
            self._size = (w, h)
        _, rows = self._detector.detect(_bgr(frame.image))
        faces = []
        for row in [] if rows is None else rows:
            pts = row[4:14].reshape(5, 2)
            # Right eye, left eye, nose tip, mouth centre (mean of the two corners).
            kp = np.array([pts[0], pts[1], pts[2], (pts[3] + pts[4]) / 2], dtype=np.float32)
            faces.append(
                Face(
                    frame_id=frame.frame_id,
                    capture_s=frame.capture_s,
                    box=(float(row[0]), float(row[1]), float(row[2]), float(row[3])),
                    score=float(row[14]),
                    keypoints=kp,
                )
            )
        return _keep(faces, self.cfg)

    def close(self) -> None:
        """Nothing to release."""


def region_pixels(zone: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """A region's zone in whole pixels of a ``width`` x ``height`` image: x0, y0, x1, y1."""
    x0, y0, x1, y1 = zone
    return round(x0 * width), round(y0 * height), round(x1 * width), round(y1 * height)


def shift_face(face: Face, dx: float, dy: float) -> Face:
    """A face found in a crop whose corner is at (dx, dy), in the coordinates of the whole frame."""
    x, y, w, h = face.box
    return Face(
        frame_id=face.frame_id,
        capture_s=face.capture_s,
        box=(x + dx, y + dy, w, h),
        score=face.score,
        keypoints=(face.keypoints + np.array([dx, dy], dtype=np.float32)).astype(np.float32),
    )


def merge_duplicates(faces: list[Face], max_iou: float = 0.4) -> list[Face]:
    """One face per place: where boxes overlap by more than ``max_iou``, the higher score stays."""
    kept: list[Face] = []
    for face in sorted(faces, key=lambda f: f.score, reverse=True):
        if all(iou(face.box, other.box) <= max_iou for other in kept):
            kept.append(face)
    return kept


class RegionDetector:
    """A detector run on each configured region's crop instead of the whole frame.

    A rear-seat face of 90 px fills a good part of a rear-seat region, so the short-range
    model, which sees the whole frame at 128 x 128, finds it there; boxes and keypoints are
    mapped back to frame pixels, and a face found in two overlapping regions counts once.
    """

    def __init__(self, backend: FaceDetector, regions: tuple[DetectRegion, ...], cfg: DetectorConfig) -> None:
        self.backend = backend
        self.regions = regions
        self.cfg = cfg

    def detect(self, frame: Frame) -> list[Face]:
        """Faces in every region of ``frame``, in frame pixels, highest score first."""
        h, w = frame.image.shape[:2]
        faces: list[Face] = []
        for region in self.regions:
            x0, y0, x1, y1 = region_pixels(region.zone, w, h)
            part = np.ascontiguousarray(frame.image[y0:y1, x0:x1])
            found = self.backend.detect(Frame(frame.frame_id, frame.capture_s, frame.wall_time_s, part))
            faces.extend(shift_face(face, x0, y0) for face in found)
        return _keep(merge_duplicates(faces), self.cfg)

    def close(self) -> None:
        """Release the backend."""
        self.backend.close()


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Mute file descriptor 2 while MediaPipe's C++ runtime prints its start-up and shutdown notes.

    They are plain-text INFO lines that no setting turns off and that would break the daemon's
    JSON log stream. Used only around set-up and tear-down, where no other thread logs.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _bgr(image: ImageArray) -> ImageArray:
    if image.ndim == 2:
        return np.asarray(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR), dtype=np.uint8)
    return image


def _require_file(path: Path) -> None:
    if not Path(path).is_file():
        raise ModelNotFoundError(f"face detector model not found: {path}")


def create_detector(cfg: DetectorConfig) -> FaceDetector:
    """The detector backend named by ``cfg.type``, searching ``cfg.regions`` one by one where set."""
    backend: FaceDetector = YuNetDetector(cfg) if cfg.type == "yunet" else BlazeFaceDetector(cfg)
    if cfg.regions:
        return RegionDetector(backend, cfg.regions, cfg)
    return backend
