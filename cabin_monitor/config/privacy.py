"""The ``privacy`` section: pixels stay in the process unless enabled here."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from cabin_monitor.config.base import Strict


class PrivacyConfig(Strict):
    """Pixels never leave the process unless enabled here."""

    save_crops: bool = Field(False, description="Write aligned face crops to crops_dir (off by default).")
    crops_dir: Path | None = Field(None, description="Folder for saved crops; required when save_crops is on.")

    @model_validator(mode="after")
    def _dir_when_saving(self) -> PrivacyConfig:
        if self.save_crops and self.crops_dir is None:
            raise ValueError("save_crops needs crops_dir")
        return self
