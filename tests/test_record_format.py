"""The recording format: entries to a Parquet table and back, and the metadata each file carries."""

from __future__ import annotations

import pytest

from cabin_monitor.config import RulesConfig
from cabin_monitor.record.format import (
    Closing,
    Entry,
    FrameSample,
    OccupantSample,
    RecordingMeta,
    RowBuffer,
    RulesChange,
    entries,
)
from tests.support.helpers import make_event

CLASSES = ("neutral", "anger", "fear")


def occupant(name: str, raw: tuple[float, ...]) -> OccupantSample:
    """An occupant sample whose values are exact in the file's half-precision columns."""
    return OccupantSample(name, "driver", 120.0, 130.0, 0.875, raw, (0.5, 0.25, 0.25))


def meta(**changes: object) -> RecordingMeta:
    """Plausible metadata."""
    fields: dict[str, object] = {
        "vehicle_id": "car-17",
        "session_id": "0b9c7a4e-0000-4000-8000-000000000001",
        "segment": 3,
        "class_names": CLASSES,
        "model_version": "0.6.0",
        "model_name": "emotionaldan-7.onnx",
        "rules": RulesConfig(),
        "source_kind": "camera",
        "opened_wall_time_s": 1.7e9,
    }
    return RecordingMeta(**(fields | changes))  # type: ignore[arg-type]


def test_entries_come_back_as_they_were_written() -> None:
    """Frames with several, one or no occupants, events, a rules change and the closing survive a table round trip."""
    start = make_event(occupant_id="a", seat="driver", emotions={"neutral": 0.5, "anger": 0.25, "fear": 0.25})
    written: list[Entry] = [
        FrameSample(7, 100.0, 1.7e9, 0.25, (occupant("a", (0.1, 0.6, 0.3)), occupant("b", (0.7, 0.2, 0.1)))),
        FrameSample(8, 100.04, 1.7e9 + 0.04, 0.29, (occupant("a", (0.2, 0.5, 0.3)),), (start,)),
        FrameSample(9, 100.08, 1.7e9 + 0.08, None, ()),
        RulesChange(100.08, 1.7e9 + 0.08, RulesConfig.model_validate({"stress": {"enter_score": 0.7}})),
        FrameSample(10, 100.12, 1.7e9 + 0.12, None, ()),
        Closing(100.2, 1.7e9 + 0.2, (make_event(occupant_id="a", emotions={"neutral": 0.5, "anger": 0.5}),)),
    ]
    buffer = RowBuffer(CLASSES)
    rows = sum(buffer.add(entry) for entry in written)
    assert rows == len(buffer) == 9
    read = list(entries(buffer.table(), CLASSES))
    assert len(read) == len(written)
    for got, want in zip(read, written, strict=True):
        if isinstance(want, FrameSample):
            assert isinstance(got, FrameSample)
            assert (got.frame_id, got.capture_s, got.wall_time_s, got.media_s) == (
                want.frame_id,
                want.capture_s,
                want.wall_time_s,
                want.media_s,
            )
            for g, w in zip(got.occupants, want.occupants, strict=True):
                assert g.raw == pytest.approx(w.raw, abs=1e-7)  # float32, as the model gives them
                assert (g.occupant_id, g.seat, g.face_w_px, g.face_score, g.smoothed) == (
                    w.occupant_id,
                    w.seat,
                    w.face_w_px,
                    w.face_score,
                    w.smoothed,
                )
            assert [e.event_id for e in got.events] == [e.event_id for e in want.events]
        else:
            assert got == want


def test_model_probabilities_are_kept_bit_for_bit() -> None:
    """A float32 probability (what the model gives) reads back as the very same float."""
    value = float.fromhex("0x1.3a5c7ep-2")  # exactly representable in float32
    buffer = RowBuffer(CLASSES)
    buffer.add(FrameSample(1, 5.0, 6.0, None, (occupant("a", (value, 1 - value, 0.0)),)))
    (frame,) = entries(buffer.table(), CLASSES)
    assert isinstance(frame, FrameSample)
    assert frame.occupants[0].raw[0] == value


def test_metadata_round_trips_and_refuses_other_documents() -> None:
    """The metadata JSON reads back equal; another format version or a foreign document is a ValueError."""
    m = meta(rules=RulesConfig.model_validate({"smoothing_s": 0.3}))
    assert RecordingMeta.from_json(m.to_json()) == m
    with pytest.raises(ValueError, match="format 9"):
        RecordingMeta.from_json(m.to_json().replace('"format_version": 1', '"format_version": 9'))
    with pytest.raises(ValueError, match="not recording metadata"):
        RecordingMeta.from_json('{"hello": 1}')
