"""Recordings for tests: a real recording copied as if several vehicles had made it, and frames to record."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from cabin_monitor.config import RulesConfig
from cabin_monitor.messages import EmotionReading, Frame, FrameResult
from cabin_monitor.record.format import METADATA_KEY, RecordingMeta


def copy_as_vehicle(source: Path, target: Path, vehicle_id: str) -> None:
    """The recording file again, as if ``vehicle_id`` had made it (its own session id)."""
    table = pq.read_table(source)
    meta = RecordingMeta.from_json(table.schema.metadata[METADATA_KEY])
    session_id = vehicle_id.encode().hex()[:8].ljust(8, "0") + meta.session_id[8:]
    data = json.loads(meta.to_json()) | {"vehicle_id": vehicle_id, "session_id": session_id}
    target.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(data).encode()}), target)


def make_fleet(folder: Path, vehicle_ids: Sequence[str], target: Path) -> Path:
    """``target/<vehicle>/<file>`` for each vehicle, from the recording files in ``folder``; returns ``target``."""
    for source in sorted(folder.glob("*.parquet")):
        for vehicle_id in vehicle_ids:
            copy_as_vehicle(source, target / vehicle_id / source.name, vehicle_id)
    return target


CLASSES = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger")


def session_meta(vehicle_id: str = "car-17") -> RecordingMeta:
    """The session description a daemon would give."""
    return RecordingMeta(
        vehicle_id=vehicle_id,
        session_id="5f0e8a52-1d7c-4a8e-9a51-000000000017",
        segment=0,
        class_names=CLASSES,
        model_version="0.6.0",
        model_name="emotionaldan-7.onnx",
        rules=RulesConfig(),
        source_kind="camera",
        opened_wall_time_s=0.0,
    )


def one_occupant(n: int, seed: int = 1) -> Iterator[FrameResult]:
    """``n`` frames at 30 Hz of one occupant with random probabilities (which compress as real ones do)."""
    rng = random.Random(seed)
    image = np.zeros((2, 2, 3), np.uint8)
    for i in range(n):
        p = np.array([rng.random() for _ in CLASSES], np.float32)
        p /= p.sum()
        t = 1000.0 + i / 30
        reading = EmotionReading(
            i,
            t,
            1.7e9 + t,
            "occupant-1",
            "driver",
            (10.0, 10.0, 80.0, 90.0),
            0.9,
            {name: float(v) for name, v in zip(CLASSES, p, strict=True)},
            np.zeros((68, 2), np.float32),
        )
        yield FrameResult(Frame(i, t, 1.7e9 + t, image, media_s=None), (reading,), ())
