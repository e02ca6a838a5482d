"""Where the bundled model files and sample media are found."""

from __future__ import annotations

import os
import site
import sys
from pathlib import Path

from cabin_monitor.errors import ModelNotFoundError

PACKAGE_DIR = Path(__file__).resolve().parent
SAMPLES_DIR = PACKAGE_DIR / "samples"
DEFAULT_EMOTION_MODEL = "emotionaldan-7.onnx"
SAMPLE_VIDEO = SAMPLES_DIR / "WolfgangLanger_Pexels.mp4"
DETECTOR_FILES = {
    ("blazeface", "short"): "detectors/face_detection_short_range.tflite",
    ("blazeface", "full"): "detectors/face_detection_full_range_sparse.tflite",
    ("yunet", "short"): "detectors/face_detection_yunet_2023mar.onnx",
    ("yunet", "full"): "detectors/face_detection_yunet_2023mar.onnx",
    ("yunet", "both"): "detectors/face_detection_yunet_2023mar.onnx",
}


def model_dirs() -> list[Path]:
    """Folders searched for bundled models, in order."""
    dirs = []
    env = os.environ.get("CABIN_MONITOR_MODELS_DIR")
    if env:
        dirs.append(Path(env))
    dirs.append(PACKAGE_DIR.parent / "models")  # source checkout / editable install
    dirs.append(Path(sys.prefix) / "share" / "cabin-monitor" / "models")  # wheel install (venv, system)
    dirs.append(Path(site.getuserbase()) / "share" / "cabin-monitor" / "models")  # pip install --user
    return dirs


def find_model(relative: str) -> Path:
    """Locate a bundled model file, or raise ``ModelNotFoundError`` listing where it was looked for."""
    for d in model_dirs():
        candidate = d / relative
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(d / relative) for d in model_dirs())
    raise ModelNotFoundError(f"bundled model {relative!r} not found (looked in: {tried})")


def sample_path(name: str) -> Path:
    """A bundled sample image or video."""
    path = SAMPLES_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"sample {name!r} is not bundled ({path})")
    return path
