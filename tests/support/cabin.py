"""A five-occupant cabin clip built from the bundled real face videos, for multi-occupant tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from cabin_monitor.assets import sample_path
from cabin_monitor.messages import ImageArray

WIDTH_PX, HEIGHT_PX = 1280, 720
# Where each occupant's picture goes (x, y, width, height): three small rear faces, two large front ones.
REAR_SLOTS = [(60, 110, 320, 180), (480, 110, 320, 180), (900, 110, 320, 180)]
FRONT_SLOTS = [(0, 360, 640, 360), (640, 360, 640, 360)]


def _frames(name: str, n: int) -> list[ImageArray]:
    cap = cv2.VideoCapture(str(sample_path(name)))
    out: list[ImageArray] = []
    while len(out) < n:
        ok, image = cap.read()
        if not ok:
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            continue
        out.append(image)
    cap.release()
    return out


def cabin_frames(n: int) -> list[ImageArray]:
    """``n`` 1280x720 frames with five real, moving faces: rear faces about 90 px wide, front ones about 200."""
    talking = _frames("WolfgangLanger_Pexels.mp4", n + 300)
    smiling = _frames("single_face.mp4", 2 * n)
    frames = []
    for i in range(n):
        canvas = np.full((HEIGHT_PX, WIDTH_PX, 3), 40, np.uint8)
        rear = [cv2.flip(talking[i + 150], 1), talking[i + 300], smiling[i]]
        front = [talking[i], cv2.flip(smiling[2 * i], 1)]
        for (x, y, w, h), image in zip(REAR_SLOTS + FRONT_SLOTS, rear + front, strict=True):
            canvas[y : y + h, x : x + w] = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        frames.append(canvas)
    return frames


def write_cabin_clip(path: Path, n: int, fps: float = 30.0) -> Path:
    """The cabin frames as a video file."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (WIDTH_PX, HEIGHT_PX))
    for frame in cabin_frames(n):
        writer.write(frame)
    writer.release()
    return path
