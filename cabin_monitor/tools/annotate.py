"""Drawing of boxes, landmarks and emotion bars onto frames, and the demo's video writer."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from cabin_monitor.messages import EmotionReading, FrameResult, ImageArray

BAR_W = 110
BAR_H = 11
GREEN = (80, 200, 80)
RED = (60, 60, 230)
WHITE = (255, 255, 255)


def draw_reading(image: ImageArray, reading: EmotionReading, alert: bool = False) -> None:
    """Box, 68 landmarks and one bar per emotion class for one occupant (in place)."""
    x, y, w, h = (round(v) for v in reading.box)
    colour = RED if alert else GREEN
    cv2.rectangle(image, (x, y), (x + w, y + h), colour, 2)
    for px, py in reading.landmarks:
        cv2.circle(image, (round(float(px)), round(float(py))), 1, (0, 255, 255), -1, cv2.LINE_AA)
    label = f"{reading.occupant_id}" + (f" ({reading.seat})" if reading.seat else "")
    cv2.putText(image, label, (x, max(12, y - 6)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1, cv2.LINE_AA)
    bx = x + w + 6 if x + w + 6 + BAR_W + 70 < image.shape[1] else max(0, x - BAR_W - 76)
    for i, (name, p) in enumerate(reading.emotions.items()):
        by = y + i * (BAR_H + 3)
        cv2.rectangle(image, (bx + 68, by), (bx + 68 + BAR_W, by + BAR_H), (40, 40, 40), -1)
        cv2.rectangle(image, (bx + 68, by), (bx + 68 + round(BAR_W * p), by + BAR_H), colour, -1)
        cv2.putText(image, name[:9], (bx, by + BAR_H - 1), cv2.FONT_HERSHEY_SIMPLEX, 0.38, WHITE, 1, cv2.LINE_AA)


def annotate(result: FrameResult, active: set[tuple[str, str]]) -> ImageArray:
    """A copy of the frame with every reading drawn; ``active`` holds open (occupant, event type) pairs."""
    image = result.frame.image.copy()
    alerts: list[str] = []
    for reading in result.readings:
        types = sorted(t for occ, t in active if occ == reading.occupant_id)
        draw_reading(image, reading, alert=bool(types))
        alerts += [f"{reading.occupant_id}: {t}" for t in types]
    for i, text in enumerate(alerts):
        cv2.putText(image, text, (8, 20 + 18 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.55, RED, 2, cv2.LINE_AA)
    return image


# H.264 plays everywhere; OpenCV's pip builds carry no H.264 encoder, so MPEG-4 Part 2 is the fallback.
# Tried in order, by the file's suffix. Browsers play H.264 in MP4 and VP9/VP8 in WebM; the pip OpenCV carries
# no H.264 encoder, so an .mp4 falls back to MPEG-4 Part 2, which browsers do not play: the demo writes WebM.
CODECS = {
    ".webm": (("VP90", "VP9"), ("VP80", "VP8")),
    ".mp4": (("avc1", "H.264"), ("mp4v", "MPEG-4 Part 2")),
}
BROWSER_CODECS = ("H.264", "VP9", "VP8")
DEFAULT_VIDEO_FPS = 25.0


def video_fps(source: str) -> float:
    """The frame rate a video file declares, or ``DEFAULT_VIDEO_FPS`` when it declares none (or is no file)."""
    if not Path(source).is_file():
        return DEFAULT_VIDEO_FPS
    cap = cv2.VideoCapture(source)
    try:
        fps = float(cap.get(cv2.CAP_PROP_FPS))
    finally:
        cap.release()
    return fps if 1.0 <= fps <= 240.0 else DEFAULT_VIDEO_FPS


def _open_writer(path: Path, fps: float, size: tuple[int, int]) -> tuple[cv2.VideoWriter, str]:
    codecs = CODECS.get(path.suffix.lower())
    if codecs is None:
        raise OSError(f"cannot write video {path}: give a .webm (VP9) or .mp4 (H.264 where OpenCV has it) file")
    level = cv2.utils.logging.getLogLevel()
    # A missing encoder is expected (see CODECS): keep OpenCV from printing errors for it.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        for fourcc, name in codecs:
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
            if writer.isOpened():
                return writer, name
            writer.release()
    finally:
        cv2.utils.logging.setLogLevel(level)
    names = " or ".join(name for _, name in codecs)
    raise OSError(f"cannot write video {path}: no {names} encoder in this OpenCV build")


class AnnotatedVideoWriter:
    """Writes annotated frames to a WebM (VP9) or MP4 file, tracking which events are open."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path = path
        self.fps = fps
        self.codec = ""
        self._writer: cv2.VideoWriter | None = None
        self._active: set[tuple[str, str]] = set()
        self.frames = 0

    def __call__(self, result: FrameResult) -> None:
        """Add one processed frame."""
        for event in result.events:
            key = (event.occupant_id, event.type)
            if event.phase.value == "start":
                self._active.add(key)
            else:
                self._active.discard(key)
        image = annotate(result, self._active)
        if self._writer is None:
            h, w = image.shape[:2]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer, self.codec = _open_writer(self.path, self.fps, (w, h))
        self._writer.write(np.ascontiguousarray(image))
        self.frames += 1

    def close(self) -> None:
        """Finish the file."""
        if self._writer is not None:
            self._writer.release()
            self._writer = None
