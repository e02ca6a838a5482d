"""The recording format: what the rules engine saw, as typed entries and as the Parquet table that holds them.

A recording is the stream of inputs the rules engine was given, in order, plus every event it
emitted; replaying the inputs through the same rules gives the same events. Nothing here does I/O:
``runtime.recorder`` writes the tables, ``record.files`` reads them back.

One table row per entry line, told apart by ``kind``:

- ``reading``: one occupant in one frame: the frame's times (``capture_s``, the monotonic clock the
  rules decide on, which for a video file runs on the file's own clock; ``wall_time_s``, UTC epoch
  seconds; ``media_s``, seconds into a video file, null for cameras), the occupant, its seat, the face
  box size and detector score, the raw class probabilities (``p_<class>``) and the engine's smoothed
  ones (``s_<class>``, half precision: the replay computes them again);
- ``frame``: a frame in which no occupant was read (the engine still ran: this is how it sees
  occupants go);
- ``event``: an event the engine emitted (its smoothed emotions in ``s_<class>``, to three digits; its
  score exactly);
- ``rules``: the rules changed (``config/set``, SIGHUP) before the next frame (``rules_json``);
- ``close``: the daemon stopped and ended every open event.

No pixel, crop or landmark is ever recorded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from cabin_monitor.config import RulesConfig
from cabin_monitor.messages import Event, FrameResult, Phase, Severity
from cabin_monitor.rules import OccupantState

FORMAT_VERSION = 1
METADATA_KEY = b"cabin_monitor.recording"
CLOSE_METADATA_KEY = "cabin_monitor.recording_end"
KINDS = ("reading", "frame", "event", "rules", "close")


@dataclass(frozen=True, slots=True)
class OccupantSample:
    """One occupant as the engine saw it in one frame."""

    occupant_id: str
    seat: str | None
    face_w_px: float
    face_h_px: float
    face_score: float
    raw: tuple[float, ...]  # class probabilities from the model, in model order
    smoothed: tuple[float, ...]  # the engine's smoothed probabilities after this frame, model order


@dataclass(frozen=True, slots=True)
class FrameSample:
    """One frame's input to the engine (maybe no occupant) and the events it caused."""

    frame_id: int
    capture_s: float
    wall_time_s: float
    media_s: float | None
    occupants: tuple[OccupantSample, ...]
    events: tuple[Event, ...] = ()


@dataclass(frozen=True, slots=True)
class RulesChange:
    """New rules, in force from the next frame on."""

    capture_s: float
    wall_time_s: float
    rules: RulesConfig


@dataclass(frozen=True, slots=True)
class Closing:
    """The daemon stopped: every open event was ended at this time."""

    capture_s: float
    wall_time_s: float
    events: tuple[Event, ...] = ()


Entry = FrameSample | RulesChange | Closing


def entry_rows(entry: Entry) -> int:
    """The rows ``entry`` takes in a recording table (as many as ``RowBuffer.add`` writes for it)."""
    if isinstance(entry, FrameSample):
        return max(1, len(entry.occupants)) + len(entry.events)
    if isinstance(entry, RulesChange):
        return 1
    return 1 + len(entry.events)


@dataclass(frozen=True, slots=True)
class RecordingMeta:
    """What a recording file says about itself (Parquet key-value metadata under ``METADATA_KEY``)."""

    vehicle_id: str
    session_id: str  # one daemon run; its files are its segments
    segment: int  # 0, 1, 2 ... within the session
    class_names: tuple[str, ...]
    model_version: str
    model_name: str
    rules: RulesConfig  # in force when the file was opened
    source_kind: str  # camera | file | rtsp | gst: never the source's address, which may hold credentials
    opened_wall_time_s: float
    software_version: str = "unknown"
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        """The metadata as one JSON document."""
        return json.dumps(
            {
                "format_version": self.format_version,
                "vehicle_id": self.vehicle_id,
                "session_id": self.session_id,
                "segment": self.segment,
                "class_names": list(self.class_names),
                "model_version": self.model_version,
                "model_name": self.model_name,
                "rules": self.rules.model_dump(mode="json"),
                "source_kind": self.source_kind,
                "opened_wall_time_s": self.opened_wall_time_s,
                "software_version": self.software_version,
            }
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> RecordingMeta:
        """Parse ``to_json``'s document; ``ValueError`` if it is not one."""
        try:
            raw = json.loads(text)
            version = int(raw["format_version"])
            if version != FORMAT_VERSION:
                raise ValueError(f"recording format {version}; this version reads format {FORMAT_VERSION}")
            return cls(
                vehicle_id=str(raw["vehicle_id"]),
                session_id=str(raw["session_id"]),
                segment=int(raw["segment"]),
                class_names=tuple(str(c) for c in raw["class_names"]),
                model_version=str(raw["model_version"]),
                model_name=str(raw["model_name"]),
                rules=RulesConfig.model_validate(raw["rules"]),
                source_kind=str(raw["source_kind"]),
                opened_wall_time_s=float(raw["opened_wall_time_s"]),
                software_version=str(raw.get("software_version", "unknown")),
                format_version=version,
            )
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not recording metadata: {exc!r}") from None


def frame_sample(result: FrameResult, states: Sequence[OccupantState], class_names: Sequence[str]) -> FrameSample:
    """The compact, pixel-free record of one processed frame (``states``: the engine's after that frame)."""
    smoothed = {state.occupant_id: state.emotions for state in states}
    occupants = tuple(
        OccupantSample(
            occupant_id=reading.occupant_id,
            seat=reading.seat,
            face_w_px=float(reading.box[2]),
            face_h_px=float(reading.box[3]),
            face_score=float(reading.face_score),
            raw=tuple(reading.emotions.get(name, 0.0) for name in class_names),
            smoothed=tuple(smoothed.get(reading.occupant_id, {}).get(name, 0.0) for name in class_names),
        )
        for reading in result.readings
    )
    frame = result.frame
    return FrameSample(frame.frame_id, frame.capture_s, frame.wall_time_s, frame.media_s, occupants, result.events)


def schema(class_names: Sequence[str], meta: RecordingMeta | None = None) -> pa.Schema:
    """The table schema for a model with ``class_names``, carrying ``meta`` when given."""
    text = pa.string()
    fields = [
        pa.field("kind", pa.dictionary(pa.int8(), text), nullable=False),
        pa.field("frame_id", pa.int64()),
        pa.field("capture_s", pa.float64(), nullable=False),
        pa.field("wall_time_s", pa.float64(), nullable=False),
        pa.field("media_s", pa.float64()),
        pa.field("occupant_id", pa.dictionary(pa.int32(), text)),
        pa.field("seat", pa.dictionary(pa.int32(), text)),
        pa.field("face_w_px", pa.float16()),
        pa.field("face_h_px", pa.float16()),
        pa.field("face_score", pa.float16()),
        # The model's float32 output exactly, so that a replay gives the live events exactly...
        *(pa.field(f"p_{name}", pa.float32()) for name in class_names),
        # ...and the smoothed values, which a replay computes again, to three digits: for reading and plots.
        *(pa.field(f"s_{name}", pa.float16()) for name in class_names),
        pa.field("event_id", text),
        pa.field("event_type", pa.dictionary(pa.int8(), text)),
        pa.field("event_phase", pa.dictionary(pa.int8(), text)),
        pa.field("event_rule", pa.dictionary(pa.int8(), text)),
        pa.field("event_severity", pa.dictionary(pa.int8(), text)),
        pa.field("event_score", pa.float64()),
        pa.field("event_started_wall_time_s", pa.float64()),
        pa.field("event_start_event_id", text),
        pa.field("rules_json", text),
    ]
    metadata = None if meta is None else {METADATA_KEY: meta.to_json().encode()}
    return pa.schema(fields, metadata=metadata)


@dataclass
class RowBuffer:
    """Entries gathered column by column until they are written out as one table (one row group)."""

    class_names: tuple[str, ...]
    columns: dict[str, list[Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.columns = {f.name: [] for f in schema(self.class_names)}

    def __len__(self) -> int:
        return len(self.columns["kind"])

    def clear(self) -> None:
        """Forget every buffered row."""
        for values in self.columns.values():
            values.clear()

    def add(self, entry: Entry) -> int:
        """Append the rows of one entry; returns how many."""
        before = len(self)
        if isinstance(entry, FrameSample):
            for occupant in entry.occupants:
                self._row("reading", entry.frame_id, entry.capture_s, entry.wall_time_s, entry.media_s, occupant)
            if not entry.occupants:
                self._row("frame", entry.frame_id, entry.capture_s, entry.wall_time_s, entry.media_s)
            for event in entry.events:
                self._event(event, entry.media_s)
        elif isinstance(entry, RulesChange):
            self._row("rules", None, entry.capture_s, entry.wall_time_s, None)
            self.columns["rules_json"][-1] = entry.rules.model_dump_json()
        else:
            self._row("close", None, entry.capture_s, entry.wall_time_s, None)
            for event in entry.events:
                self._event(event, None)
        return len(self) - before

    def table(self, meta: RecordingMeta | None = None) -> pa.Table:
        """The buffered rows as a table of ``schema``."""
        return pa.Table.from_pydict(self.columns, schema=schema(self.class_names, meta))

    def _row(
        self,
        kind: str,
        frame_id: int | None,
        capture_s: float,
        wall_time_s: float,
        media_s: float | None,
        occupant: OccupantSample | None = None,
    ) -> None:
        c = self.columns
        for values in c.values():
            values.append(None)
        c["kind"][-1] = kind
        c["frame_id"][-1] = frame_id
        c["capture_s"][-1] = capture_s
        c["wall_time_s"][-1] = wall_time_s
        c["media_s"][-1] = media_s
        if occupant is not None:
            c["occupant_id"][-1] = occupant.occupant_id
            c["seat"][-1] = occupant.seat
            c["face_w_px"][-1] = occupant.face_w_px
            c["face_h_px"][-1] = occupant.face_h_px
            c["face_score"][-1] = occupant.face_score
            for name, raw, smoothed in zip(self.class_names, occupant.raw, occupant.smoothed, strict=True):
                c[f"p_{name}"][-1] = raw
                c[f"s_{name}"][-1] = smoothed

    def _event(self, event: Event, media_s: float | None) -> None:
        self._row("event", event.frame_id, event.capture_s, event.wall_time_s, media_s)
        c = self.columns
        c["occupant_id"][-1] = event.occupant_id
        c["seat"][-1] = event.seat
        for name in self.class_names:
            c[f"s_{name}"][-1] = event.emotions.get(name)
        c["event_id"][-1] = event.event_id
        c["event_type"][-1] = event.type
        c["event_phase"][-1] = event.phase.value
        c["event_rule"][-1] = event.rule
        c["event_severity"][-1] = event.severity
        c["event_score"][-1] = event.score
        c["event_started_wall_time_s"][-1] = event.started_wall_time_s
        c["event_start_event_id"][-1] = event.start_event_id


def entries(table: pa.Table, class_names: Sequence[str]) -> Iterator[Entry]:
    """The entries of a recording table, in order: ``RowBuffer.add`` undone."""
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    raw_cols = [cols[f"p_{name}"] for name in class_names]
    smooth_cols = [cols[f"s_{name}"] for name in class_names]
    head: int | None = None  # the row that opened the entry being read
    occupants: list[OccupantSample] = []
    events: list[Event] = []

    def finish() -> Entry:
        assert head is not None
        capture_s, wall_time_s = cols["capture_s"][head], cols["wall_time_s"][head]
        if cols["kind"][head] == "close":
            return Closing(capture_s, wall_time_s, tuple(events))
        frame_id, media_s = cols["frame_id"][head], cols["media_s"][head]
        return FrameSample(frame_id, capture_s, wall_time_s, media_s, tuple(occupants), tuple(events))

    for i, kind in enumerate(cols["kind"]):
        if kind == "event" and head is not None:
            events.append(_event_at(cols, smooth_cols, class_names, i))
            continue
        same_frame = (
            head is not None and cols["kind"][head] == "reading" and cols["frame_id"][head] == cols["frame_id"][i]
        )
        if kind == "reading" and same_frame and not events:
            occupants.append(_occupant_at(cols, raw_cols, smooth_cols, i))
            continue
        if head is not None:
            yield finish()
            head, occupants, events = None, [], []
        if kind == "rules":
            rules = RulesConfig.model_validate_json(cols["rules_json"][i])
            yield RulesChange(cols["capture_s"][i], cols["wall_time_s"][i], rules)
        elif kind in ("reading", "frame", "close"):
            head = i
            if kind == "reading":
                occupants.append(_occupant_at(cols, raw_cols, smooth_cols, i))
        else:
            raise ValueError(f"row {i}: unexpected {kind!r} row")
    if head is not None:
        yield finish()


def _occupant_at(
    cols: dict[str, list[Any]], raw_cols: list[list[Any]], smooth_cols: list[list[Any]], i: int
) -> OccupantSample:
    return OccupantSample(
        occupant_id=cols["occupant_id"][i],
        seat=cols["seat"][i],
        face_w_px=cols["face_w_px"][i],
        face_h_px=cols["face_h_px"][i],
        face_score=cols["face_score"][i],
        raw=tuple(col[i] for col in raw_cols),
        smoothed=tuple(col[i] for col in smooth_cols),
    )


def _event_at(cols: dict[str, list[Any]], smooth_cols: list[list[Any]], class_names: Sequence[str], i: int) -> Event:
    severity: Severity = cols["event_severity"][i]
    return Event(
        event_id=cols["event_id"][i],
        type=cols["event_type"][i],
        phase=Phase(cols["event_phase"][i]),
        rule=cols["event_rule"][i],
        occupant_id=cols["occupant_id"][i],
        seat=cols["seat"][i],
        capture_s=cols["capture_s"][i],
        wall_time_s=cols["wall_time_s"][i],
        score=cols["event_score"][i],
        emotions={name: col[i] for name, col in zip(class_names, smooth_cols, strict=True) if col[i] is not None},
        started_wall_time_s=cols["event_started_wall_time_s"][i],
        start_event_id=cols["event_start_event_id"][i],
        severity=severity,
        frame_id=cols["frame_id"][i],
    )
