"""Every rule type the engine runs, in the order their events and counts are listed.

Adding a rule type: its module (a ``rules.base.Rule``), its config section (``config/rules.py``), one
entry in ``RULES``, and its tests. May import ``rules.base`` and the rule modules only.
"""

from __future__ import annotations

from typing import Any

from cabin_monitor.rules.base import Rule
from cabin_monitor.rules.lost import LostRule
from cabin_monitor.rules.onset import OnsetRule
from cabin_monitor.rules.stress import StressRule

RULES: tuple[Rule[Any, Any], ...] = (StressRule(), OnsetRule(), LostRule())

STRESS = StressRule.name
ONSET = OnsetRule.name
LOST = LostRule.name
RULE_NAMES = tuple(rule.name for rule in RULES)
