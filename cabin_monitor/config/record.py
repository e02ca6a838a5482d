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

    upload_url: str | None = Field(
        None,
        description=(
            "Where finished recording files are uploaded, under <vehicle_id>/, as an fsspec URL "
            "(s3://bucket/recordings, gs://..., file:///mnt/share; the store's fsspec package, e.g. s3fs, "
            "installed); each is deleted from dir once its upload is verified. null = files stay in dir."
        ),
    )
    upload_max_bytes_per_s: float = Field(
        1_000_000.0, gt=0, description="Bandwidth the uploader may use, uploading and verifying together (bytes/s)."
    )
    upload_chunk_bytes: int = Field(
        262_144, ge=4096, le=64 * 1024 * 1024, description="Bytes sent per write; a stop is noticed between writes."
    )
    upload_retry_min_s: float = Field(
        2.0, gt=0, le=3600, description="First wait after a failed upload; it doubles per failure (with jitter)..."
    )
    upload_retry_max_s: float = Field(300.0, gt=0, le=86400, description="...up to this.")
    upload_poll_s: float = Field(
        10.0, gt=0, le=3600, description="How often the folder is looked at for finished files to upload."
    )

    @model_validator(mode="after")
    def _upload_needs_dir(self) -> RecordConfig:
        if self.upload_url is not None and self.dir is None:
            raise ValueError("upload_url uploads the files of dir: set dir too")
        if self.upload_url is not None and "://" not in self.upload_url:
            raise ValueError(f"upload_url {self.upload_url!r}: expected a URL such as s3://bucket/recordings")
        if self.upload_retry_min_s > self.upload_retry_max_s:
            raise ValueError("upload_retry_min_s must not exceed upload_retry_max_s")
        return self

    @model_validator(mode="after")
    def _file_fits_cap(self) -> RecordConfig:
        # The cap keeps room for the file being written, so it must hold at least one closed file too.
        if 2 * self.max_file_mb > self.max_total_mb:
            raise ValueError(
                f"max_total_mb ({self.max_total_mb}) must be at least twice max_file_mb ({self.max_file_mb})"
            )
        return self
