"""The ``pipeline`` section: pacing and liveness."""

from __future__ import annotations

from pydantic import Field

from cabin_monitor.config.base import Strict


class PipelineConfig(Strict):
    """Pacing and liveness."""

    max_frame_age_ms: float = Field(
        500.0, gt=0, description="Frames older than this when inference is free are skipped (and counted)."
    )
    watchdog_stall_s: float = Field(
        5.0, gt=0, description="No frame through the pipeline for this long stops feeding the systemd watchdog."
    )
