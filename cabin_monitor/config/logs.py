"""The ``logging`` section: structured logs and the periodic stats line."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cabin_monitor.config.base import Strict


class LoggingConfig(Strict):
    """Structured logs."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = Field("auto", description="auto: console on a TTY, JSON otherwise.")
    stats_interval_s: float = Field(10.0, gt=0, le=3600, description="Period of the fps/latency/drops log line.")
