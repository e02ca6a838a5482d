"""What a rule is to the engine: its hooks, what it tells the engine back, and what it exposes for timelines.

A rule type is one subclass of ``Rule``, in its own module, listed in ``rules.registry``. It owns its
config section (a model in ``config/rules.py``), its per-occupant state, its score(s), when its event
opens and closes, the emotion classes it needs, and the series it exposes with the thresholds drawn
against them. The engine owns everything the rules share: occupants, smoothing, event ids, cooldown
bookkeeping, absence and forgetting.

May import ``config`` and ``messages``; no I/O.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Generic, Protocol, TypeVar

from cabin_monitor.config import RulesConfig
from cabin_monitor.messages import Observation, Severity


class RuleSection(Protocol):
    """What the engine reads of every rule's config section."""

    @property
    def enabled(self) -> bool:
        """Whether the rule judges at all; disabling it ends its open events."""

    @property
    def severity(self) -> Severity:
        """The severity of its events."""


@dataclass(frozen=True, slots=True)
class Context:
    """One occupant at one moment, as one rule's hook sees it."""

    now_s: float  # monotonic time of the reading, or of the update that found the occupant unseen
    smoothed: Mapping[str, float]  # the occupant's smoothed probabilities
    unseen_s: float  # seconds since the occupant's previous reading (``seen``) or its latest one (``absent``)
    open_since_s: float | None = None  # when this rule's open event for the occupant started; None: none open
    ended_s: float | None = None  # when this rule's latest event for the occupant ended

    @property
    def is_open(self) -> bool:
        """Whether this rule has an open event for the occupant."""
        return self.open_since_s is not None

    def cooling(self, cooldown_s: float) -> bool:
        """Whether this rule's latest event for the occupant ended less than ``cooldown_s`` ago."""
        return self.ended_s is not None and self.now_s - self.ended_s < cooldown_s


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a hook decides. ``opens`` counts only without an open event, ``closes`` only with one."""

    score: float | None = None  # the rule's score now: a start carries it, an open event keeps it for its end
    opens: bool = False
    closes: bool = False


@dataclass(frozen=True, slots=True)
class Series:
    """A value a rule exposes per occupant (``OccupantState.series``, replay traces, report timelines)."""

    key: str  # "<rule>.<value>", e.g. "stress.score"
    label: str  # legend text
    color: str  # line colour in the timelines
    dashed: bool = False  # a level the score is compared with (drawn dashed), not a score


@dataclass(frozen=True, slots=True)
class Threshold:
    """A field of the rule's config section drawn against its series."""

    field: str  # e.g. "enter_score"
    opens: bool  # True: the threshold an event opens at; False: the one it closes at


SectionT = TypeVar("SectionT", bound=RuleSection)
StateT = TypeVar("StateT")


class Rule(ABC, Generic[SectionT, StateT]):
    """One rule type: stateless itself, it keeps each occupant's state in the object ``new_state`` makes.

    For every reading the engine calls each rule's ``seen`` and then each rule's ``judge``; for every
    update in which an occupant has been unseen for ``rules.occupant_lost.lost_after_s`` it calls each
    rule's ``absent``. A hook returns ``None`` when it has nothing to say.
    """

    name: ClassVar[str]  # the event type and the name of its config section
    short_name: ClassVar[str]  # a word for counts in titles, e.g. "onset"
    title: ClassVar[str] = ""  # the label of its timeline panel
    shade: ClassVar[str] = "#7f7f7f"  # the colour of its events in timelines
    series: ClassVar[tuple[Series, ...]] = ()  # with none, its events shade the "in view" strip
    thresholds: ClassVar[tuple[Threshold, ...]] = ()

    @abstractmethod
    def section(self, config: RulesConfig) -> SectionT:
        """This rule's section of ``config``."""

    @abstractmethod
    def new_state(self) -> StateT:
        """The state of an occupant the rule has not judged yet."""

    def classes(self, section: SectionT) -> tuple[str, ...]:
        """The emotion classes the rule needs from the model while it is enabled."""
        return ()

    def restarts(self, old: SectionT, new: SectionT) -> bool:
        """Whether changing ``old`` to ``new`` throws every occupant's state of this rule away."""
        return False

    def seen(self, section: SectionT, state: StateT, context: Context) -> Verdict | None:
        """The occupant is in view, ``context.unseen_s`` after its previous reading (before any rule judges)."""
        return None

    def judge(self, section: SectionT, state: StateT, context: Context, observation: Observation) -> Verdict | None:
        """Judge one reading of the occupant (``context.smoothed`` has already taken it in)."""
        return None

    def absent(self, section: SectionT, state: StateT, context: Context) -> Verdict | None:
        """The occupant has been unseen for ``context.unseen_s``, at least ``lost_after_s``."""
        return None

    def values(self, section: SectionT, state: StateT, smoothed: Mapping[str, float]) -> dict[str, float | None]:
        """The value of each of ``series`` now (None: the rule has none yet, or is off)."""
        return {}

    def threshold(self, config: RulesConfig, threshold: Threshold) -> float:
        """The value of ``threshold`` in ``config``."""
        return float(getattr(self.section(config), threshold.field))


def ema_alpha(dt_s: float, tau_s: float) -> float:
    """Weight of a new sample dt_s after the last in an EMA with time constant tau_s (0: none)."""
    if tau_s <= 0:
        return 1.0
    return 1.0 - math.exp(-max(dt_s, 0.0) / tau_s)


def group_score(probabilities: Mapping[str, float], classes: tuple[str, ...]) -> float:
    """The sum of ``classes``' probabilities (a class not there counts 0)."""
    return sum(probabilities.get(name, 0.0) for name in classes)
