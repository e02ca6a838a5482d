"""The anomaly rules engine: a pure state machine from observations to start/end events, driving the rules.

``RulesEngine.update`` is called once per processed frame with that frame's observations
(``messages.Observation``). It owns no thread, clock or I/O: time comes in as arguments
(monotonic seconds for every decision, UTC epoch seconds only to stamp events), so a recorded or
synthetic stream replays exactly.

The engine owns what every rule shares, per occupant (keyed by ``occupant_id``): the probabilities
smoothed by an exponential moving average (``rules.smoothing_s``), each rule's state, the open
events and their ids (an end's is ``end_event_id`` of its start's), and when each rule last ended
(for cooldowns). What opens and closes an event is each rule's own (``rules.stress``,
``rules.onset``, ``rules.lost``, listed in ``rules.registry``). Per reading every rule first hears
that the occupant is in view (``Rule.seen``), then every rule judges the reading (``Rule.judge``).

Choices worth knowing:

- every end, whatever caused it, starts that rule's cooldown;
- an occupant unseen for ``rules.occupant_lost.lost_after_s`` is absent: every rule hears so on each
  update (``Rule.absent``), even when the ``occupant_lost`` rule is disabled, as nothing can be
  judged without a face;
- an occupant unseen for ``lost_after_s + FORGET_AFTER_S`` is forgotten: its open events
  (its ``occupant_lost`` included) are ended, then its state is dropped, so an occupant
  that never returns costs no memory; seen again later it is a new occupant;
- a disabled rule's open events end on the next update;
- events not caused by a reading (lost, forced ends) carry ``frame_id`` -1, the update's
  time and the rule's last score.

May import ``config``, ``messages``, ``errors`` and the other ``rules`` modules; no I/O.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cabin_monitor.config import RulesConfig
from cabin_monitor.errors import RuntimeFault
from cabin_monitor.messages import Event, Observation, Phase, end_event_id
from cabin_monitor.rules.base import Context, Rule, Verdict, ema_alpha
from cabin_monitor.rules.registry import RULES

FORGET_AFTER_S = 600.0
"""An occupant lost for this long (after ``lost_after_s``) is forgotten."""


@dataclass(frozen=True, slots=True)
class OccupantState:
    """What the engine knows about one occupant, for the occupant state topic, recordings and timelines."""

    occupant_id: str
    seat: str | None
    last_seen_s: float  # monotonic time of its latest reading
    emotions: dict[str, float]  # smoothed probabilities
    active_events: tuple[str, ...]  # types of its open events, in the order of the rules
    series: Mapping[str, float | None] = field(default_factory=dict)  # each rule's series key -> value now


@dataclass(frozen=True, slots=True)
class _Moment:
    capture_s: float
    wall_time_s: float
    frame_id: int = -1


@dataclass(slots=True)
class _OpenEvent:
    event_id: str
    started_s: float
    started_wall_time_s: float
    score: float  # the rule's latest score, reported by a forced end


@dataclass(slots=True)
class _Occupant:
    seat: str | None
    last_seen_s: float
    smoothed: dict[str, float]
    states: dict[str, Any]  # rule name -> that rule's state of this occupant
    open: dict[str, _OpenEvent] = field(default_factory=dict)
    ended_s: dict[str, float] = field(default_factory=dict)  # last end per rule, for cooldowns


def _new_event_id() -> str:
    return str(uuid.uuid4())


class RulesEngine:
    """Turns each frame's observations into ``start``/``end`` events, per occupant."""

    def __init__(
        self,
        config: RulesConfig,
        class_names: Sequence[str],
        id_factory: Callable[[], str] = _new_event_id,
        rules: Sequence[Rule[Any, Any]] = RULES,
    ) -> None:
        """Raise ``ClassMismatchError`` if an enabled rule names a class the model does not have, and
        ``ValueError`` if two rule types share a name.

        ``id_factory`` gives each ``start`` its id; an ``end``'s follows from its start's (``end_event_id``).
        ``rules`` are the rule types to run (``rules.registry.RULES``).
        """
        self._class_names = tuple(class_names)
        self._rules = tuple(rules)
        if len({rule.name for rule in self._rules}) != len(self._rules):
            raise ValueError(f"two rule types share a name: {[rule.name for rule in self._rules]}")
        check_classes(config, self._class_names, self._rules)
        self._config = config
        self._sections = self._sections_of(config)
        self._new_id = id_factory
        self._occupants: dict[str, _Occupant] = {}

    @property
    def config(self) -> RulesConfig:
        """The rules in force."""
        return self._config

    @property
    def class_names(self) -> tuple[str, ...]:
        """The model's classes, in the order of its output."""
        return self._class_names

    @property
    def rules(self) -> tuple[Rule[Any, Any], ...]:
        """The rule types the engine runs."""
        return self._rules

    def reconfigure(self, config: RulesConfig, *, checked: bool = False) -> None:
        """Swap in new rules, keeping every occupant's state; on ``ClassMismatchError`` nothing changes.

        ``checked``: ``check_classes`` has already accepted ``config`` for these classes (the rules in
        force check each change once, before accepting it), so it is not checked again.
        """
        if not checked:
            check_classes(config, self._class_names, self._rules)
        sections = self._sections_of(config)
        for rule in self._rules:
            if rule.restarts(self._sections[rule.name], sections[rule.name]):
                for occupant in self._occupants.values():
                    occupant.states[rule.name] = rule.new_state()
        self._config = config
        self._sections = sections

    def update(self, observations: Sequence[Observation], now_s: float, wall_time_s: float) -> list[Event]:
        """Process one frame's observations (maybe none) taken at ``now_s``; return the events they caused."""
        at = _Moment(now_s, wall_time_s)
        events = self._end_disabled(at)
        seen = set()
        for observation in observations:
            seen.add(observation.occupant_id)
            events += self._on_reading(observation)
        for occupant_id, occupant in list(self._occupants.items()):
            if occupant_id not in seen:
                events += self._on_unseen(occupant_id, occupant, at)
        return events

    def close_all(self, now_s: float, wall_time_s: float) -> list[Event]:
        """End every open event (so every start has an end) and forget every occupant."""
        at = _Moment(now_s, wall_time_s)
        events = [
            self._end(rule, occupant_id, occupant, at)
            for occupant_id, occupant in self._occupants.items()
            for rule in self._rules
            if rule.name in occupant.open
        ]
        self._occupants.clear()
        return events

    def occupants(self) -> list[OccupantState]:
        """A snapshot of every occupant the engine tracks, lost ones included, with the series its rules expose."""
        return [self._snapshot(occupant_id, occupant) for occupant_id, occupant in self._occupants.items()]

    def _snapshot(self, occupant_id: str, occupant: _Occupant) -> OccupantState:
        series: dict[str, float | None] = {}
        for rule in self._rules:
            series.update(rule.values(self._sections[rule.name], occupant.states[rule.name], occupant.smoothed))
        return OccupantState(
            occupant_id=occupant_id,
            seat=occupant.seat,
            last_seen_s=occupant.last_seen_s,
            emotions=dict(occupant.smoothed),
            active_events=tuple(rule.name for rule in self._rules if rule.name in occupant.open),
            series=series,
        )

    def _on_reading(self, observation: Observation) -> list[Event]:
        occupant, unseen_s = self._track(observation)
        at = _Moment(observation.capture_s, observation.wall_time_s, observation.frame_id)
        events: list[Event] = []
        contexts = []
        for rule in self._rules:  # every rule hears that the occupant is in view before any judges the reading
            context = self._context(rule, occupant, at, unseen_s)
            verdict = rule.seen(self._sections[rule.name], occupant.states[rule.name], context)
            happened = self._apply(rule, verdict, observation.occupant_id, occupant, at)
            if happened:  # its event opened or closed
                context = self._context(rule, occupant, at, unseen_s)
            contexts.append(context)
            events += happened
        for rule, context in zip(self._rules, contexts, strict=True):
            verdict = rule.judge(self._sections[rule.name], occupant.states[rule.name], context, observation)
            events += self._apply(rule, verdict, observation.occupant_id, occupant, at)
        return events

    def _track(self, observation: Observation) -> tuple[_Occupant, float]:
        """The observed occupant, its smoothed probabilities updated; and how long it was unseen before (0: new)."""
        occupant = self._occupants.get(observation.occupant_id)
        if occupant is None:
            occupant = _Occupant(
                seat=observation.seat,
                last_seen_s=observation.capture_s,
                smoothed=dict(observation.emotions),
                states={rule.name: rule.new_state() for rule in self._rules},
            )
            self._occupants[observation.occupant_id] = occupant
            return occupant, 0.0
        unseen_s = observation.capture_s - occupant.last_seen_s
        alpha = ema_alpha(unseen_s, self._config.smoothing_s)
        occupant.smoothed = {
            name: occupant.smoothed.get(name, p) + alpha * (p - occupant.smoothed.get(name, p))
            for name, p in observation.emotions.items()
        }
        occupant.seat = observation.seat
        occupant.last_seen_s = observation.capture_s
        return occupant, unseen_s

    def _on_unseen(self, occupant_id: str, occupant: _Occupant, at: _Moment) -> list[Event]:
        unseen_s = at.capture_s - occupant.last_seen_s
        absent_after_s = self._config.occupant_lost.lost_after_s
        if unseen_s < absent_after_s:
            return []
        forget = unseen_s >= absent_after_s + FORGET_AFTER_S
        events: list[Event] = []
        for rule in self._rules:
            context = self._context(rule, occupant, at, unseen_s)
            verdict = rule.absent(self._sections[rule.name], occupant.states[rule.name], context)
            if forget:  # whatever the rule says, everything open ends
                verdict = Verdict(None if verdict is None else verdict.score, closes=True)
            events += self._apply(rule, verdict, occupant_id, occupant, at)
        if forget:
            del self._occupants[occupant_id]
        return events

    def _end_disabled(self, at: _Moment) -> list[Event]:
        return [
            self._end(rule, occupant_id, occupant, at)
            for occupant_id, occupant in self._occupants.items()
            for rule in self._rules
            if rule.name in occupant.open and not self._sections[rule.name].enabled
        ]

    def _sections_of(self, config: RulesConfig) -> dict[str, Any]:
        """Each rule's section of ``config``, by rule name."""
        return {rule.name: rule.section(config) for rule in self._rules}

    def _context(self, rule: Rule[Any, Any], occupant: _Occupant, at: _Moment, unseen_s: float) -> Context:
        opened = occupant.open.get(rule.name)
        return Context(
            now_s=at.capture_s,
            smoothed=occupant.smoothed,
            unseen_s=unseen_s,
            open_since_s=None if opened is None else opened.started_s,
            ended_s=occupant.ended_s.get(rule.name),
        )

    def _apply(
        self, rule: Rule[Any, Any], verdict: Verdict | None, occupant_id: str, occupant: _Occupant, at: _Moment
    ) -> list[Event]:
        if verdict is None:
            return []
        opened = occupant.open.get(rule.name)
        if opened is None:
            if verdict.opens and verdict.score is not None:
                return [self._start(rule, occupant_id, occupant, at, verdict.score)]
            return []
        if verdict.score is not None:
            opened.score = verdict.score
        return [self._end(rule, occupant_id, occupant, at)] if verdict.closes else []

    def _start(self, rule: Rule[Any, Any], occupant_id: str, occupant: _Occupant, at: _Moment, score: float) -> Event:
        event_id = self._new_id()
        occupant.open[rule.name] = _OpenEvent(event_id, at.capture_s, at.wall_time_s, score)
        return self._event(rule, Phase.START, event_id, occupant_id, occupant, at, score)

    def _end(self, rule: Rule[Any, Any], occupant_id: str, occupant: _Occupant, at: _Moment) -> Event:
        opened = occupant.open.pop(rule.name)
        occupant.ended_s[rule.name] = at.capture_s
        return self._event(
            rule, Phase.END, end_event_id(opened.event_id), occupant_id, occupant, at, opened.score, start=opened
        )

    def _event(
        self,
        rule: Rule[Any, Any],
        phase: Phase,
        event_id: str,
        occupant_id: str,
        occupant: _Occupant,
        at: _Moment,
        score: float,
        start: _OpenEvent | None = None,
    ) -> Event:
        return Event(
            event_id=event_id,
            type=rule.name,
            phase=phase,
            rule=rule.name,
            occupant_id=occupant_id,
            seat=occupant.seat,
            capture_s=at.capture_s,
            wall_time_s=at.wall_time_s,
            score=score,
            emotions=dict(occupant.smoothed),
            started_wall_time_s=None if start is None else start.started_wall_time_s,
            start_event_id=None if start is None else start.event_id,
            severity=self._sections[rule.name].severity,
            frame_id=at.frame_id,
        )


class ClassMismatchError(RuntimeFault, ValueError):
    """An enabled rule names an emotion class that the model does not have."""


def check_classes(config: RulesConfig, class_names: Sequence[str], rules: Sequence[Rule[Any, Any]] = RULES) -> None:
    """Raise ``ClassMismatchError`` if an enabled rule names a class that is not in ``class_names``."""
    problems = []
    for rule in rules:
        section = rule.section(config)
        missing = [c for c in rule.classes(section) if c not in class_names] if section.enabled else []
        if missing:
            problems.append(
                f"rules.{rule.name}.classes has {missing} (set rules.{rule.name}.classes or disable the rule)"
            )
    if problems:
        raise ClassMismatchError(f"the emotion model's classes are {list(class_names)}, but " + "; ".join(problems))
