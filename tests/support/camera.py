"""A scripted camera: a real video file behind the OpenCV capture interface, failing on cue."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


class ScriptedCamera:
    """A real OpenCV capture of a video file that plays the part of a camera and fails on cue.

    It never ends (it rewinds), can stop delivering after ``fail_after`` reads, can hand out a
    corrupt frame every ``corrupt_every`` reads, and with ``frame_period_s`` it delivers at a
    camera's pace. Pass ``lambda spec, cfg: ScriptedCamera(...)`` as a ``FrameSource`` opener.
    """

    def __init__(
        self,
        video: Path,
        fail_after: int | None = None,
        corrupt_every: int | None = None,
        frame_period_s: float = 0.0,
    ) -> None:
        import cv2

        self._cv2 = cv2
        self.cap = cv2.VideoCapture(str(video))
        self.reads = 0
        self.fail_after = fail_after
        self.corrupt_every = corrupt_every
        self.frame_period_s = frame_period_s

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        """Whether the file opened."""
        return bool(self.cap.isOpened())

    def read(self) -> tuple[bool, Any]:
        """The next frame, a failure, or a corrupt frame, as scripted."""
        self.reads += 1
        if self.fail_after is not None and self.reads > self.fail_after:
            return False, None
        ok, image = self.cap.read()
        if not ok:
            self.cap.set(self._cv2.CAP_PROP_POS_FRAMES, 0)
            ok, image = self.cap.read()
        if self.frame_period_s:
            time.sleep(self.frame_period_s)
        if self.corrupt_every and self.reads % self.corrupt_every == 0:
            return True, b"not an image"
        return ok, image

    def get(self, prop: int) -> float:
        """A capture property (the file's)."""
        return float(self.cap.get(prop))

    def set(self, prop: int, value: float) -> bool:
        """Cameras accept settings; the file ignores them."""
        return True

    def release(self) -> None:
        """Close the file."""
        self.cap.release()
