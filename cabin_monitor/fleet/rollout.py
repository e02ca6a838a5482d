"""Roll-out decisions: a pure state machine fed the time, the vehicles' answers and alert rates; no I/O.

A roll-out sends one rules change to a canary group, then to the rest in waves, each ``config/set`` paced
to ``max_per_minute``. After the canary has answered it waits ``wait_s`` and asks for alert rates
(``MeasureRates``): the canary's after the change against its own before it and the rest's meanwhile. It
aborts, and restores every vehicle it may have changed, when

- (operational, like AWS IoT Jobs' abortConfig) at least ``min_answered`` vehicles have answered or timed
  out and more than ``max_failures_percent`` of them refused or gave no answer within ``answer_timeout_s``;
- (outcome) the canary's alert rate is above ``abort_rate_ratio`` times the larger of its own before and
  the rest's (at least ``rate_floor_per_hour``).

``fleet.rollout_run`` is the I/O loop around it: it publishes what ``tick`` asks for, feeds answers and
rates back, and stores every step. ``Rollout.resumed`` rebuilds a roll-out from what was stored (its steps and
its vehicles), so one whose process ended goes on where the store says it was.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal


class VehicleState(str, enum.Enum):
    """Where one vehicle is in the roll-out."""

    WAITING = "waiting"
    SENT = "sent"
    APPLIED = "applied"
    REFUSED = "refused"
    NO_ANSWER = "no_answer"
    RESTORING = "restoring"
    RESTORED = "restored"
    RESTORE_FAILED = "restore_failed"


ANSWERED = frozenset({VehicleState.APPLIED, VehicleState.REFUSED, VehicleState.NO_ANSWER})
MAY_HAVE_CHANGED = frozenset({VehicleState.SENT, VehicleState.APPLIED, VehicleState.NO_ANSWER})


class Phase(str, enum.Enum):
    """Where the roll-out is."""

    RUNNING = "running"
    OBSERVING = "observing"
    RESTORING = "restoring"
    DONE = "done"
    ABORTED = "aborted"


@dataclass(frozen=True, slots=True)
class Plan:
    """What to change, on whom first, how fast, and when to stop."""

    changes: dict[str, Any]
    canary_percent: float = 10.0
    waves: int = 3
    wait_s: float = 600.0
    answer_timeout_s: float = 60.0
    max_per_minute: float = 60.0
    abort_rate_ratio: float | None = None
    rate_floor_per_hour: float = 0.1
    max_failures_percent: float | None = None
    min_answered: int = 10


@dataclass(frozen=True, slots=True)
class Rate:
    """Alerts (event starts) over vehicle-hours (time the vehicles reported health)."""

    alerts: int
    vehicle_hours: float

    @property
    def per_hour(self) -> float:
        """Alerts per vehicle-hour; 0 without hours."""
        return self.alerts / self.vehicle_hours if self.vehicle_hours > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Send:
    """Publish a request to one vehicle: the change (``set``) or its undoing (``restore``)."""

    vehicle_id: str
    request_id: str
    kind: Literal["set", "restore"]


@dataclass(frozen=True, slots=True)
class MeasureRates:
    """Measure the canary's rate in ``before`` and ``after`` and the rest's in ``after`` (epoch-second spans)."""

    canary: tuple[str, ...]
    rest: tuple[str, ...]
    before: tuple[float, float]
    after: tuple[float, float]


Action = Send | MeasureRates


@dataclass
class VehicleProgress:
    """One vehicle's wave, state, request and answer."""

    wave: int
    state: VehicleState = VehicleState.WAITING
    request_id: str | None = None
    sent_s: float | None = None
    answered_s: float | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)


def plan_groups(vehicles: Sequence[str], canary_percent: float, waves: int) -> list[list[str]]:
    """The canary (``canary_percent`` of the vehicles, at least one) and then ``waves`` groups of the rest."""
    if not vehicles:
        return []
    canary_n = min(len(vehicles), max(1, math.ceil(len(vehicles) * canary_percent / 100.0)))
    canary, rest = list(vehicles[:canary_n]), list(vehicles[canary_n:])
    waves = max(1, min(waves, len(rest))) if rest else 0
    size = math.ceil(len(rest) / waves) if waves else 0
    return [canary] + [rest[i : i + size] for i in range(0, len(rest), size)] if rest else [canary]


class Rollout:
    """The decisions of one roll-out; ``tick``, ``answer`` and ``rates`` are its only inputs."""

    def __init__(self, rollout_id: str, plan: Plan, vehicles: Sequence[str], now_s: float) -> None:
        self.rollout_id = rollout_id
        self.plan = plan
        self.groups = plan_groups(list(dict.fromkeys(vehicles)), plan.canary_percent, plan.waves)
        self.vehicles = {v: VehicleProgress(wave) for wave, group in enumerate(self.groups) for v in group}
        self.phase = Phase.RUNNING if self.groups else Phase.DONE
        self.wave = 0
        self.abort_reason: str | None = None
        self.steps: list[tuple[str, dict[str, Any]]] = [("planned", {"groups": self.groups, "at_s": now_s})]
        self.changed: set[str] = set()
        self._next_send_s = now_s
        self._last_tick_s = now_s
        self._canary_started_s: float | None = None
        self._observe_until_s: float | None = None
        self._measuring = False
        self._restore_targets: list[str] = []

    @classmethod
    def resumed(
        cls,
        rollout_id: str,
        plan: Plan,
        phase: Phase,
        vehicles: dict[str, VehicleProgress],
        steps: Sequence[tuple[str, dict[str, Any]]],
        now_s: float,
    ) -> Rollout:
        """The roll-out its stored ``phase``, ``vehicles`` and ``steps`` describe, going on at ``now_s``.

        The groups and the canary's start come from the ``planned`` step, the wave from the last ``wave
        started``, the end of the canary's observation from ``observing canary``, what to restore from
        ``aborting``; an observation that was due is measured again.
        """
        planned = next((detail for name, detail in steps if name == "planned"), None)
        if planned is None:
            raise ValueError(f"roll-out {rollout_id!r} has no 'planned' step")
        machine = cls(rollout_id, plan, [], planned["at_s"])
        machine.groups = [list(group) for group in planned["groups"]]
        machine.vehicles = vehicles
        machine.phase = phase
        machine._canary_started_s = planned["at_s"]
        machine._next_send_s = machine._last_tick_s = now_s
        for name, detail in steps:
            if name == "wave started":
                machine.wave = detail["wave"]
            elif name == "observing canary":
                machine._observe_until_s = detail["until_s"]
            elif name == "aborting":
                machine.abort_reason, machine._restore_targets = detail["reason"], list(detail["restoring"])
        machine.steps = [("resumed", {"at_s": now_s, "phase": phase.value, "wave": machine.wave, **machine.counts()})]
        return machine

    # -- inputs --

    def tick(self, now_s: float) -> list[Action]:
        """What to do now: requests to send (paced), or rates to measure."""
        actions: list[Action] = []
        if self.phase == Phase.RUNNING:
            actions = self._run_wave(now_s)
        elif self.phase == Phase.OBSERVING:
            actions = self._observe(now_s)
        elif self.phase == Phase.RESTORING:
            actions = self._restore(now_s)
        self._last_tick_s = now_s
        return actions

    def answer(
        self, vehicle_id: str, request_id: str | None, ok: bool, errors: list[dict[str, Any]], now_s: float
    ) -> None:
        """A ``config/result`` of one of this roll-out's requests (others are ignored)."""
        progress = self.vehicles.get(vehicle_id)
        if progress is None or request_id is None or request_id != progress.request_id:
            return
        if progress.state == VehicleState.SENT:
            progress.state = VehicleState.APPLIED if ok else VehicleState.REFUSED
        elif progress.state == VehicleState.NO_ANSWER and ok:
            progress.state = VehicleState.APPLIED  # late, still counted as applied: it must be restored on abort
        elif progress.state == VehicleState.RESTORING:
            progress.state = VehicleState.RESTORED if ok else VehicleState.RESTORE_FAILED
        else:
            return
        progress.answered_s, progress.errors = now_s, errors
        self.changed.add(vehicle_id)

    def rates(self, canary_before: Rate, canary_after: Rate, rest: Rate, now_s: float) -> None:
        """The rates ``MeasureRates`` asked for: go on with the waves, or abort."""
        if self.phase != Phase.OBSERVING:
            return
        reference = max(canary_before.per_hour, rest.per_hour, self.plan.rate_floor_per_hour)
        detail = {
            "canary_before": _rate_detail(canary_before),
            "canary_after": _rate_detail(canary_after),
            "rest": _rate_detail(rest),
            "reference_per_hour": reference,
            "abort_rate_ratio": self.plan.abort_rate_ratio,
        }
        ratio = self.plan.abort_rate_ratio
        if ratio is not None and canary_after.per_hour > ratio * reference:
            self.steps.append(("rates", {**detail, "decision": "abort"}))
            self._abort(
                f"outcome: canary alert rate {canary_after.per_hour:.3g}/h > {ratio} x {reference:.3g}/h", now_s
            )
            return
        self.steps.append(("rates", {**detail, "decision": "go on"}))
        self._next_wave(now_s)

    # -- phases --

    def _run_wave(self, now_s: float) -> list[Action]:
        group = self.groups[self.wave]
        if self._canary_started_s is None:
            self._canary_started_s = now_s
        actions: list[Action] = self._paced(group, VehicleState.WAITING, "set", now_s)
        self._time_out(group, VehicleState.SENT, VehicleState.NO_ANSWER, now_s)
        if (reason := self._operational_abort()) is not None:
            self._abort(reason, now_s)
            return actions
        if all(self.vehicles[v].state in ANSWERED for v in group):
            self.steps.append(("wave answered", {"wave": self.wave, **self.counts(group)}))
            if self.wave == 0 and len(self.groups) > 1:
                self.phase = Phase.OBSERVING
                self._observe_until_s = now_s + self.plan.wait_s
                self.steps.append(("observing canary", {"until_s": self._observe_until_s}))
            else:
                self._next_wave(now_s)
        return actions

    def _observe(self, now_s: float) -> list[Action]:
        assert self._observe_until_s is not None and self._canary_started_s is not None
        if self._measuring or now_s < self._observe_until_s:
            return []
        self._measuring = True
        applied_s = max(p.answered_s or 0.0 for v in self.groups[0] if (p := self.vehicles[v]))
        rest = tuple(v for group in self.groups[1:] for v in group)
        before = (self._canary_started_s - self.plan.wait_s, self._canary_started_s)
        return [MeasureRates(tuple(self.groups[0]), rest, before, (max(applied_s, self._canary_started_s), now_s))]

    def _next_wave(self, now_s: float) -> None:
        self.wave += 1
        if self.wave >= len(self.groups):
            self.phase = Phase.DONE
            self.steps.append(("done", {"at_s": now_s, **self.counts()}))
        else:
            self.phase = Phase.RUNNING
            self.steps.append(("wave started", {"wave": self.wave, "vehicles": len(self.groups[self.wave])}))

    def _abort(self, reason: str, now_s: float) -> None:
        self.abort_reason = reason
        self.phase = Phase.RESTORING
        targets = [v for v, p in self.vehicles.items() if p.state in MAY_HAVE_CHANGED]
        self.steps.append(("aborting", {"reason": reason, "at_s": now_s, "restoring": targets, **self.counts()}))
        for v in targets:
            self.vehicles[v].state = VehicleState.WAITING
            self.changed.add(v)
        self._restore_targets = targets

    def _restore(self, now_s: float) -> list[Action]:
        targets = self._restore_targets
        actions: list[Action] = self._paced(targets, VehicleState.WAITING, "restore", now_s)
        self._time_out(targets, VehicleState.RESTORING, VehicleState.RESTORE_FAILED, now_s)
        final = (VehicleState.RESTORED, VehicleState.RESTORE_FAILED)
        if all(self.vehicles[v].state in final for v in targets):
            self.phase = Phase.ABORTED
            self.steps.append(("aborted", {"reason": self.abort_reason, "at_s": now_s, **self.counts(targets)}))
        return actions

    # -- pieces --

    def _paced(
        self, group: Sequence[str], waiting: VehicleState, kind: Literal["set", "restore"], now_s: float
    ) -> list[Action]:
        interval_s = 60.0 / self.plan.max_per_minute
        # Requests due since the last tick go now; none are saved up over a quiet spell (observing, say).
        self._next_send_s = max(self._next_send_s, self._last_tick_s)
        sends: list[Action] = []
        for v in group:
            progress = self.vehicles[v]
            if progress.state != waiting:
                continue
            if now_s < self._next_send_s:
                break
            self._next_send_s += interval_s
            progress.request_id = f"{self.rollout_id}/{kind}/{v}"
            progress.state = VehicleState.SENT if kind == "set" else VehicleState.RESTORING
            progress.sent_s, progress.answered_s, progress.errors = now_s, None, []
            self.changed.add(v)
            sends.append(Send(v, progress.request_id, kind))
        return sends

    def _time_out(self, group: Sequence[str], sent: VehicleState, timed_out: VehicleState, now_s: float) -> None:
        for v in group:
            p = self.vehicles[v]
            if p.state == sent and p.sent_s is not None and now_s - p.sent_s >= self.plan.answer_timeout_s:
                p.state = timed_out
                self.changed.add(v)

    def _operational_abort(self) -> str | None:
        if self.plan.max_failures_percent is None:
            return None
        states = [p.state for p in self.vehicles.values()]
        answered = sum(s in ANSWERED for s in states)
        failed = sum(s in (VehicleState.REFUSED, VehicleState.NO_ANSWER) for s in states)
        if answered >= self.plan.min_answered and failed * 100.0 > self.plan.max_failures_percent * answered:
            return f"operational: {failed} of {answered} answered refused or gave no answer"
        return None

    def counts(self, group: Sequence[str] | None = None) -> dict[str, int]:
        """Vehicles per state (of ``group``, or of all)."""
        names = self.vehicles if group is None else group
        counts: dict[str, int] = {}
        for v in names:
            state = self.vehicles[v].state.value
            counts[state] = counts.get(state, 0) + 1
        return counts

    def take_changes(self) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
        """Vehicles changed and steps taken since the last call, for the store."""
        changed, self.changed = sorted(self.changed), set()
        steps, self.steps = self.steps, []
        return changed, steps


def _rate_detail(rate: Rate) -> dict[str, float]:
    return {"alerts": rate.alerts, "vehicle_hours": rate.vehicle_hours, "per_hour": rate.per_hour}
