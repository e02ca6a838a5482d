"""The anomaly rules engine: a pure state machine from emotion readings to start/end events.

``RulesEngine.update`` is called once per processed frame with that frame's readings.
It owns no thread, clock or I/O: time comes in as arguments (monotonic seconds for every
decision, UTC epoch seconds only to stamp events), so a recorded or synthetic stream
replays exactly.

Per occupant (keyed by ``occupant_id``):

- the probabilities are smoothed by an exponential moving average (``rules.smoothing_s``);
- ``stress`` opens when the smoothed group score has stayed >= ``enter_score`` for
  ``sustain_s`` and closes when it has stayed < ``exit_score`` for ``release_s``;
- ``unexpected_expression`` opens when a fast average of the raw group score rises well
  above a slow baseline, and closes when the fast average falls below ``exit_score`` or
  after ``max_duration_s``;
- ``occupant_lost`` opens when an occupant has not been seen for ``lost_after_s`` and
  closes when it is seen again.

Choices worth knowing:

- every end, whatever caused it, starts that rule's cooldown;
- an occupant unseen for ``lost_after_s`` has its stress and onset events ended even when
  the ``occupant_lost`` rule is disabled: nothing can be judged without a face;
- an occupant unseen for ``lost_after_s + FORGET_AFTER_S`` is forgotten: its open events
  (its ``occupant_lost`` included) are ended, then its state is dropped, so an occupant
  that never returns costs no memory; seen again later it is a new occupant;
- the onset baseline learns each raw sample three onset time constants late, stands still
  while an onset is open and throws away the samples of the onset, so it never learns an
  onset; changing the onset classes restarts every onset history;
- the ``occupant_lost`` score is the number of seconds the occupant has been unseen;
- events not caused by a reading (lost, forced ends) carry ``frame_id`` -1, the update's
  time and the rule's last score.
"""

from __future__ import annotations

import math
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from cabin_monitor.config import (
    OccupantLostRuleConfig,
    RulesConfig,
    StressRuleConfig,
    UnexpectedExpressionRuleConfig,
)
from cabin_monitor.errors import RuntimeFault
from cabin_monitor.messages import EmotionReading, Event, Phase, end_event_id

STRESS = "stress"
ONSET = "unexpected_expression"
LOST = "occupant_lost"
RULE_NAMES = (STRESS, ONSET, LOST)

FORGET_AFTER_S = 600.0
"""An occupant lost for this long (after ``lost_after_s``) is forgotten."""

# The onset baseline learns each sample this many onset time constants late: by then
# the fast average has answered a real onset (95 % of a step), so the samples of the
# onset are still waiting when the event opens and are thrown away instead of learnt.
_BASELINE_DELAY_TAUS = 3.0


@dataclass(frozen=True, slots=True)
class OccupantState:
    """What the engine knows about one occupant, for the occupant state topic."""

    occupant_id: str
    seat: str | None
    last_seen_s: float  # monotonic time of its latest reading
    emotions: dict[str, float]  # smoothed probabilities
    active_events: tuple[str, ...]  # types of its open events
    stress_score: float | None = None  # the stress rule's group score (smoothed); None while the rule is off
    onset_score: float | None = None  # the onset rule's fast average; None while it has no history
    onset_baseline: float | None = None  # ...and the slow baseline it is compared with


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
class _Onset:
    first_s: float  # start of this occupant's history
    last_s: float
    fast: float
    baseline: float
    pending: deque[tuple[float, float]]  # (time, raw group score) the baseline has yet to learn


@dataclass(slots=True)
class _Occupant:
    seat: str | None
    last_seen_s: float
    smoothed: dict[str, float]
    above_since_s: float | None = None  # stress score >= enter_score since
    below_since_s: float | None = None  # stress score < exit_score since, while open
    onset: _Onset | None = None
    open: dict[str, _OpenEvent] = field(default_factory=dict)
    ended_s: dict[str, float] = field(default_factory=dict)  # last end per rule, for cooldowns


_RuleConfig = StressRuleConfig | UnexpectedExpressionRuleConfig | OccupantLostRuleConfig


def _new_event_id() -> str:
    return str(uuid.uuid4())


class RulesEngine:
    """Turns each frame's emotion readings into ``start``/``end`` events, per occupant."""

    def __init__(
        self,
        config: RulesConfig,
        class_names: Sequence[str],
        id_factory: Callable[[], str] = _new_event_id,
    ) -> None:
        """Raise ``ValueError`` if an enabled rule names a class the model does not have.

        ``id_factory`` gives each ``start`` its id; an ``end``'s follows from its start's (``end_event_id``).
        """
        self._class_names = tuple(class_names)
        check_classes(config, self._class_names)
        self._config = config
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

    def reconfigure(self, config: RulesConfig) -> None:
        """Swap in new rules, keeping every occupant's state; on ``ValueError`` nothing changes."""
        check_classes(config, self._class_names)
        if config.unexpected_expression.classes != self._config.unexpected_expression.classes:
            for occupant in self._occupants.values():
                occupant.onset = None  # its averages summed other classes: learn afresh
        self._config = config

    def update(self, readings: Sequence[EmotionReading], now_s: float, wall_time_s: float) -> list[Event]:
        """Process one frame's readings (maybe none) taken at ``now_s``; return the events it caused."""
        at = _Moment(now_s, wall_time_s)
        events = self._end_disabled(at)
        seen = set()
        for reading in readings:
            seen.add(reading.occupant_id)
            events += self._on_reading(reading)
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
            for rule in RULE_NAMES
            if rule in occupant.open
        ]
        self._occupants.clear()
        return events

    def occupants(self) -> list[OccupantState]:
        """A snapshot of every occupant the engine tracks, lost ones included, with the scores its rules judge."""
        stress = self._config.stress
        return [
            OccupantState(
                occupant_id=occupant_id,
                seat=occupant.seat,
                last_seen_s=occupant.last_seen_s,
                emotions=dict(occupant.smoothed),
                active_events=tuple(rule for rule in RULE_NAMES if rule in occupant.open),
                stress_score=sum(occupant.smoothed.get(name, 0.0) for name in stress.classes)
                if stress.enabled
                else None,
                onset_score=None if occupant.onset is None else occupant.onset.fast,
                onset_baseline=None if occupant.onset is None else occupant.onset.baseline,
            )
            for occupant_id, occupant in self._occupants.items()
        ]

    def _rule(self, name: str) -> _RuleConfig:
        if name == STRESS:
            return self._config.stress
        if name == ONSET:
            return self._config.unexpected_expression
        return self._config.occupant_lost

    def _on_reading(self, reading: EmotionReading) -> list[Event]:
        at = _Moment(reading.capture_s, reading.wall_time_s, reading.frame_id)
        events: list[Event] = []
        occupant = self._occupants.get(reading.occupant_id)
        if occupant is None:
            occupant = _Occupant(seat=reading.seat, last_seen_s=reading.capture_s, smoothed=dict(reading.emotions))
            self._occupants[reading.occupant_id] = occupant
        else:
            unseen_s = reading.capture_s - occupant.last_seen_s
            alpha = _alpha(unseen_s, self._config.smoothing_s)
            occupant.smoothed = {
                name: occupant.smoothed.get(name, p) + alpha * (p - occupant.smoothed.get(name, p))
                for name, p in reading.emotions.items()
            }
            occupant.seat = reading.seat
            occupant.last_seen_s = reading.capture_s
            if LOST in occupant.open:
                events.append(self._end(LOST, reading.occupant_id, occupant, at, score=unseen_s))
        return events + self._stress(reading.occupant_id, occupant, at) + self._onset(reading, occupant, at)

    def _stress(self, occupant_id: str, occupant: _Occupant, at: _Moment) -> list[Event]:
        rule = self._config.stress
        if not rule.enabled:
            occupant.above_since_s = occupant.below_since_s = None
            return []
        now_s = at.capture_s
        score = sum(occupant.smoothed.get(name, 0.0) for name in rule.classes)
        opened = occupant.open.get(STRESS)
        if opened is None:
            # A dip below enter_score restarts the sustain timer.
            if score < rule.enter_score:
                occupant.above_since_s = None
            elif occupant.above_since_s is None:
                occupant.above_since_s = now_s
            if (
                occupant.above_since_s is not None
                and now_s - occupant.above_since_s >= rule.sustain_s
                and not self._cooling(occupant, STRESS, now_s, rule.cooldown_s)
            ):
                occupant.below_since_s = None
                return [self._start(STRESS, occupant_id, occupant, at, score)]
            return []
        opened.score = score
        # Hysteresis: only a score below exit_score counts towards closing.
        if score >= rule.exit_score:
            occupant.below_since_s = None
        elif occupant.below_since_s is None:
            occupant.below_since_s = now_s
        if occupant.below_since_s is not None and now_s - occupant.below_since_s >= rule.release_s:
            occupant.above_since_s = occupant.below_since_s = None
            return [self._end(STRESS, occupant_id, occupant, at)]
        return []

    def _onset(self, reading: EmotionReading, occupant: _Occupant, at: _Moment) -> list[Event]:
        rule = self._config.unexpected_expression
        if not rule.enabled:
            occupant.onset = None  # re-enabled, it builds a fresh history
            return []
        now_s = at.capture_s
        raw = sum(reading.emotions.get(name, 0.0) for name in rule.classes)
        state = occupant.onset
        if state is None:
            state = _Onset(first_s=now_s, last_s=now_s, fast=raw, baseline=raw, pending=deque([(now_s, raw)]))
            occupant.onset = state
        else:
            dt = now_s - state.last_s
            state.last_s = now_s
            state.fast += _alpha(dt, rule.onset_window_s) * (raw - state.fast)
            if ONSET not in occupant.open:  # the baseline is frozen while an onset is open
                state.pending.append((now_s, raw))
                learn_before_s = now_s - _BASELINE_DELAY_TAUS * rule.onset_window_s
                while len(state.pending) > 1 and state.pending[1][0] <= learn_before_s:
                    state.pending.popleft()
                state.baseline += _alpha(dt, rule.baseline_window_s) * (state.pending[0][1] - state.baseline)
        occupant_id = reading.occupant_id
        opened = occupant.open.get(ONSET)
        if opened is None:
            if (
                now_s - state.first_s >= rule.min_history_s
                and state.fast >= rule.min_score
                and state.fast - state.baseline >= rule.min_rise
                and not self._cooling(occupant, ONSET, now_s, rule.cooldown_s)
            ):
                state.pending.clear()  # these samples are the onset itself: never learn them
                return [self._start(ONSET, occupant_id, occupant, at, state.fast)]
            return []
        opened.score = state.fast
        if state.fast < rule.exit_score or now_s - opened.started_s >= rule.max_duration_s:
            return [self._end(ONSET, occupant_id, occupant, at)]
        return []

    def _on_unseen(self, occupant_id: str, occupant: _Occupant, at: _Moment) -> list[Event]:
        rule = self._config.occupant_lost
        unseen_s = at.capture_s - occupant.last_seen_s
        if unseen_s < rule.lost_after_s:
            return []
        if LOST in occupant.open:
            occupant.open[LOST].score = unseen_s
        if unseen_s >= rule.lost_after_s + FORGET_AFTER_S:
            del self._occupants[occupant_id]
            return [self._end(name, occupant_id, occupant, at) for name in RULE_NAMES if name in occupant.open]
        # Nothing can be judged without a face: end what was open, and sustain afresh on return.
        events = [self._end(name, occupant_id, occupant, at) for name in (STRESS, ONSET) if name in occupant.open]
        occupant.above_since_s = occupant.below_since_s = None
        if rule.enabled and LOST not in occupant.open:
            events.append(self._start(LOST, occupant_id, occupant, at, unseen_s))
        return events

    def _end_disabled(self, at: _Moment) -> list[Event]:
        return [
            self._end(name, occupant_id, occupant, at)
            for occupant_id, occupant in self._occupants.items()
            for name in RULE_NAMES
            if name in occupant.open and not self._rule(name).enabled
        ]

    def _cooling(self, occupant: _Occupant, name: str, now_s: float, cooldown_s: float) -> bool:
        ended_s = occupant.ended_s.get(name)
        return ended_s is not None and now_s - ended_s < cooldown_s

    def _start(self, name: str, occupant_id: str, occupant: _Occupant, at: _Moment, score: float) -> Event:
        event_id = self._new_id()
        occupant.open[name] = _OpenEvent(event_id, at.capture_s, at.wall_time_s, score)
        return self._event(name, Phase.START, event_id, occupant_id, occupant, at, score)

    def _end(self, name: str, occupant_id: str, occupant: _Occupant, at: _Moment, score: float | None = None) -> Event:
        opened = occupant.open.pop(name)
        occupant.ended_s[name] = at.capture_s
        return self._event(
            name,
            Phase.END,
            end_event_id(opened.event_id),
            occupant_id,
            occupant,
            at,
            opened.score if score is None else score,
            start=opened,
        )

    def _event(
        self,
        name: str,
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
            type=name,
            phase=phase,
            rule=name,
            occupant_id=occupant_id,
            seat=occupant.seat,
            capture_s=at.capture_s,
            wall_time_s=at.wall_time_s,
            score=score,
            emotions=dict(occupant.smoothed),
            started_wall_time_s=None if start is None else start.started_wall_time_s,
            start_event_id=None if start is None else start.event_id,
            severity=self._rule(name).severity,
            frame_id=at.frame_id,
        )


class ClassMismatchError(RuntimeFault, ValueError):
    """An enabled rule names an emotion class that the model does not have."""


def check_classes(config: RulesConfig, class_names: Sequence[str]) -> None:
    """Raise ``ClassMismatchError`` if an enabled rule names a class that is not in ``class_names``."""
    rules: Mapping[str, StressRuleConfig | UnexpectedExpressionRuleConfig] = {
        STRESS: config.stress,
        ONSET: config.unexpected_expression,
    }
    problems = [
        f"rules.{name}.classes has {missing} (set rules.{name}.classes or disable the rule)"
        for name, rule in rules.items()
        if rule.enabled and (missing := [c for c in rule.classes if c not in class_names])
    ]
    if problems:
        raise ClassMismatchError(f"the emotion model's classes are {list(class_names)}, but " + "; ".join(problems))


def _alpha(dt_s: float, tau_s: float) -> float:
    """Weight of a new sample dt_s after the last in an EMA with time constant tau_s (0: none)."""
    if tau_s <= 0:
        return 1.0
    return 1.0 - math.exp(-max(dt_s, 0.0) / tau_s)
