"""A rule type that ships nowhere: what a new rule needs is its own module (this one) and a registry entry.

``grin`` opens when the raw happiness reaches ``enter_score`` and closes when it falls below
``exit_score``; it exposes its score as the series ``grin.score``. Its config section is its own
(a new shipped rule would add it to ``config/rules.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import Field

from cabin_monitor.config import RulesConfig
from cabin_monitor.config.base import Number, Strict
from cabin_monitor.messages import Observation, Severity
from cabin_monitor.rules import Rule, Series, Threshold
from cabin_monitor.rules.base import Context, Verdict, group_score

GRIN = "grin"


class GrinRuleConfig(Strict):
    """A broad smile."""

    enabled: bool = Field(True, description="Whether the rule judges at all.")
    classes: tuple[str, ...] = Field(
        ("happiness",), min_length=1, description="Classes whose probabilities are summed."
    )
    enter_score: Number = Field(0.8, gt=0, le=1, description="Raw group score that opens the event.")
    exit_score: Number = Field(0.5, ge=0, lt=1, description="Raw group score below which it closes.")
    severity: Severity = Field("info", description="Severity of its events.")


@dataclass(slots=True)
class GrinState:
    """The latest raw score."""

    score: float | None = None


class GrinRule(Rule[GrinRuleConfig, GrinState]):
    """A broad smile, judged on each raw reading."""

    name = GRIN
    short_name = "grin"
    title = "grin"
    shade = "#2ca02c"
    series = (Series("grin.score", "grin score", "#17becf"),)
    thresholds = (Threshold("enter_score", opens=True), Threshold("exit_score", opens=False))

    def __init__(self, section: GrinRuleConfig | None = None) -> None:
        self._section = section or GrinRuleConfig()

    def section(self, config: RulesConfig) -> GrinRuleConfig:
        """Its own section, whatever ``config`` holds."""
        return self._section

    def new_state(self) -> GrinState:
        """No score yet."""
        return GrinState()

    def classes(self, section: GrinRuleConfig) -> tuple[str, ...]:
        """The classes summed into the score."""
        return section.classes

    def judge(self, section: GrinRuleConfig, state: GrinState, context: Context, observation: Observation) -> Verdict:
        """Open at enter_score, close below exit_score."""
        state.score = group_score(observation.emotions, section.classes)
        if context.is_open:
            return Verdict(state.score, closes=state.score < section.exit_score)
        return Verdict(state.score, opens=section.enabled and state.score >= section.enter_score)

    def values(
        self, section: GrinRuleConfig, state: GrinState, smoothed: Mapping[str, float]
    ) -> dict[str, float | None]:
        """The latest raw score."""
        return {"grin.score": state.score}
