"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import MosquittoBroker


@pytest.fixture
def mqtt_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A private Mosquitto on a free 127.0.0.1 port; fails with an install hint when mosquitto is missing."""
    with MosquittoBroker(tmp_path / "mosquitto") as broker:
        yield broker


@pytest.fixture
def dsn() -> Iterator[str]:
    """A fresh PostgreSQL database (DSN) with the fleet schema, dropped afterwards."""
    from tests.support.fleet import fleet_database

    with fleet_database() as url:
        yield url


@pytest.fixture(scope="session")
def live_recording(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, object]]]:
    """The bundled clip through the real pipeline (fast, as demo runs it) with recording on: the folder and the
    event payloads the daemon printed."""
    import io
    import json

    from cabin_monitor import daemon
    from cabin_monitor.assets import SAMPLE_VIDEO
    from cabin_monitor.config import CameraConfig, Config, RecordConfig

    folder = tmp_path_factory.mktemp("live") / "car-17"
    cfg = Config(
        vehicle_id="car-17",
        camera=CameraConfig(source=str(SAMPLE_VIDEO), file_pacing="fast"),
        record=RecordConfig(dir=folder),
    )
    printed = io.StringIO()
    assert daemon.build_pipeline(cfg, events_stream=printed).run() == 0
    return folder, [json.loads(line) for line in printed.getvalue().splitlines()]
