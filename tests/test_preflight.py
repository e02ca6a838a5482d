"""Tests of what run prepares and refuses before the camera (check-config's and run's agreement is tested
through the command line in tests/test_cli.py and tests/test_config.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cabin_monitor.config import Config
from cabin_monitor.errors import ConfigurationError
from cabin_monitor.preflight import prepare_state_folder


def with_broker(state_dir: Path) -> Config:
    """A configuration with a broker and ``state_dir``."""
    return Config.model_validate({"state_dir": str(state_dir), "mqtt": {"url": "mqtt://127.0.0.1:1"}})


def test_the_state_folder_is_made_for_the_daemon_alone(tmp_path: Path) -> None:
    """Outside systemd, a missing state folder is created 0700 whatever the umask; an existing one is left."""
    old = os.umask(0o022)
    try:
        prepare_state_folder(with_broker(tmp_path / "a" / "state"))
        assert (tmp_path / "a" / "state").stat().st_mode & 0o777 == 0o700
        existing = tmp_path / "existing"
        existing.mkdir(mode=0o750)
        existing.chmod(0o750)
        prepare_state_folder(with_broker(existing))
        assert existing.stat().st_mode & 0o777 == 0o750
    finally:
        os.umask(old)


def test_no_state_folder_without_a_broker(tmp_path: Path) -> None:
    """Without a broker nothing is written, so no folder is made."""
    prepare_state_folder(Config.model_validate({"state_dir": str(tmp_path / "state")}))
    assert not (tmp_path / "state").exists()


def test_a_state_folder_that_cannot_be_made_is_a_setup_error(tmp_path: Path) -> None:
    """A state folder under a file is refused in one line naming it (exit code 2)."""
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigurationError, match=r"state folder .*/file/state: cannot create it"):
        prepare_state_folder(with_broker(tmp_path / "file" / "state"))
