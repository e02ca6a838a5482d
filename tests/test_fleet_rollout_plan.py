"""The roll-out state machine: scenarios of answers, time and rates, and what it decides."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from cabin_monitor.fleet.rollout import MeasureRates, Phase, Plan, Rate, Rollout, Send, VehicleState, plan_groups

VEHICLES = [f"car-{i}" for i in range(10)]


def phase(rollout: Rollout) -> Phase:
    """The roll-out's phase now (a call, so that type checkers do not narrow it across inputs)."""
    return rollout.phase


def run_until_quiet(rollout: Rollout, now_s: float, answer: dict[str, bool | None], step_s: float = 0.5) -> float:
    """Tick every ``step_s``; each ``Send`` is answered at once as ``answer`` says (None: never). Stops at rates,
    DONE or ABORTED; returns the time reached."""
    for _ in range(10_000):
        for action in rollout.tick(now_s):
            if isinstance(action, MeasureRates):
                return now_s
            assert isinstance(action, Send)
            ok = answer.get(action.vehicle_id, True) if action.kind == "set" else True
            if ok is not None:
                errors = [] if ok else [{"path": "rules.stress.sustain_s", "message": "too large"}]
                rollout.answer(action.vehicle_id, action.request_id, ok, errors, now_s)
        if rollout.phase in (Phase.DONE, Phase.ABORTED):
            return now_s
        now_s += step_s
    raise AssertionError(f"roll-out stuck in {rollout.phase}")


def test_groups_are_a_canary_and_waves_of_the_rest() -> None:
    """10 % of 10 vehicles is one canary; the other nine in three waves of three; at least one canary always."""
    assert plan_groups(VEHICLES, 10, 3) == [VEHICLES[:1], VEHICLES[1:4], VEHICLES[4:7], VEHICLES[7:]]
    assert plan_groups(VEHICLES[:2], 1, 5) == [["car-0"], ["car-1"]]
    assert plan_groups(["car-0"], 50, 3) == [["car-0"]]


def test_canary_then_waves_then_done_when_the_canary_rate_holds() -> None:
    """All apply, the canary's rate is like its own before: every wave is sent, and the roll-out is done."""
    rollout = Rollout("r1", Plan({"stress": {"sustain_s": 5.0}}, wait_s=60, abort_rate_ratio=2.0), VEHICLES, 0.0)
    now = run_until_quiet(rollout, 0.0, {})
    assert phase(rollout) == Phase.OBSERVING and now >= 60
    assert [rollout.vehicles[v].state for v in VEHICLES] == [VehicleState.APPLIED] + [VehicleState.WAITING] * 9
    rollout.rates(Rate(4, 2.0), Rate(5, 2.0), Rate(40, 18.0), now)
    run_until_quiet(rollout, now, {})
    assert phase(rollout) == Phase.DONE
    assert all(p.state == VehicleState.APPLIED for p in rollout.vehicles.values())
    assert rollout.vehicles["car-3"].request_id == "r1/set/car-3"


def test_a_canary_alerting_far_more_aborts_and_restores_it() -> None:
    """The canary's rate triples against its own before: abort, one restore to the canary, nobody else touched."""
    rollout = Rollout("r2", Plan({"stress": {"enter_score": 0.2}}, wait_s=30, abort_rate_ratio=2.0), VEHICLES, 0.0)
    now = run_until_quiet(rollout, 0.0, {})
    rollout.rates(Rate(2, 1.0), Rate(6, 1.0), Rate(20, 9.0), now)
    assert phase(rollout) == Phase.RESTORING and rollout.abort_reason is not None
    assert rollout.abort_reason.startswith("outcome")
    sends = rollout.tick(now + 0.1)
    assert sends == [Send("car-0", "r2/restore/car-0", "restore")]
    rollout.answer("car-0", "r2/restore/car-0", True, [], now + 0.2)
    rollout.tick(now + 0.3)
    assert phase(rollout) == Phase.ABORTED
    assert rollout.vehicles["car-0"].state == VehicleState.RESTORED
    assert all(rollout.vehicles[v].state == VehicleState.WAITING for v in VEHICLES[1:])


def test_the_rate_floor_keeps_a_quiet_fleet_from_aborting_on_one_alert() -> None:
    """Before and rest at zero alerts: one canary alert in ten vehicle-hours is under the floor times the ratio."""
    plan = Plan({"stress": {"sustain_s": 5.0}}, wait_s=10, abort_rate_ratio=2.0, rate_floor_per_hour=0.1)
    rollout = Rollout("r3", plan, VEHICLES, 0.0)
    now = run_until_quiet(rollout, 0.0, {})
    rollout.rates(Rate(0, 10.0), Rate(1, 10.0), Rate(0, 90.0), now)
    assert phase(rollout) == Phase.RUNNING and rollout.wave == 1


def test_refusals_and_silence_over_the_limit_abort_after_the_minimum_answered() -> None:
    """Max 20 % failures after 4 answered: 2 refused and 1 silent of 4 abort; the applied and the silent restored."""
    plan = Plan(
        {"stress": {"sustain_s": 5.0}},
        canary_percent=40,
        wait_s=0,
        answer_timeout_s=5,
        max_failures_percent=20,
        min_answered=4,
    )
    rollout = Rollout("r4", plan, VEHICLES, 0.0)
    run_until_quiet(rollout, 0.0, {"car-0": False, "car-1": False, "car-2": None})
    assert phase(rollout) == Phase.ABORTED and rollout.abort_reason is not None
    assert rollout.abort_reason.startswith("operational: 3 of 4")
    states = {v: rollout.vehicles[v].state for v in VEHICLES[:4]}
    assert states == {
        "car-0": VehicleState.REFUSED,
        "car-1": VehicleState.REFUSED,
        "car-2": VehicleState.RESTORED,
        "car-3": VehicleState.RESTORED,
    }


def test_sends_are_paced_to_the_rate_per_minute() -> None:
    """At 6 per minute, the first wave of three goes out 10 s apart."""
    plan = Plan({"stress": {"sustain_s": 5.0}}, canary_percent=30, wait_s=0, max_per_minute=6)
    rollout = Rollout("r5", plan, VEHICLES, 0.0)
    sent_at: list[float] = []
    for tenth in range(0, 300):
        for action in rollout.tick(tenth / 10):
            assert isinstance(action, Send)
            sent_at.append(tenth / 10)
    assert sent_at == [0.0, 10.0, 20.0]


def test_answers_of_other_requests_are_ignored() -> None:
    """An answer with another request id (an operator's own config/set) changes nothing."""
    rollout = Rollout("r6", Plan({"stress": {"sustain_s": 5.0}}), VEHICLES, 0.0)
    (send,) = rollout.tick(0.0)
    assert isinstance(send, Send)
    rollout.answer(send.vehicle_id, "someone-else", False, [], 0.5)
    assert rollout.vehicles[send.vehicle_id].state == VehicleState.SENT


def stored(rollout: Rollout, steps: list[tuple[str, dict[str, Any]]], now_s: float) -> Rollout:
    """What ``load_rollout`` rebuilds from the store: the steps taken so far, a copy of the vehicles, the phase."""
    steps += rollout.take_changes()[1]
    return Rollout.resumed(
        rollout.rollout_id, rollout.plan, rollout.phase, copy.deepcopy(rollout.vehicles), steps, now_s
    )


@pytest.mark.parametrize("canary_rate", [Rate(5, 2.0), Rate(20, 2.0)], ids=["go on", "abort"])
def test_a_resumed_rollout_goes_on_as_the_uninterrupted_one(canary_rate: Rate) -> None:
    """Rebuilt from its steps and vehicles (observing, then mid-wave or mid-restore), it ends as the original."""
    plan = Plan({"stress": {"sustain_s": 5.0}}, canary_percent=30, wait_s=60, abort_rate_ratio=2.0, max_per_minute=60)
    original = Rollout("r7", plan, VEHICLES, 0.0)
    steps: list[tuple[str, dict[str, Any]]] = []
    now = run_until_quiet(original, 0.0, {})
    observing = stored(original, steps, now)
    assert phase(observing) == Phase.OBSERVING and observing.tick(now) != []  # the due measurement asked again
    original.rates(Rate(4, 2.0), canary_rate, Rate(28, 14.0), now)
    sends = original.tick(now)  # one request a second: one out, two of three left waiting
    assert len(sends) == 1
    resumed = stored(original, steps, now + 1.0)
    assert (resumed.phase, resumed.wave, resumed.abort_reason) == (original.phase, original.wave, original.abort_reason)
    for rollout in (original, resumed):
        for send in sends:
            assert isinstance(send, Send)
            rollout.answer(send.vehicle_id, send.request_id, True, [], now + 1.5)
        run_until_quiet(rollout, now + 2.0, {})
    assert phase(resumed) == phase(original) in (Phase.DONE, Phase.ABORTED)
    assert {v: p.state for v, p in resumed.vehicles.items()} == {v: p.state for v, p in original.vehicles.items()}
    assert resumed.take_changes()[1][0][0] == "resumed"


def test_pacing_does_not_depend_on_how_often_it_ticks() -> None:
    """At 64 a second and a tick every 0.25 s, 50 requests take 0.8 s; none are saved up while observing."""
    plan = Plan({"stress": {"sustain_s": 5.0}}, canary_percent=25, wait_s=30, max_per_minute=64 * 60)
    rollout = Rollout("r8", plan, [f"car-{i}" for i in range(200)], 0.0)
    assert [len(rollout.tick(i * 0.25)) for i in range(6)] == [1, 16, 16, 16, 1, 0]
    for vehicle, progress in rollout.vehicles.items():
        if progress.request_id is not None:
            rollout.answer(vehicle, progress.request_id, True, [], 1.25)
    rollout.tick(1.5)
    assert phase(rollout) == Phase.OBSERVING
    assert all(rollout.tick(i * 0.25) == [] for i in range(7, 126))  # observing until 31.5 s
    rollout.rates(Rate(1, 1.0), Rate(1, 1.0), Rate(1, 1.0), 31.5)
    assert [len(rollout.tick(31.5 + i * 0.25)) for i in range(3)] == [17, 16, 16]  # from the last tick on
