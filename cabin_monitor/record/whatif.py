"""What-if over recordings one session at a time: the pure work unit and the partial summaries it returns.

``replay_unit`` reads one session's files once and runs one rules engine per rule choice over them; what
it returns per choice (``Outcome``) holds the session's summary, which merges with others by addition
(``merge``). Callers fold the outcomes in session order, so the summary is the same to the last bit
whether the units ran in this process or as tasks on a cluster (``fleet.whatif``).
May import ``record``, ``rules`` and ``bus.payloads``; no scheduler, no printing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import reduce
from typing import TypeVar

from cabin_monitor.bus.payloads import event_payload
from cabin_monitor.record.files import Session, session_items
from cabin_monitor.record.format import Entry, RecordingMeta
from cabin_monitor.record.replay import Alert, RulesChoice, Summary, Tally, alerts, replay_session, summarize

K = TypeVar("K")


@dataclass
class Outcome:
    """One session replayed under one rule choice."""

    summary: Summary
    alerts: list[Alert] = field(default_factory=list)  # only when asked for (``keep_alerts``)
    events: list[str] = field(default_factory=list)  # event payloads as JSON lines, only when asked for


def replay_unit(
    session: Session, choices: Sequence[RulesChoice], *, events: bool = False, keep_alerts: bool = False
) -> list[Outcome]:
    """The session under each choice, its files read once: ``result[choice]``."""
    items: list[RecordingMeta | Entry] = list(session_items(session))
    outcomes = []
    for choice in choices:
        replay = replay_session(items, choice)
        found = alerts(replay)
        lines = [event_payload(e, replay.vehicle_id).model_dump_json() for e in replay.events] if events else []
        outcomes.append(Outcome(summarize([replay], [found]), found if keep_alerts else [], lines))
    return outcomes


def merge_tally(a: Tally, b: Tally) -> Tally:
    """The tally of both scopes' time and alerts."""
    return Tally(
        a.seconds + b.seconds,
        {rule: a.count.get(rule, 0) + b.count.get(rule, 0) for rule in a.count | b.count},
        {rule: a.alert_s.get(rule, 0.0) + b.alert_s.get(rule, 0.0) for rule in a.alert_s | b.alert_s},
    )


def merge(a: Summary, b: Summary) -> Summary:
    """The summary of both replays (associative; ``Summary()`` is its identity)."""

    return Summary(
        merge_tally(a.overall, b.overall),
        _merge_scopes(a.vehicles, b.vehicles),
        _merge_scopes(a.occupants, b.occupants),
        a.sessions + b.sessions,
        a.frames + b.frames,
    )


def _merge_scopes(x: dict[K, Tally], y: dict[K, Tally]) -> dict[K, Tally]:
    return {k: merge_tally(x.get(k, Tally()), y.get(k, Tally())) for k in x | y}


def fold(summaries: Iterable[Summary]) -> Summary:
    """The summaries merged, left to right."""
    return reduce(merge, summaries, Summary())
