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
