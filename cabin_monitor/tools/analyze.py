"""Still images through detection, alignment and the emotion model (the ``analyze`` command)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2

from cabin_monitor.config import DetectorConfig, EmotionConfig
from cabin_monitor.vision.detect import FaceDetector, create_detector
from cabin_monitor.vision.emotion import EmotionModel
from cabin_monitor.vision.reader import FaceReader, crop_image


def analyze_image(path: Path, reader: FaceReader, detector: FaceDetector | None) -> dict[str, Any]:
    """``{"path", "faces": [{"box", "score", "emotions", "landmarks"}]}`` for one image file.

    With no detector the whole image is one face (a pre-cropped face in the canonical framing).
    """
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        return {"path": str(path), "error": "not a readable image", "faces": []}
    crops = crop_image(image, reader.aligner, detector)
    faces = [
        {
            "box": [round(v, 1) for v in crop.box],
            "score": round(float(crop.score), 4),
            "emotions": {n: round(v, 4) for n, v in reading.emotions.items()},
            "landmarks": [[round(float(x), 1), round(float(y), 1)] for x, y in reading.landmarks],
        }
        for crop, reading in zip(crops, reader.read(crops), strict=True)
    ]
    return {"path": str(path), "faces": faces}


def analyze_command(
    images: Sequence[str], model_path: Path | None, detector_cfg: DetectorConfig | None, as_json: bool
) -> int:
    """The ``analyze`` command: a line (or a JSON object) per image; exit code 1 if one could not be read.

    ``detector_cfg`` None: each image is one pre-cropped face.
    """
    reader = FaceReader(EmotionModel(EmotionConfig(model_path=model_path)))
    detector = None if detector_cfg is None else create_detector(detector_cfg)
    status = 0
    try:
        for path in images:
            result = analyze_image(Path(path), reader, detector)
            if "error" in result:
                status = 1
            if as_json:
                print(json.dumps(result), flush=True)
            else:
                print(
                    f"{path}: {len(result['faces'])} face(s)" + (f" ({result['error']})" if "error" in result else "")
                )
                for face in result["faces"]:
                    top = max(face["emotions"], key=face["emotions"].get)
                    print(f"  box {face['box']} score {face['score']:.2f}: {top} {face['emotions'][top]:.2f}")
    finally:
        if detector is not None:
            detector.close()
    return status
