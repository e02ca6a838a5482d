"""The ``tracker`` section: occupants across frames, and seat zones."""

from __future__ import annotations

from pydantic import Field, field_validator

from cabin_monitor.config.base import ImageZone, Strict


class SeatZone(Strict):
    """A seat and the part of the image where its occupant's face appears."""

    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
    zone: ImageZone = Field(..., description="x0, y0, x1, y1 as fractions of the image width/height (0..1).")


class TrackerConfig(Strict):
    """Occupant tracking across frames."""

    min_iou: float = Field(0.2, ge=0, le=1, description="Least box overlap to continue a track.")
    max_centre_jump: float = Field(
        0.6, gt=0, description="Largest centre move between frames, in face widths, when boxes do not overlap."
    )
    forget_after_s: float = Field(30.0, gt=0, description="A track unseen for this long is dropped.")
    confirm_frames: int = Field(
        3,
        ge=1,
        le=30,
        description="A new face becomes an occupant after this many consecutive detections "
        "(one-frame false detections never reach the rules).",
    )
    seats: tuple[SeatZone, ...] = Field((), description="Seat zones; a face is in the seat holding its box centre.")

    @field_validator("seats")
    @classmethod
    def _unique_seats(cls, v: tuple[SeatZone, ...]) -> tuple[SeatZone, ...]:
        names = [s.name for s in v]
        if len(set(names)) != len(names):
            raise ValueError(f"seat names must be unique, got {names}")
        return v
