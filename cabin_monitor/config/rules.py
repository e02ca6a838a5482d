"""The ``rules`` section: the anomaly rules, which operators also change over MQTT."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field, model_validator

from cabin_monitor.config.base import Number, Strict
from cabin_monitor.messages import Severity

EMOTIONS_7 = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger")
NEGATIVE_7 = ("sadness", "anger", "fear", "disgust")


def _distinct(names: tuple[str, ...]) -> tuple[str, ...]:
    # A class named twice would count its probability twice: a score could exceed 1.
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"names a class more than once: {', '.join(twice)}")
    return names


ClassNames = Annotated[tuple[str, ...], AfterValidator(_distinct)]
Enabled = Annotated[bool, Field(strict=True, description="Whether the rule runs (a JSON/YAML boolean only).")]


class StressRuleConfig(Strict):
    """Sustained negative emotion."""

    enabled: Enabled = True
    classes: ClassNames = Field(NEGATIVE_7, min_length=1, description="Classes whose probabilities are summed.")
    enter_score: Number = Field(0.6, gt=0, le=1, description="Smoothed group score that opens the event...")
    sustain_s: Number = Field(3.0, ge=0, le=600, description="...when held at or above it for this long.")
    exit_score: Number = Field(0.4, ge=0, lt=1, description="Score below which the event may close...")
    release_s: Number = Field(1.5, ge=0, le=600, description="...once it has stayed below for this long.")
    cooldown_s: Number = Field(30.0, ge=0, le=86400, description="No new stress event this soon after one ended.")
    severity: Severity = "warning"

    @model_validator(mode="after")
    def _hysteresis(self) -> StressRuleConfig:
        if self.exit_score >= self.enter_score:
            raise ValueError(f"exit_score ({self.exit_score}) must be below enter_score ({self.enter_score})")
        return self


class UnexpectedExpressionRuleConfig(Strict):
    """A sudden, strong expression onset against the occupant's own recent baseline."""

    enabled: Enabled = True
    classes: ClassNames = Field(
        ("fear", "surprise", "anger", "disgust"), min_length=1, description="Classes whose probabilities are summed."
    )
    onset_window_s: Number = Field(0.5, gt=0, le=10, description="Time constant of the fast average.")
    baseline_window_s: Number = Field(20.0, gt=0, le=3600, description="Time constant of the slow baseline.")
    min_history_s: Number = Field(3.0, ge=0, le=3600, description="Baseline needs this much history first.")
    min_score: Number = Field(0.5, gt=0, le=1, description="Fast average must reach this...")
    min_rise: Number = Field(0.3, gt=0, le=1, description="...and exceed the baseline by this much.")
    exit_score: Number = Field(0.3, ge=0, lt=1, description="Event closes when the fast average falls below this.")
    max_duration_s: Number = Field(10.0, gt=0, le=3600, description="An onset event closes after this long at most.")
    cooldown_s: Number = Field(10.0, ge=0, le=86400, description="No new onset event this soon after one ended.")
    severity: Severity = "warning"

    @model_validator(mode="after")
    def _window_order(self) -> UnexpectedExpressionRuleConfig:
        if self.baseline_window_s <= self.onset_window_s:
            raise ValueError("baseline_window_s must be longer than onset_window_s")
        if self.exit_score >= self.min_score:
            raise ValueError(f"exit_score ({self.exit_score}) must be below min_score ({self.min_score})")
        return self


class OccupantLostRuleConfig(Strict):
    """A tracked face that has gone."""

    enabled: Enabled = True
    lost_after_s: Number = Field(3.0, gt=0, le=3600, description="Unseen this long opens the event.")
    severity: Severity = "info"


class RulesConfig(Strict):
    """The anomaly rules; fleet operators tune these (also over MQTT config/set)."""

    smoothing_s: Number = Field(
        0.7, ge=0, le=60, description="Time constant of the per-occupant probability smoothing; 0 = none."
    )
    stress: StressRuleConfig = StressRuleConfig()
    unexpected_expression: UnexpectedExpressionRuleConfig = UnexpectedExpressionRuleConfig()
    occupant_lost: OccupantLostRuleConfig = OccupantLostRuleConfig()
