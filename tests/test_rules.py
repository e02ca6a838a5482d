"""Timed scenarios for the rules engine: synthetic 30 Hz readings in, events at the right second out."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest

from cabin_monitor.config import EMOTIONS_7, RulesConfig, merge_rules
from cabin_monitor.messages import Event, Observation, Phase, end_event_id
from cabin_monitor.rules import FORGET_AFTER_S, LOST, ONSET, RULES, STRESS, ClassMismatchError, Rule, RulesEngine
from tests.support.grin_rule import GRIN, GrinRule

FPS = 30.0
TOLERANCE_S = 2 / FPS  # a frame or two
WALL0_S = 1_700_000_000.0
SEATS = {"a": "driver", "b": "passenger"}
NO_SMOOTHING = {"smoothing_s": 0}  # so that stress timings are the rule's own

Emotions = Mapping[str, float]
# What an occupant shows: fixed emotions, or a function of seconds since the segment began (None: not seen).
Face = Emotions | Callable[[float], Emotions | None] | None


def probs(**weights: float) -> dict[str, float]:
    """A 7-class probability vector: the given classes, the rest on neutral."""
    out = dict.fromkeys(EMOTIONS_7, 0.0)
    out.update(weights)
    out["neutral"] = 1.0 - sum(weights.values())
    return out


NEUTRAL = probs()


def reading(occupant_id: str, frame_id: int, capture_s: float, emotions: Emotions) -> Observation:
    """One occupant's reading in one frame."""
    return Observation(
        frame_id=frame_id,
        capture_s=capture_s,
        wall_time_s=WALL0_S + capture_s,
        occupant_id=occupant_id,
        seat=SEATS.get(occupant_id),
        emotions=dict(emotions),
    )


def make_engine(
    rules: Mapping[str, Any] | None = None,
    class_names: Sequence[str] = EMOTIONS_7,
    rule_types: Sequence[Rule[Any, Any]] = RULES,
) -> RulesEngine:
    """An engine with deterministic event ids e1, e2, ..."""
    ids = itertools.count(1)
    config = RulesConfig.model_validate(rules or {})
    return RulesEngine(config, class_names, id_factory=lambda: f"e{next(ids)}", rules=rule_types)


class Drive:
    """Feeds an engine 30 Hz frames, starting at 0 s, and keeps every event it returns."""

    def __init__(self, engine: RulesEngine) -> None:
        self.engine = engine
        self.frame_id = 0
        self.events: list[Event] = []

    @property
    def now_s(self) -> float:
        """Capture time of the next frame."""
        return self.frame_id / FPS

    def run(self, seconds: float, **faces: Face) -> list[Event]:
        """Feed ``seconds`` of frames in which each named occupant shows its face."""
        start_s = self.now_s
        new: list[Event] = []
        for _ in range(round(seconds * FPS)):
            now_s = self.now_s
            readings = []
            for occupant_id, face in faces.items():
                emotions = face(now_s - start_s) if callable(face) else face
                if emotions is not None:
                    readings.append(reading(occupant_id, self.frame_id, now_s, emotions))
            new += self.engine.update(readings, now_s, WALL0_S + now_s)
            self.frame_id += 1
        self.events += new
        return new

    def close_all(self) -> list[Event]:
        """Shut the engine down at the next frame's time."""
        new = self.engine.close_all(self.now_s, WALL0_S + self.now_s)
        self.events += new
        return new

    def times(self, event_type: str, phase: Phase, occupant_id: str = "a") -> list[float]:
        """Capture times of the recorded events of one type and phase for one occupant."""
        return [
            e.capture_s
            for e in self.events
            if e.type == event_type and e.phase == phase and e.occupant_id == occupant_id
        ]


def at(*times_s: float) -> Any:
    """Event times to compare with, within a frame or two."""
    return pytest.approx(list(times_s), abs=TOLERANCE_S)


def assert_paired(events: Sequence[Event], all_closed: bool = True) -> None:
    """Check that every end follows and references its own start, and every id is fresh."""
    assert len({e.event_id for e in events}) == len(events)
    starts: dict[str, Event] = {}
    ended: set[str] = set()
    for e in events:
        if e.phase == Phase.START:
            assert e.start_event_id is None and e.started_wall_time_s is None
            starts[e.event_id] = e
            continue
        assert e.start_event_id in starts, f"end {e.event_id} has no earlier start"
        assert e.event_id == end_event_id(e.start_event_id)
        assert e.start_event_id not in ended, f"start {e.start_event_id} ended twice"
        start = starts[e.start_event_id]
        assert (e.type, e.rule, e.occupant_id) == (start.type, start.rule, start.occupant_id)
        assert e.started_wall_time_s == start.wall_time_s
        ended.add(e.start_event_id)
    if all_closed:
        assert ended == set(starts), "some starts have no end"


def test_stress_starts_after_sustain_and_not_before() -> None:
    """A negative score held from 5 s opens stress at 8 s (sustain_s 3) and not earlier."""
    drive = Drive(make_engine(NO_SMOOTHING))
    drive.run(5, a=NEUTRAL)
    drive.run(6, a=probs(anger=0.8))
    assert drive.times(STRESS, Phase.START) == at(8.0)
    start = next(e for e in drive.events if e.type == STRESS)
    assert (start.rule, start.severity, start.seat, start.frame_id) == (STRESS, "warning", "driver", 240)
    assert start.score == pytest.approx(0.8)
    assert start.emotions == pytest.approx(probs(anger=0.8))


def test_smoothing_delays_stress_by_the_time_the_average_takes() -> None:
    """With smoothing_s 0.7 a 0.8 step crosses enter_score 0.6 after 0.7*ln(4) s, then sustain_s runs."""
    drive = Drive(make_engine())
    drive.run(5, a=NEUTRAL)
    drive.run(6, a=probs(anger=0.8))
    assert drive.times(STRESS, Phase.START) == at(5 + 0.7 * math.log(0.8 / 0.2) + 3)


def test_short_negative_spikes_do_not_start_stress() -> None:
    """Two-second spikes separated by calm moments never add up to a stress event."""
    drive = Drive(make_engine())
    for _ in range(5):
        drive.run(2, a=probs(anger=0.9))
        drive.run(1, a=NEUTRAL)
    assert drive.times(STRESS, Phase.START) == []


def test_stress_hysteresis_and_release() -> None:
    """A score between exit and enter keeps stress open; below exit_score for release_s closes it."""
    drive = Drive(make_engine(NO_SMOOTHING))
    drive.run(4, a=probs(anger=0.8))
    drive.run(20, a=probs(anger=0.5))
    assert drive.times(STRESS, Phase.END) == []
    drive.run(3, a=probs(anger=0.2))
    assert drive.times(STRESS, Phase.START) == at(3.0)
    assert drive.times(STRESS, Phase.END) == at(24.0 + 1.5)
    end = drive.events[-1]
    assert end.score == pytest.approx(0.2)
    assert_paired([e for e in drive.events if e.type == STRESS])


def test_dip_shorter_than_release_keeps_stress_open() -> None:
    """One second below exit_score (release_s 1.5) does not close stress."""
    drive = Drive(make_engine(NO_SMOOTHING))
    drive.run(4, a=probs(anger=0.8))
    drive.run(1, a=probs(anger=0.1))
    drive.run(3, a=probs(anger=0.5))
    assert drive.times(STRESS, Phase.START) == at(3.0)
    assert drive.times(STRESS, Phase.END) == []
    assert drive.engine.occupants()[0].active_events == (STRESS,)


def test_cooldown_delays_the_next_stress() -> None:
    """After stress ends at 5.5 s, renewed stress opens only when cooldown_s (30) has passed."""
    drive = Drive(make_engine(NO_SMOOTHING))
    drive.run(4, a=probs(anger=0.8))
    drive.run(2, a=probs(anger=0.1))
    drive.run(40, a=probs(anger=0.8))
    assert drive.times(STRESS, Phase.START) == at(3.0, 5.5 + 30)
    assert drive.times(STRESS, Phase.END) == at(5.5)


def test_disabled_rule_never_fires() -> None:
    """With stress disabled a stressed occupant gives no stress event."""
    drive = Drive(make_engine({"stress": {"enabled": False}}))
    drive.run(20, a=probs(anger=0.9))
    assert drive.times(STRESS, Phase.START) == []


def test_unexpected_expression_on_sudden_fear() -> None:
    """Fear jumping to 0.9 after 10 calm seconds opens an onset event within half a second; fading closes it."""
    drive = Drive(make_engine())
    drive.run(10, a=NEUTRAL)
    drive.run(2, a=probs(fear=0.9))
    drive.run(3, a=NEUTRAL)
    # The fast average (tau 0.5 s) reaches min_score 0.5 after 0.5*ln(0.9/0.4) s ...
    assert drive.times(ONSET, Phase.START) == at(10 + 0.5 * math.log(0.9 / 0.4))
    # ... and, from about 0.88 at 12 s, falls below exit_score 0.3 after 0.5*ln(0.88/0.3) s.
    assert drive.times(ONSET, Phase.END) == at(12 + 0.5 * math.log(0.9 * (1 - math.exp(-4)) / 0.3))
    start = next(e for e in drive.events if e.type == ONSET)
    assert start.rule == ONSET and start.score >= 0.5
    assert 0.3 < start.emotions["fear"] < 0.5  # the smoothed snapshot (smoothing_s 0.7), not the raw 0.9


def test_unexpected_expression_ignores_a_slow_rise() -> None:
    """Fear creeping from 0 to 0.9 over two minutes is tracked by the baseline and fires no onset."""
    drive = Drive(make_engine())
    drive.run(120, a=lambda t: probs(fear=0.9 * t / 120))
    assert drive.times(ONSET, Phase.START) == []
    assert drive.times(STRESS, Phase.START) != []  # it is sustained stress instead


def test_unexpected_expression_waits_for_min_history() -> None:
    """A fear onset 1 s into an occupant's history fires only once min_history_s (3 s) has passed."""
    drive = Drive(make_engine())
    drive.run(1, a=NEUTRAL)
    drive.run(4, a=probs(fear=0.9))
    assert drive.times(ONSET, Phase.START) == at(3.0)


def test_unexpected_expression_ends_after_max_duration() -> None:
    """Fear held for 15 s closes its onset event max_duration_s (10) after it opened."""
    drive = Drive(make_engine())
    drive.run(10, a=NEUTRAL)
    drive.run(15, a=probs(fear=0.9))
    starts = drive.times(ONSET, Phase.START)
    assert starts == at(10.4)
    assert drive.times(ONSET, Phase.END) == at(starts[0] + 10)


def test_onset_baseline_does_not_learn_the_onset() -> None:
    """A moderate second onset soon after a long first one still fires: the baseline was frozen meanwhile."""
    drive = Drive(make_engine({"unexpected_expression": {"cooldown_s": 1}}))
    drive.run(10, a=NEUTRAL)
    drive.run(9, a=probs(fear=0.9))
    drive.run(2, a=NEUTRAL)
    drive.run(3, a=probs(fear=0.6))
    # Had the baseline learnt 9 s of 0.9 (about 0.33), 0.6 would not rise min_rise 0.3 above it.
    assert drive.times(ONSET, Phase.START) == at(10 + 0.5 * math.log(0.9 / 0.4), 21 + 0.5 * math.log(0.6 / 0.1))
    assert len(drive.times(ONSET, Phase.END)) == 1


def test_onset_baseline_does_not_learn_an_onset_while_it_builds() -> None:
    """Fear stepping from a 0.2 baseline to 0.53 fires when the fast average reaches 0.5, just min_rise above."""
    drive = Drive(make_engine())
    drive.run(30, a=probs(fear=0.2))
    drive.run(4, a=probs(fear=0.53))
    # Learning the onset as it builds (1.2 s) would lift the baseline by about 0.02: never min_rise below 0.53.
    assert drive.times(ONSET, Phase.START) == at(30 + 0.5 * math.log(0.33 / 0.03))


def test_occupant_lost_after_lost_after_s_and_back_on_return() -> None:
    """A face gone after 5 s is reported lost 3 s after its last reading and found when it returns at 12 s."""
    drive = Drive(make_engine())
    drive.run(5, a=NEUTRAL)
    last_seen_s = drive.now_s - 1 / FPS
    drive.run(7)
    drive.run(2, a=NEUTRAL)
    assert drive.times(LOST, Phase.START) == at(last_seen_s + 3)
    assert drive.times(LOST, Phase.END) == at(12.0)
    start, end = (e for e in drive.events if e.type == LOST)
    assert (start.severity, start.seat, start.frame_id) == ("info", "driver", -1)
    assert start.score == pytest.approx(3.0, abs=TOLERANCE_S)
    assert end.score == pytest.approx(12.0 - last_seen_s)
    assert end.frame_id == 360
    assert_paired(drive.events)


def test_occupant_lost_closes_open_stress() -> None:
    """When a stressed occupant is lost, its stress ends at the same moment its lost event starts."""
    drive = Drive(make_engine(NO_SMOOTHING))
    drive.run(5, a=probs(anger=0.8))
    drive.run(4)
    assert drive.times(STRESS, Phase.START) == at(3.0)
    lost_start = drive.times(LOST, Phase.START)
    assert lost_start == at(5 - 1 / FPS + 3)
    assert drive.times(STRESS, Phase.END) == lost_start
    assert [e.type for e in drive.events[-2:]] == [STRESS, LOST]
    assert_paired(drive.events, all_closed=False)


def test_absence_closes_stress_even_with_occupant_lost_disabled() -> None:
    """With occupant_lost disabled, an absent occupant's stress still ends after lost_after_s, silently."""
    drive = Drive(make_engine({**NO_SMOOTHING, "occupant_lost": {"enabled": False}}))
    drive.run(5, a=probs(anger=0.8))
    drive.run(4)
    assert drive.times(STRESS, Phase.END) == at(5 - 1 / FPS + 3)
    assert drive.times(LOST, Phase.START) == []


def test_two_occupants_are_independent() -> None:
    """A stressed driver and a calm passenger who leaves get their own events and no one else's."""
    drive = Drive(make_engine(NO_SMOOTHING))
    drive.run(5, a=probs(anger=0.8), b=NEUTRAL)
    drive.run(5, a=probs(anger=0.8))
    drive.run(3, a=probs(anger=0.8), b=NEUTRAL)
    assert drive.times(STRESS, Phase.START, "a") == at(3.0)
    assert drive.times(STRESS, Phase.END, "a") == []
    assert drive.times(LOST, Phase.START, "a") == []
    assert drive.times(STRESS, Phase.START, "b") == []
    assert drive.times(LOST, Phase.START, "b") == at(5 - 1 / FPS + 3)
    assert drive.times(LOST, Phase.END, "b") == at(10.0)
    assert {e.seat for e in drive.events if e.occupant_id == "b"} == {"passenger"}
    states = {s.occupant_id: s for s in drive.engine.occupants()}
    assert states["a"].active_events == (STRESS,)
    assert states["b"].active_events == ()


def test_reconfigure_changes_thresholds_mid_stream() -> None:
    """A 0.5 score is below enter_score 0.6; lowering enter_score to 0.45 at 10 s opens stress at 13 s."""
    drive = Drive(make_engine(NO_SMOOTHING))
    drive.run(10, a=probs(anger=0.5))
    assert drive.events == []
    drive.engine.reconfigure(merge_rules(drive.engine.config, {"stress": {"enter_score": 0.45, "exit_score": 0.3}}))
    drive.run(5, a=probs(anger=0.5))
    assert drive.times(STRESS, Phase.START) == at(13.0)


def test_reconfigure_with_unknown_classes_changes_nothing() -> None:
    """A rules update naming a class the model lacks is refused and the old thresholds stay in force."""
    drive = Drive(make_engine(NO_SMOOTHING))
    drive.run(4, a=probs(anger=0.8))
    before = drive.engine.config
    bad = merge_rules(before, {"stress": {"classes": ["rage"], "release_s": 0}})
    with pytest.raises(ValueError, match="rage"):
        drive.engine.reconfigure(bad)
    assert drive.engine.config is before
    assert drive.engine.occupants()[0].active_events == (STRESS,)
    drive.run(3, a=probs(anger=0.2))
    assert drive.times(STRESS, Phase.END) == at(4.0 + 1.5)


def test_changing_onset_classes_restarts_the_onset_history() -> None:
    """Happiness held for 20 s is no onset when the onset classes switch to happiness mid-stream."""
    drive = Drive(make_engine())
    drive.run(20, a=probs(happiness=0.8))
    rules = merge_rules(drive.engine.config, {"unexpected_expression": {"classes": ["happiness"]}})
    drive.engine.reconfigure(rules)
    drive.run(10, a=probs(happiness=0.8))
    assert drive.events == []


def test_disabling_a_rule_ends_its_open_event_on_the_next_update() -> None:
    """Stress disabled at 5 s ends the open stress at the next frame and opens no new one."""
    drive = Drive(make_engine(NO_SMOOTHING))
    drive.run(5, a=probs(anger=0.8))
    drive.engine.reconfigure(merge_rules(drive.engine.config, {"stress": {"enabled": False}}))
    drive.run(10, a=probs(anger=0.8))
    assert drive.times(STRESS, Phase.START) == at(3.0)
    assert drive.times(STRESS, Phase.END) == at(5.0)
    assert_paired([e for e in drive.events if e.type == STRESS])


def test_three_class_model_needs_matching_rules() -> None:
    """A neutral/positive/negative model refuses the 7-class default rules and works with classes [negative]."""
    classes = ("neutral", "positive", "negative")
    with pytest.raises(ValueError, match="neutral") as raised:
        make_engine(class_names=classes)
    message = str(raised.value)
    assert all(name in message for name in ("positive", "negative", "sadness", "fear", "stress"))
    rules = {**NO_SMOOTHING, "stress": {"classes": ["negative"]}, "unexpected_expression": {"classes": ["negative"]}}
    drive = Drive(make_engine(rules, class_names=classes))
    drive.run(5, a={"neutral": 0.1, "positive": 0.1, "negative": 0.8})
    assert drive.times(STRESS, Phase.START) == at(3.0)


def test_close_all_ends_everything() -> None:
    """Shutdown ends a driver's stress and onset and a passenger's lost event, each referencing its start."""
    drive = Drive(make_engine())
    drive.run(10, a=NEUTRAL, b=lambda t: NEUTRAL if t < 2 else None)
    drive.run(5, a=probs(fear=0.9))
    assert {(s.occupant_id, s.active_events) for s in drive.engine.occupants()} == {
        ("a", (STRESS, ONSET)),
        ("b", (LOST,)),
    }
    ends = drive.close_all()
    assert sorted((e.occupant_id, e.type) for e in ends) == [("a", STRESS), ("a", ONSET), ("b", LOST)]
    assert all(e.phase == Phase.END and e.capture_s == 15.0 for e in ends)
    assert_paired(drive.events)
    assert drive.close_all() == []
    assert drive.engine.occupants() == []


def test_every_end_references_its_start() -> None:
    """Over a busy two-occupant drive every end names its own start, and shutdown leaves nothing open."""
    drive = Drive(make_engine({"stress": {"cooldown_s": 5}, "unexpected_expression": {"cooldown_s": 2}}))
    for _ in range(4):
        drive.run(6, a=NEUTRAL, b=probs(sadness=0.7))
        drive.run(6, a=probs(fear=0.9), b=lambda t: probs(sadness=0.7) if t < 1 else None)
        drive.run(6, a=probs(anger=0.2), b=NEUTRAL)
    drive.close_all()
    assert {e.type for e in drive.events} == {STRESS, ONSET, LOST}
    assert_paired(drive.events)


def test_long_lost_occupant_is_forgotten() -> None:
    """An occupant lost for ten minutes gets its lost event ended and its state dropped."""
    engine = make_engine()
    events = engine.update([reading("a", 0, 0.0, NEUTRAL)], 0.0, WALL0_S)
    for second in range(1, 700):
        events += engine.update([], float(second), WALL0_S + second)
    assert [(e.type, e.phase, e.capture_s) for e in events] == [
        (LOST, Phase.START, 3.0),
        (LOST, Phase.END, 3.0 + FORGET_AFTER_S),
    ]
    assert engine.occupants() == []
    assert_paired(events)


def test_occupants_expose_each_rules_series() -> None:
    """The snapshot carries the stress score and the onset averages by series key; a disabled stress has none."""
    drive = Drive(make_engine(NO_SMOOTHING))
    drive.run(1, a=probs(anger=0.5, fear=0.2))
    (state,) = drive.engine.occupants()
    assert state.series["stress.score"] == pytest.approx(0.7)
    assert state.series["unexpected_expression.fast"] == pytest.approx(0.7)
    assert state.series["unexpected_expression.baseline"] == pytest.approx(0.7)
    drive.engine.reconfigure(merge_rules(drive.engine.config, {"stress": {"enabled": False}}))
    assert drive.engine.occupants()[0].series["stress.score"] is None


def test_a_new_rule_type_needs_only_its_module_and_a_registry_entry() -> None:
    """A test-only rule listed after the shipped ones raises its events on time and exposes its series."""
    drive = Drive(make_engine(rule_types=(*RULES, GrinRule())))
    drive.run(5, a=NEUTRAL)
    drive.run(3, a=probs(happiness=0.9))
    drive.run(2, a=NEUTRAL)
    assert drive.times(GRIN, Phase.START) == at(5.0)
    assert drive.times(GRIN, Phase.END) == at(8.0)
    start = next(e for e in drive.events if e.type == GRIN)
    assert (start.rule, start.severity) == (GRIN, "info")
    assert start.score == pytest.approx(0.9)
    assert {e.type for e in drive.events} == {GRIN}
    assert drive.engine.occupants()[0].series["grin.score"] == pytest.approx(0.0)
    assert_paired(drive.events)


def test_every_rule_type_is_asked_for_the_classes_it_needs() -> None:
    """A model without happiness refuses an engine running the grin rule, naming rules.grin.classes."""
    classes = ("neutral", "negative")
    rules = {"stress": {"classes": ["negative"]}, "unexpected_expression": {"classes": ["negative"]}}
    make_engine(rules, class_names=classes)
    with pytest.raises(ClassMismatchError, match=r"rules\.grin\.classes has \['happiness'\]"):
        make_engine(rules, class_names=classes, rule_types=(*RULES, GrinRule()))
