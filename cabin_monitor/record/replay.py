"""The rules engine run again over recordings: events, alerts, the fleet summary and the difference of two rule sets.

Pure: the caller reads the files (``record.files``) and prints. A replay feeds the recorded inputs,
frame by frame with their recorded times, to a fresh ``RulesEngine``; with the recording's own rules
(changes made while it ran included) it emits exactly the events the daemon emitted, bar their ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cabin_monitor.config import RulesConfig, merge_rules
from cabin_monitor.messages import Event, Observation, Phase
from cabin_monitor.record.format import Closing, Entry, FrameSample, RecordingMeta, RulesChange
from cabin_monitor.rules import RULE_NAMES, RULES, Rule, RulesEngine


@dataclass(frozen=True)
class RulesChoice:
    """Which rules a replay uses: the recording's own (changes included) or a file's, with a patch on top."""

    base: RulesConfig | None = None  # None: the rules each recording was made with
    patch: Mapping[str, Any] = field(default_factory=dict)  # a partial rules mapping, as config/set takes

    @property
    def follows_recording(self) -> bool:
        """Whether rule changes made while recording are replayed too."""
        return self.base is None

    def resolve(self, recorded: RulesConfig) -> RulesConfig:
        """The rules to use where the recording had ``recorded``; ``ValidationError`` if the patch is bad."""
        base = recorded if self.base is None else self.base
        return merge_rules(base, self.patch) if self.patch else base


@dataclass(frozen=True, slots=True)
class TracePoint:
    """One occupant's scores after one frame, as the rules judged them (for timelines)."""

    capture_s: float
    occupant_id: str
    values: Mapping[str, float | None]  # each rule's series key (``Rule.series``) -> value; None: none yet


@dataclass
class SessionReplay:
    """What one session's replay gave, and what the daemon emitted live."""

    vehicle_id: str
    session_id: str
    events: list[Event] = field(default_factory=list)
    live_events: list[Event] = field(default_factory=list)
    frames: int = 0
    first_s: float | None = None  # capture time of the first and last frame
    last_s: float | None = None
    first_wall_s: float | None = None
    last_wall_s: float | None = None
    presence: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # occupant -> seen spans
    rules: list[tuple[float, RulesConfig]] = field(default_factory=list)  # (from capture time, rules)
    trace: list[TracePoint] = field(default_factory=list)
    rule_types: tuple[Rule[Any, Any], ...] = RULES  # what the engine ran: the series of ``trace`` are theirs

    @property
    def duration_s(self) -> float:
        """From the first frame to the last."""
        return 0.0 if self.first_s is None or self.last_s is None else self.last_s - self.first_s

    def occupant_s(self, occupant_id: str) -> float:
        """How long the occupant was seen."""
        return sum(end - start for start, end in self.presence.get(occupant_id, []))


# A gap longer than this between two readings of an occupant splits its presence.
PRESENCE_GAP_S = 1.0


def replay_session(
    items: Iterable[RecordingMeta | Entry],
    choice: RulesChoice = RulesChoice(),
    *,
    trace: bool = False,
    on_file: Callable[[RecordingMeta], None] | None = None,
    rule_types: Sequence[Rule[Any, Any]] = RULES,
) -> SessionReplay:
    """Run the rules over one session's ``items`` (each file's metadata, then its entries: ``files.session_items``).

    ``rule_types``: the rule types the engine runs (``rules.registry.RULES``).
    """
    engine: RulesEngine | None = None
    result: SessionReplay | None = None
    for item in items:
        if isinstance(item, RecordingMeta):
            if on_file is not None:
                on_file(item)
            rules = choice.resolve(item.rules)
            if engine is None or result is None:
                engine = RulesEngine(rules, item.class_names, rules=rule_types)
                result = SessionReplay(item.vehicle_id, item.session_id, rule_types=engine.rules)
                result.rules.append((float("-inf"), rules))
            elif choice.follows_recording and rules != engine.config:  # a segment between is missing
                engine.reconfigure(rules)
                result.rules.append((result.last_s or float("-inf"), rules))
            continue
        if engine is None or result is None:
            raise ValueError("entries before any recording metadata")
        if isinstance(item, FrameSample):
            _frame(engine, result, item, trace and bool(item.occupants))
        elif isinstance(item, RulesChange):
            if choice.follows_recording:
                rules = choice.resolve(item.rules)
                engine.reconfigure(rules)
                result.rules.append((item.capture_s, rules))
        elif isinstance(item, Closing):
            result.events += engine.close_all(item.capture_s, item.wall_time_s)
            result.live_events += item.events
    if result is None:
        raise ValueError("no recording metadata")
    return result


def _frame(engine: RulesEngine, result: SessionReplay, frame: FrameSample, trace: bool) -> None:
    observations = []
    names = engine.class_names
    for occupant in frame.occupants:
        observations.append(
            Observation(
                frame_id=frame.frame_id,
                capture_s=frame.capture_s,
                wall_time_s=frame.wall_time_s,
                occupant_id=occupant.occupant_id,
                seat=occupant.seat,
                emotions=dict(zip(names, occupant.raw, strict=True)),
            )
        )
        spans = result.presence.setdefault(occupant.occupant_id, [])
        if spans and frame.capture_s - spans[-1][1] <= PRESENCE_GAP_S:
            spans[-1] = (spans[-1][0], frame.capture_s)
        else:
            spans.append((frame.capture_s, frame.capture_s))
    result.events += engine.update(observations, frame.capture_s, frame.wall_time_s)
    result.live_events += frame.events
    result.frames += 1
    if result.first_s is None:
        result.first_s, result.first_wall_s = frame.capture_s, frame.wall_time_s
    result.last_s, result.last_wall_s = frame.capture_s, frame.wall_time_s
    if trace:
        seen = {o.occupant_id for o in frame.occupants}
        result.trace += [
            TracePoint(frame.capture_s, s.occupant_id, s.series) for s in engine.occupants() if s.occupant_id in seen
        ]


# -- alerts and the summary ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Alert:
    """One event from its start to its end (or to the end of the recording, when it never ended)."""

    vehicle_id: str
    session_id: str
    occupant_id: str
    seat: str | None
    type: str
    severity: str
    score: float  # at the start
    start_s: float  # capture clock
    end_s: float
    start_wall_s: float
    end_wall_s: float
    ended: bool  # False: still open when the recording ends

    @property
    def duration_s(self) -> float:
        """How long it lasted."""
        return self.end_s - self.start_s


def alerts(replay: SessionReplay, events: Sequence[Event] | None = None) -> list[Alert]:
    """The replay's events (or ``events`` of that session) paired into alerts, in start order."""
    events = replay.events if events is None else events
    starts: dict[str, Event] = {}
    out: list[Alert] = []

    def alert(start: Event, end_s: float, end_wall_s: float, ended: bool) -> Alert:
        return Alert(
            replay.vehicle_id,
            replay.session_id,
            start.occupant_id,
            start.seat,
            start.type,
            start.severity,
            start.score,
            start.capture_s,
            end_s,
            start.wall_time_s,
            end_wall_s,
            ended,
        )

    for event in events:
        if event.phase is Phase.START:
            starts[event.event_id] = event
        elif event.start_event_id in starts:
            out.append(alert(starts.pop(event.start_event_id), event.capture_s, event.wall_time_s, True))
    last_s = replay.last_s if replay.last_s is not None else 0.0
    last_wall_s = replay.last_wall_s if replay.last_wall_s is not None else 0.0
    out += [alert(start, max(last_s, start.capture_s), last_wall_s, False) for start in starts.values()]
    return sorted(out, key=lambda a: (a.start_s, a.occupant_id, a.type))


@dataclass
class Tally:
    """Alerts and time over one scope (everything, a vehicle, or an occupant of a vehicle)."""

    seconds: float = 0.0  # recorded time (a vehicle's, or an occupant's time in view)
    count: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RULE_NAMES, 0))
    alert_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(RULE_NAMES, 0.0))

    def add(self, alert: Alert) -> None:
        """Count one alert."""
        self.count[alert.type] = self.count.get(alert.type, 0) + 1
        self.alert_s[alert.type] = self.alert_s.get(alert.type, 0.0) + alert.duration_s

    def per_hour(self, rule: str) -> float:
        """Alerts of ``rule`` per hour of recorded time (0 with no time)."""
        return self.count.get(rule, 0) * 3600.0 / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        """For ``--summary-json``."""
        return {
            "hours": self.seconds / 3600.0,
            "alerts": dict(self.count),
            "alerts_per_hour": {rule: self.per_hour(rule) for rule in self.count},
            "time_in_alert_s": dict(self.alert_s),
        }


@dataclass
class Summary:
    """Alert rates of a replay: overall, per vehicle, and per occupant of each vehicle."""

    overall: Tally = field(default_factory=Tally)
    vehicles: dict[str, Tally] = field(default_factory=dict)
    occupants: dict[tuple[str, str], Tally] = field(default_factory=dict)
    sessions: int = 0
    frames: int = 0

    def as_json(self) -> dict[str, Any]:
        """For ``--summary-json``."""
        return {
            "sessions": self.sessions,
            "frames": self.frames,
            "overall": self.overall.as_json(),
            "vehicles": {v: t.as_json() for v, t in sorted(self.vehicles.items())},
            "occupants": [
                {"vehicle_id": v, "occupant_id": o, **t.as_json()} for (v, o), t in sorted(self.occupants.items())
            ],
        }


def summarize(replays: Sequence[SessionReplay], alerts_by_session: Sequence[Sequence[Alert]]) -> Summary:
    """The summary of replays and their alerts (``alerts(replay)`` each, in the same order)."""
    summary = Summary()
    for replay, found in zip(replays, alerts_by_session, strict=True):
        summary.sessions += 1
        summary.frames += replay.frames
        summary.overall.seconds += replay.duration_s
        vehicle = summary.vehicles.setdefault(replay.vehicle_id, Tally())
        vehicle.seconds += replay.duration_s
        for occupant_id in replay.presence:
            summary.occupants.setdefault((replay.vehicle_id, occupant_id), Tally()).seconds += replay.occupant_s(
                occupant_id
            )
        for alert in found:
            summary.overall.add(alert)
            vehicle.add(alert)
            summary.occupants.setdefault((replay.vehicle_id, alert.occupant_id), Tally()).add(alert)
    return summary


# -- two rule sets compared -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AlertChange:
    """An alert that only one of the two rule sets raises."""

    change: str  # "added" (only B raises it) | "removed" (only A does)
    alert: Alert


def compare(a: Sequence[Alert], b: Sequence[Alert]) -> list[AlertChange]:
    """The alerts of ``b`` that overlap none of ``a``'s (added) and those of ``a`` overlapping none of ``b``'s
    (removed); alerts match when vehicle, session, occupant and type agree and their times overlap."""

    def by_key(alerts: Sequence[Alert]) -> dict[tuple[str, str, str, str], list[Alert]]:
        grouped: dict[tuple[str, str, str, str], list[Alert]] = {}
        for x in alerts:
            grouped.setdefault((x.vehicle_id, x.session_id, x.occupant_id, x.type), []).append(x)
        return grouped

    def overlaps(x: Alert, others: dict[tuple[str, str, str, str], list[Alert]]) -> bool:
        same = others.get((x.vehicle_id, x.session_id, x.occupant_id, x.type), [])
        return any(o.start_s <= x.end_s and x.start_s <= o.end_s for o in same)

    a_keys, b_keys = by_key(a), by_key(b)
    changes = [AlertChange("removed", x) for x in a if not overlaps(x, b_keys)]
    changes += [AlertChange("added", x) for x in b if not overlaps(x, a_keys)]
    return sorted(changes, key=lambda c: (c.alert.vehicle_id, c.alert.start_wall_s, c.change))
