"""The ``record`` section: what the rules engine sees, written to rotated Parquet files (no pixels)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from cabin_monitor.config.base import Strict


class RecordConfig(Strict):
    """Recording of readings and events for offline replay; off unless ``dir`` is set."""

    dir: Path | None = Field(
        None, description="Folder for the recording files (*.parquet); null = no recording. No image data is written."
    )
    max_file_mb: float = Field(
        16.0, gt=0, le=4096, description="A file is closed and a new one started once it reaches this size (MB)."
    )
    max_file_age_s: float = Field(
        300.0, gt=0, le=86400, description="...or once it has been open this long (a crash loses at most this much)."
    )
    max_total_mb: float = Field(
        1024.0,
        gt=0,
        description="The folder never holds more than this (MB): the oldest files are deleted, and logged.",
    )
    queue_max_frames: int = Field(
        3000,
        ge=10,
        le=1_000_000,
        description="Frames waiting for the writer thread; beyond it frames are dropped (counted), never waited for.",
    )
    row_group_rows: int = Field(
        4096, ge=16, le=1_000_000, description="Rows buffered in memory before they are written out together."
    )

    @model_validator(mode="after")
    def _file_fits_cap(self) -> RecordConfig:
        # The cap keeps room for the file being written, so it must hold at least one closed file too.
        if 2 * self.max_file_mb > self.max_total_mb:
            raise ValueError(
                f"max_total_mb ({self.max_total_mb}) must be at least twice max_file_mb ({self.max_file_mb})"
            )
        return self
