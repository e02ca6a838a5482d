"""The ``remote_config`` section: operators' rule changes over ``config/set``."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from cabin_monitor.config.base import Strict


class RemoteConfigConfig(Strict):
    """The config/set topic through which operators change the rules."""

    enabled: bool = True
    max_payload_bytes: int = Field(16384, ge=64, le=1 << 20)
    override_path: Path | None = Field(
        None, description="Persisted overrides; default: <state_dir>/rules_override.json."
    )
