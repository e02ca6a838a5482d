"""The rules: the engine (a pure state machine from observations to events), one small object per rule
type (``stress``, ``onset``, ``lost``, listed in ``registry``) and the rules in force.

May import ``config``, ``messages`` and ``errors``; never a bus, vision or runtime module, and no I/O
outside the persistence of the rules in force.
"""

from cabin_monitor.rules.base import Rule, Series, Threshold
from cabin_monitor.rules.engine import (
    FORGET_AFTER_S,
    ClassMismatchError,
    OccupantState,
    RulesEngine,
    check_classes,
)
from cabin_monitor.rules.registry import LOST, ONSET, RULE_NAMES, RULES, STRESS

__all__ = [
    "FORGET_AFTER_S",
    "LOST",
    "ONSET",
    "RULES",
    "RULE_NAMES",
    "STRESS",
    "ClassMismatchError",
    "OccupantState",
    "Rule",
    "RulesEngine",
    "Series",
    "Threshold",
    "check_classes",
]
