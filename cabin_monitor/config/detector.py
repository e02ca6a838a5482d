"""The ``detector`` section: the face detector backend."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from cabin_monitor.config.base import Strict


class DetectorConfig(Strict):
    """Face detector backend."""

    type: Literal["blazeface", "yunet"] = Field("blazeface", description="Detector backend.")
    range: Literal["short", "full"] = Field(
        "short", description="BlazeFace model: 'short' (front seats, ~2 m) or 'full' (rear seats, ~5 m)."
    )
    model_path: Path | None = Field(None, description="Detector model file; default: the bundled one for the type.")
    min_score: float = Field(0.6, gt=0, lt=1, description="Minimum detection confidence.")
    max_faces: int = Field(5, ge=1, le=32, description="Most faces kept per frame (highest scores first).")
    min_face_px: int = Field(32, ge=8, description="Faces whose box is narrower than this are ignored.")
