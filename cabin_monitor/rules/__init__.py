"""The rules: the engine (a pure state machine from readings to events) and the rules in force.

May import ``config``, ``messages`` and ``errors``; never a bus, vision or runtime module, and no I/O
outside the persistence of the rules in force.
"""

from cabin_monitor.rules.engine import (
    FORGET_AFTER_S,
    LOST,
    ONSET,
    RULE_NAMES,
    STRESS,
    ClassMismatchError,
    OccupantState,
    RulesEngine,
    check_classes,
)

__all__ = [
    "FORGET_AFTER_S",
    "LOST",
    "ONSET",
    "RULE_NAMES",
    "STRESS",
    "ClassMismatchError",
    "OccupantState",
    "RulesEngine",
    "check_classes",
]
