"""Still images through detection, alignment and the emotion model (the ``analyze`` command)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cabin_monitor.messages import Frame, TrackedFace
from cabin_monitor.vision.align import FaceAligner, grey, landmarks_to_frame, warp_crop
from cabin_monitor.vision.detect import FaceDetector
from cabin_monitor.vision.emotion import EmotionModel


def analyze_image(
    path: Path, model: EmotionModel, detector: FaceDetector | None, assume_face: bool = False
) -> dict[str, Any]:
    """``{"path", "faces": [{"box", "score", "emotions", "landmarks"}]}`` for one image file.

    With ``assume_face`` the whole image is one face (a pre-cropped face in
    the canonical framing) and no detector runs.
    """
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        return {"path": str(path), "error": "not a readable image", "faces": []}
    aligner = FaceAligner(model.input_size)
    gray = grey(image)
    h, w = gray.shape[:2]
    boxes: list[tuple[tuple[float, float, float, float], float]] = []
    matrices = []
    if assume_face:
        box = (0.0, 0.0, float(w), float(h))
        matrices.append(aligner.box_matrix(box))
        boxes.append((box, 1.0))
    else:
        if detector is None:
            raise ValueError("a detector is needed unless assume_face is set")
        frame = Frame(frame_id=0, capture_s=0.0, wall_time_s=0.0, image=image)
        for face in detector.detect(frame):
            tracked = TrackedFace(face=face, occupant_id="", seat=None)
            matrices.append(aligner.align(gray, tracked).frame_to_crop)
            boxes.append((face.box, face.score))
    faces = []
    if matrices:
        crops = np.stack([warp_crop(gray, m, model.input_size) for m in matrices])
        probs, points = model.infer(crops)
        for (box, score), m, p, lm in zip(boxes, matrices, probs, points, strict=True):
            faces.append(
                {
                    "box": [round(v, 1) for v in box],
                    "score": round(float(score), 4),
                    "emotions": {n: round(float(v), 4) for n, v in zip(model.class_names, p, strict=True)},
                    "landmarks": [[round(float(x), 1), round(float(y), 1)] for x, y in landmarks_to_frame(lm, m)],
                }
            )
    return {"path": str(path), "faces": faces}
