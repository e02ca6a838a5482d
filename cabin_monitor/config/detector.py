"""The ``detector`` section: the face detector backend."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from cabin_monitor.config.base import ImageZone, Strict


class DetectRegion(Strict):
    """A part of the image the detector searches on its own, at a resolution that suits its faces."""

    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
    zone: ImageZone = Field(
        ...,
        description="x0, y0, x1, y1 as fractions of the image width/height (0..1); let neighbouring regions"
        " overlap by a face width so a face on a border is whole in one of them.",
    )


class DetectorConfig(Strict):
    """Face detector backend."""

    type: Literal["blazeface", "yunet"] = Field("blazeface", description="Detector backend.")
    range: Literal["short", "full", "both"] = Field(
        "both",
        description="BlazeFace model: 'short' (front seats, ~2 m), 'full' (rear seats, ~5 m), or 'both' (each"
        " finds faces the other misses: near faces turned aside, far faces; found twice counts once).",
    )
    model_path: Path | None = Field(None, description="Detector model file; default: the bundled one for the type.")
    min_score: float = Field(0.6, gt=0, lt=1, description="Minimum detection confidence.")
    max_faces: int = Field(5, ge=1, le=32, description="Most faces kept per frame (highest scores first).")
    min_face_px: int = Field(32, ge=8, description="Faces whose box is narrower than this are ignored.")
    regions: tuple[DetectRegion, ...] = Field(
        (),
        description="Search these parts of the image one by one instead of the whole frame (e.g. one per rear"
        " seat: a 90 px face in a region crop is a near face to the short-range model); faces found twice"
        " where regions overlap count once.",
    )
    every_frames: int = Field(
        3,
        ge=1,
        le=30,
        description="Run the detector on every n-th frame; in between, each occupant's face is followed by the"
        " 68 landmarks the model found in it the frame before. The detector also runs whenever a new face"
        " awaits confirmation or a followed face is lost; 1 detects on every frame.",
    )

    @model_validator(mode="after")
    def _one_model_per_path(self) -> DetectorConfig:
        if self.type == "blazeface" and self.range == "both" and self.model_path is not None:
            raise ValueError("model_path names one BlazeFace model: set range to 'short' or 'full' with it")
        return self

    @field_validator("regions")
    @classmethod
    def _unique_regions(cls, v: tuple[DetectRegion, ...]) -> tuple[DetectRegion, ...]:
        names = [r.name for r in v]
        if len(set(names)) != len(names):
            raise ValueError(f"region names must be unique, got {names}")
        return v
