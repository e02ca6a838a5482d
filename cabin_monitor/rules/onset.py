"""The ``unexpected_expression`` rule: a sudden, strong onset against the occupant's own recent baseline.

It opens when a fast average of the raw group score (the sum of ``rules.unexpected_expression.classes``)
rises well above a slow baseline, and closes when the fast average falls below ``exit_score`` or
after ``max_duration_s``. The baseline learns each raw sample three onset time constants late,
stands still while an onset is open and throws away the samples of the onset, so it never learns
an onset; changing the classes restarts every occupant's history. An absent occupant's onset ends;
its history stays.

May import ``config``, ``messages`` and ``rules.base``; no I/O.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from cabin_monitor.config import RulesConfig, UnexpectedExpressionRuleConfig
from cabin_monitor.messages import Observation
from cabin_monitor.rules.base import Context, Rule, Series, Threshold, Verdict, ema_alpha, group_score

# The baseline learns each sample this many onset time constants late: by then the fast average
# has answered a real onset (95 % of a step), so the samples of the onset are still waiting when
# the event opens and are thrown away instead of learnt.
_BASELINE_DELAY_TAUS = 3.0


@dataclass(slots=True)
class _History:
    first_s: float  # start of this occupant's history
    last_s: float
    fast: float
    baseline: float
    pending: deque[tuple[float, float]]  # (time, raw group score) the baseline has yet to learn


@dataclass(slots=True)
class OnsetState:
    """One occupant's averages; no history until the rule first judges it (again, after a restart)."""

    history: _History | None = field(default=None)


class OnsetRule(Rule[UnexpectedExpressionRuleConfig, OnsetState]):
    """A sudden, strong expression onset."""

    name = "unexpected_expression"
    short_name = "onset"
    title = "unexpected expression"
    shade = "#9467bd"
    series = (
        Series("unexpected_expression.fast", "fast average", "#9467bd"),
        Series("unexpected_expression.baseline", "baseline", "#555555"),
        # The fast average opens an event only above this (and above min_score).
        Series("unexpected_expression.rise_level", "baseline + min_rise", "#8c564b", dashed=True),
    )
    thresholds = (Threshold("min_score", opens=True), Threshold("exit_score", opens=False))

    def section(self, config: RulesConfig) -> UnexpectedExpressionRuleConfig:
        """``rules.unexpected_expression``."""
        return config.unexpected_expression

    def new_state(self) -> OnsetState:
        """No history."""
        return OnsetState()

    def classes(self, section: UnexpectedExpressionRuleConfig) -> tuple[str, ...]:
        """The classes summed into the score."""
        return section.classes

    def restarts(self, old: UnexpectedExpressionRuleConfig, new: UnexpectedExpressionRuleConfig) -> bool:
        """Averages of other classes are no history of these: learn afresh."""
        return old.classes != new.classes

    def judge(
        self, section: UnexpectedExpressionRuleConfig, state: OnsetState, context: Context, observation: Observation
    ) -> Verdict | None:
        """Update the averages with the raw score, then compare the fast one with the baseline."""
        if not section.enabled:
            state.history = None  # re-enabled, it builds a fresh history
            return None
        raw = group_score(observation.emotions, section.classes)
        history = _learn(section, state, context.now_s, raw, frozen=context.is_open)
        opened_s = context.open_since_s
        if opened_s is None:
            if (
                context.now_s - history.first_s >= section.min_history_s
                and history.fast >= section.min_score
                and history.fast - history.baseline >= section.min_rise
                and not context.cooling(section.cooldown_s)
            ):
                history.pending.clear()  # these samples are the onset itself: never learn them
                return Verdict(history.fast, opens=True)
            return None
        ended = history.fast < section.exit_score or context.now_s - opened_s >= section.max_duration_s
        return Verdict(history.fast, closes=ended)

    def absent(self, section: UnexpectedExpressionRuleConfig, state: OnsetState, context: Context) -> Verdict | None:
        """Nothing can be judged without a face: end what was open."""
        return Verdict(closes=True) if context.is_open else None

    def values(
        self, section: UnexpectedExpressionRuleConfig, state: OnsetState, smoothed: Mapping[str, float]
    ) -> dict[str, float | None]:
        """The fast average, the baseline and the level the rise must reach; None while there is no history."""
        history = state.history
        return {
            "unexpected_expression.fast": None if history is None else history.fast,
            "unexpected_expression.baseline": None if history is None else history.baseline,
            "unexpected_expression.rise_level": None if history is None else history.baseline + section.min_rise,
        }


def _learn(
    section: UnexpectedExpressionRuleConfig, state: OnsetState, now_s: float, raw: float, frozen: bool
) -> _History:
    """Add one raw sample to the fast average, and to the baseline unless it is ``frozen`` (an onset is open)."""
    history = state.history
    if history is None:
        history = _History(first_s=now_s, last_s=now_s, fast=raw, baseline=raw, pending=deque([(now_s, raw)]))
        state.history = history
        return history
    dt = now_s - history.last_s
    history.last_s = now_s
    history.fast += ema_alpha(dt, section.onset_window_s) * (raw - history.fast)
    if not frozen:
        history.pending.append((now_s, raw))
        learn_before_s = now_s - _BASELINE_DELAY_TAUS * section.onset_window_s
        while len(history.pending) > 1 and history.pending[1][0] <= learn_before_s:
            history.pending.popleft()
        history.baseline += ema_alpha(dt, section.baseline_window_s) * (history.pending[0][1] - history.baseline)
    return history
