"""The ``stress`` rule: sustained negative emotion, with hysteresis.

It opens when the smoothed group score (the sum of ``rules.stress.classes``) has stayed at or
above ``enter_score`` for ``sustain_s``, and closes when it has stayed below ``exit_score`` for
``release_s``. An absent occupant's stress ends, and sustains afresh on its return.

May import ``config``, ``messages`` and ``rules.base``; no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cabin_monitor.config import RulesConfig, StressRuleConfig
from cabin_monitor.messages import Observation
from cabin_monitor.rules.base import Context, Rule, Series, Threshold, Verdict, group_score


@dataclass(slots=True)
class StressState:
    """One occupant's sustain and release timers."""

    above_since_s: float | None = None  # score >= enter_score since
    below_since_s: float | None = None  # score < exit_score since, while open

    def reset(self) -> None:
        """Forget both timers."""
        self.above_since_s = self.below_since_s = None


class StressRule(Rule[StressRuleConfig, StressState]):
    """Sustained negative emotion."""

    name = "stress"
    short_name = "stress"
    title = "stress"
    shade = "#d62728"
    series = (Series("stress.score", "stress score", "#1f77b4"),)
    thresholds = (Threshold("enter_score", opens=True), Threshold("exit_score", opens=False))

    def section(self, config: RulesConfig) -> StressRuleConfig:
        """``rules.stress``."""
        return config.stress

    def new_state(self) -> StressState:
        """No timer running."""
        return StressState()

    def classes(self, section: StressRuleConfig) -> tuple[str, ...]:
        """The classes summed into the score."""
        return section.classes

    def judge(
        self, section: StressRuleConfig, state: StressState, context: Context, observation: Observation
    ) -> Verdict | None:
        """Run the sustain timer while closed and the release timer while open."""
        if not section.enabled:
            state.reset()
            return None
        now_s = context.now_s
        score = group_score(context.smoothed, section.classes)
        if not context.is_open:
            # A dip below enter_score restarts the sustain timer.
            if score < section.enter_score:
                state.above_since_s = None
            elif state.above_since_s is None:
                state.above_since_s = now_s
            if (
                state.above_since_s is not None
                and now_s - state.above_since_s >= section.sustain_s
                and not context.cooling(section.cooldown_s)
            ):
                state.below_since_s = None
                return Verdict(score, opens=True)
            return None
        # Hysteresis: only a score below exit_score counts towards closing.
        if score >= section.exit_score:
            state.below_since_s = None
        elif state.below_since_s is None:
            state.below_since_s = now_s
        if state.below_since_s is not None and now_s - state.below_since_s >= section.release_s:
            state.reset()
            return Verdict(score, closes=True)
        return Verdict(score)

    def absent(self, section: StressRuleConfig, state: StressState, context: Context) -> Verdict | None:
        """Nothing can be judged without a face: end what was open, and sustain afresh on return."""
        state.reset()
        return Verdict(closes=True) if context.is_open else None

    def values(
        self, section: StressRuleConfig, state: StressState, smoothed: Mapping[str, float]
    ) -> dict[str, float | None]:
        """The smoothed group score; None while the rule is off."""
        return {"stress.score": group_score(smoothed, section.classes) if section.enabled else None}
