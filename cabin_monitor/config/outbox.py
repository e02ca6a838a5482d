"""The ``outbox`` section: the durable event queue."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from cabin_monitor.config.base import Strict


class OutboxConfig(Strict):
    """Durable event queue between the rules engine and the broker."""

    path: Path | None = Field(None, description="SQLite file; default: <state_dir>/outbox.sqlite.")
    max_events: int = Field(10000, ge=10, description="Most events held; beyond it the oldest low-severity go.")
    max_age_s: float = Field(7 * 86400, gt=0, description="Events older than this are dropped (and counted).")
    memory_max_events: int = Field(
        1000,
        ge=1,
        description="Most events held in memory while the file cannot be written (disk full, read-only); "
        "beyond it the oldest low-severity go.",
    )
    fallback_path: Path | None = Field(
        None,
        description="Second file, on another filesystem, that keeps the events held in memory so that they "
        "survive a restart; default: $RUNTIME_DIRECTORY/held-events.sqlite under systemd, none elsewhere.",
    )
