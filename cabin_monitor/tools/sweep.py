"""Threshold sweeps for ``replay --sweep``: the values to try, the alert rate each gives, the value meeting a target.

A sweep is one rules path over ``START:STOP:STEP`` (or two paths: every pair). Each value becomes one more
rule choice of the replay, so the recordings are read once for all of them. The rate judged is the alerts of
the swept rules (all rules when a path names none) per vehicle-hour of recording.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cabin_monitor.config import deep_merge
from cabin_monitor.errors import ConfigurationError
from cabin_monitor.record.replay import RulesChoice, Summary, Tally
from cabin_monitor.rules import RULE_NAMES

MAX_POINTS = 1000
WORST_VEHICLES = 3
Value = int | float


@dataclass(frozen=True, slots=True)
class Axis:
    """One swept rules path and its values, in order."""

    path: str
    values: tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class Point:
    """One value per axis: ``((path, value), ...)``."""

    values: tuple[tuple[str, Value], ...]

    def patch(self) -> dict[str, Any]:
        """The partial rules mapping that sets these values."""
        patch: dict[str, Any] = {}
        for path, value in self.values:
            node: Any = value
            for part in reversed(path.split(".")[1:]):
                node = {part: node}
            patch = deep_merge(patch, node)
        return patch

    def label(self) -> str:
        """``rules.stress.enter_score=0.7`` (comma-separated for two paths)."""
        return ", ".join(f"{path}={value!r}" for path, value in self.values)

    def as_json(self) -> dict[str, Any]:
        """``{"value": v}`` for one path, ``{"values": {path: v, ...}}`` for two."""
        if len(self.values) == 1:
            return {"value": self.values[0][1]}
        return {"values": dict(self.values)}

    def rollout_command(self) -> str:
        """The fleet command that pushes these values to every vehicle."""
        sets = " ".join(f"--set {path}={value!r}" for path, value in self.values)
        return f"cabin-monitor fleet rollout --all {sets}"


def parse_axis(text: str) -> Axis:
    """``rules.stress.enter_score=0.5:0.9:0.05`` -> the path and every value from START to STOP (inclusive)."""
    path, sep, spec = text.partition("=")
    parts = spec.split(":")
    if not sep or len(parts) != 3:
        raise ConfigurationError(
            f"--sweep {text!r}: expected PATH=START:STOP:STEP, e.g. rules.stress.enter_score=0.5:0.9:0.1"
        )
    keys = path.strip().split(".")
    if len(keys) < 2 or keys[0] != "rules" or not all(keys):
        raise ConfigurationError(f"--sweep {text!r}: the path is rules.<key>..., e.g. rules.stress.enter_score")
    integral = all(_is_int(p) for p in parts)
    try:
        start, stop, step = (int(p) if integral else float(p) for p in parts)
    except ValueError:
        raise ConfigurationError(f"--sweep {text!r}: START, STOP and STEP must be numbers") from None
    if step <= 0 or stop < start:
        raise ConfigurationError(f"--sweep {text!r}: needs STEP > 0 and STOP >= START")
    count = math.floor((stop - start) / step + 1e-9) + 1
    if count > MAX_POINTS:
        raise ConfigurationError(f"--sweep {text!r}: {count} values, at most {MAX_POINTS}")
    values = tuple(start + i * step if integral else round(start + i * step, 10) for i in range(count))
    return Axis(path.strip(), values)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def grid(axes: Sequence[Axis]) -> list[Point]:
    """Every combination of the axes' values, the first axis slowest."""
    if not 1 <= len(axes) <= 2:
        raise ConfigurationError("--sweep takes one path, or two for a grid")
    if len(axes) == 2 and axes[0].path == axes[1].path:
        raise ConfigurationError(f"--sweep: {axes[0].path} given twice")
    combos = itertools.product(*(axis.values for axis in axes))
    points = [Point(tuple(zip((a.path for a in axes), combo, strict=True))) for combo in combos]
    if len(points) > MAX_POINTS:
        raise ConfigurationError(f"--sweep: {len(points)} combinations, at most {MAX_POINTS}")
    return points


def choices(base: RulesChoice, points: Sequence[Point]) -> list[RulesChoice]:
    """One rule choice per point: ``base`` (its rules, its ``--set`` patch) with the point's values on top."""
    return [RulesChoice(base.base, deep_merge(dict(base.patch), point.patch())) for point in points]


def judged_rules(axes: Sequence[Axis]) -> tuple[str, ...]:
    """The rules whose alerts a sweep counts: those its paths name, or all when a path names none."""
    named = {axis.path.split(".")[1] for axis in axes}
    return tuple(r for r in RULE_NAMES if r in named) if named <= set(RULE_NAMES) else tuple(RULE_NAMES)


def rate(tally: Tally, rules: Sequence[str]) -> float:
    """Alerts of ``rules`` per hour of the tally's time (per vehicle-hour for a fleet's overall tally)."""
    return sum(tally.count.get(r, 0) for r in rules) * 3600.0 / tally.seconds if tally.seconds > 0 else 0.0


def pick(rates: Sequence[float], target: float) -> int | None:
    """The point meeting ``target`` (rate at or under it) with the most alerts left; of equals, the one
    nearest a point that misses the target (the least strict). None when no point meets it."""
    meeting = [i for i, r in enumerate(rates) if r <= target]
    if not meeting:
        return None
    best = max(rates[i] for i in meeting)
    missing = [i for i, r in enumerate(rates) if r > target]
    tied = [i for i in meeting if rates[i] == best]
    return min(tied, key=lambda i: min((abs(i - m) for m in missing), default=0))


@dataclass(frozen=True, slots=True)
class SweepResult:
    """A sweep's points with their summaries, and the point chosen for a target rate."""

    points: list[Point]
    summaries: list[Summary]
    rules: tuple[str, ...]
    target: float | None = None

    def rates(self) -> list[float]:
        """The fleet's rate at each point."""
        return [rate(s.overall, self.rules) for s in self.summaries]

    def chosen(self) -> int | None:
        """The index of the point meeting the target, if one is set and met."""
        return None if self.target is None else pick(self.rates(), self.target)

    def as_json(self) -> dict[str, Any]:
        """``sweep`` (per point: its value(s), the overall block, the rate) and ``target``."""
        rates = self.rates()
        document: dict[str, Any] = {
            "sweep": [
                {**p.as_json(), "overall": s.overall.as_json(), "alerts_per_vehicle_hour": r}
                for p, s, r in zip(self.points, self.summaries, rates, strict=True)
            ]
        }
        if self.target is not None:
            chosen = self.chosen()
            document["target"] = {
                "alerts_per_vehicle_hour": self.target,
                "met_by": None if chosen is None else self.points[chosen].as_json(),
                "command": None if chosen is None else self.points[chosen].rollout_command(),
            }
        return document

    def table(self) -> str:
        """Per point: the fleet's alerts per vehicle-hour and the worst vehicles'."""
        rows = [["", "vehicle-hours", f"{'+'.join(self.rules)} alerts per vehicle-hour", "worst vehicles"]]
        for point, summary, fleet_rate in zip(self.points, self.summaries, self.rates(), strict=True):
            worst = sorted(summary.vehicles.items(), key=lambda kv: (-rate(kv[1], self.rules), kv[0]))
            rows.append(
                [
                    point.label(),
                    f"{summary.overall.seconds / 3600:.2f}",
                    f"{fleet_rate:.3f}",
                    ", ".join(f"{v} {rate(t, self.rules):.2f}" for v, t in worst[:WORST_VEHICLES]),
                ]
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join(
            "   ".join(
                c.ljust(w) if i in (0, 3) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
            for row in rows
        )

    def verdict(self) -> str | None:
        """The line naming the point that meets the target and the command that rolls it out."""
        if self.target is None:
            return None
        chosen = self.chosen()
        if chosen is None:
            return f"no swept value meets {self.target:g} alerts per vehicle-hour"
        point = self.points[chosen]
        return (
            f"{point.label()} meets {self.target:g} alerts per vehicle-hour ({self.rates()[chosen]:.3f}); "
            f"to roll it out:\n  {point.rollout_command()}"
        )
