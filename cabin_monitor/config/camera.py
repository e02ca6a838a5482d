"""The ``camera`` section: where frames come from."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cabin_monitor.config.base import Strict


class CameraConfig(Strict):
    """Where frames come from."""

    source: str = Field(
        "sample",
        description="V4L2 index ('0'), device path ('/dev/video0'), video file, RTSP/HTTP URL, "
        "GStreamer pipeline ('gst:...'), or 'sample' for the bundled sample video.",
    )
    loop: bool = Field(False, description="Replay a video file from the start when it ends.")
    file_pacing: Literal["realtime", "fast"] = Field(
        "realtime",
        description="Video files: 'realtime' plays at the file's frame rate and drops like a camera; "
        "'fast' reads every frame as fast as the pipeline takes them, timed by the file's own clock.",
    )
    width_px: int | None = Field(None, ge=16, le=8192, description="Requested camera width (cameras only).")
    height_px: int | None = Field(None, ge=16, le=8192, description="Requested camera height (cameras only).")
    fps: float | None = Field(None, gt=0, le=240, description="Requested camera frame rate (cameras only).")
    read_timeout_s: float = Field(2.0, gt=0, le=60, description="No frame for this long counts as a stalled camera.")
    reopen_initial_s: float = Field(0.5, gt=0, le=60, description="First wait before reopening a failed camera.")
    reopen_max_s: float = Field(10.0, gt=0, le=600, description="Longest wait between reopen attempts.")
    max_corrupt_frames: int = Field(
        30,
        ge=1,
        description="Consecutive corrupt frames after which a camera is reopened; a video file ends there "
        "(failed reads in a row too: OpenCV fails the read of a frame it cannot decode and of the end alike).",
    )

    @model_validator(mode="after")
    def _backoff_order(self) -> CameraConfig:
        if self.reopen_max_s < self.reopen_initial_s:
            raise ValueError("reopen_max_s must be >= reopen_initial_s")
        return self


SourceKind = Literal["camera", "file", "stream", "gstreamer"]


def source_kind(source: str) -> SourceKind | None:
    """What a ``camera.source`` names, by its shape: a camera index or device, a URL, a GStreamer pipeline, or a
    video file ('sample' included); None when it is empty."""
    value = source.strip()
    if not value:
        return None
    if value.isdigit() or value.startswith("/dev/"):
        return "camera"
    if value.startswith("gst:"):
        return "gstreamer"
    if "://" in value:
        return "stream"
    return "file"
