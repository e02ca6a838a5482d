"""Recording files for fleet tests: one real recording copied as if several vehicles had made it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq

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
