"""The ``occupant_lost`` rule: a tracked face that has gone.

It opens when an occupant has been unseen for ``lost_after_s`` and closes when the occupant is
seen again; its score is the number of seconds the occupant has been unseen. It needs no emotion
class and exposes no series: timelines shade its events on the "in view" strip.

May import ``config`` and ``rules.base``; no I/O.
"""

from __future__ import annotations

from cabin_monitor.config import OccupantLostRuleConfig, RulesConfig
from cabin_monitor.rules.base import Context, Rule, Verdict


class LostRule(Rule[OccupantLostRuleConfig, None]):
    """A tracked face that has gone."""

    name = "occupant_lost"
    short_name = "lost"

    def section(self, config: RulesConfig) -> OccupantLostRuleConfig:
        """``rules.occupant_lost``."""
        return config.occupant_lost

    def new_state(self) -> None:
        """Nothing to keep: the engine knows when the occupant was last seen."""
        return None

    def seen(self, section: OccupantLostRuleConfig, state: None, context: Context) -> Verdict | None:
        """Found again: the event ends, scored with how long the occupant was away."""
        return Verdict(context.unseen_s, closes=True) if context.is_open else None

    def absent(self, section: OccupantLostRuleConfig, state: None, context: Context) -> Verdict | None:
        """Lost: the event opens (once), its score follows the time unseen."""
        return Verdict(context.unseen_s, opens=section.enabled)
