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
        5.0,
        gt=0,
        description="A stage thread without progress for this long (a hung stage or camera call) stops feeding "
        "the systemd watchdog; a camera being reopened is progress.",
    )
