"""``cabin-monitor replay``: recordings through the rules again; events as JSON lines, alert rates, two rule sets.

Events go to stdout one JSON line each, exactly as the daemon publishes them (``bus.payloads``);
the summary (alerts per hour and time in alert, per vehicle, per occupant and overall) goes to
stderr, so ``replay ... > events.jsonl`` keeps the two apart. ``--compare`` prints, instead of the
events, one JSON line per alert that only one rule set raises; ``--sweep`` the alert rate per swept value.
Each session is one work unit (``record.whatif``), run here or, with ``--scheduler``/``--workers``, on
Dask (``fleet.whatif``, imported only then); the summary is the same either way.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml
from pydantic import ValidationError

from cabin_monitor.bus.payloads import utc_iso
from cabin_monitor.config import deep_merge, load_config, validation_problems
from cabin_monitor.errors import ConfigurationError
from cabin_monitor.record.files import (
    RecordingError,
    RecordingFile,
    Session,
    expand,
    open_file,
    session_items,
    sessions,
)
from cabin_monitor.record.format import Entry, RecordingMeta, entry_rows
from cabin_monitor.record.replay import (
    Alert,
    AlertChange,
    RulesChoice,
    SessionReplay,
    Summary,
    Tally,
    compare,
    replay_session,
)
from cabin_monitor.record.whatif import Outcome, fold, replay_unit
from cabin_monitor.rules import RULE_NAMES
from cabin_monitor.tools import sweep
from cabin_monitor.tools.progress import Progress

OPEN_THREADS = 16  # recording files whose metadata is read at once


def parse_sets(items: Sequence[str], option: str = "--set") -> dict[str, Any]:
    """``rules.stress.enter_score=0.7`` ... as one partial rules mapping; the value is read as YAML."""
    patch: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        path = key.strip().split(".")
        if not sep or len(path) < 2 or path[0] != "rules" or not all(path):
            raise ConfigurationError(
                f"{option} {item!r}: expected rules.<key>...=<value>, e.g. rules.stress.enter_score=0.7"
            )
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigurationError(f"{option} {item!r}: the value is not valid YAML") from None
        node: Any = value
        for part in reversed(path[1:]):
            node = {part: node}
        patch = deep_merge(patch, node)
    return patch


def rules_choice(config: str | None, sets: Sequence[str], option: str = "--set") -> RulesChoice:
    """The rules of a configuration file (or the recording's own) with ``--set`` values on top."""
    base = load_config(Path(config)).rules if config else None
    return RulesChoice(base, parse_sets(sets, option))


def check_choice(choice: RulesChoice, recorded: RecordingMeta, label: str) -> None:
    """Refuse a patch that does not make valid rules, with one line per problem."""
    try:
        choice.resolve(recorded.rules)
    except ValidationError as exc:
        lines = [problem.under("rules.").line() for problem in validation_problems(exc)]
        raise ConfigurationError(f"{label}: the rules are invalid\n  " + "\n  ".join(lines)) from None


@dataclass
class Loaded:
    """The recordings found, and the files that were skipped."""

    files: list[RecordingFile]
    sessions: list[Session]
    skipped: list[str]


def load_recordings(patterns: Sequence[str], err: TextIO) -> Loaded:
    """Open every file named; an unusable one is skipped with a warning, none usable is an error."""
    found, skipped = [], []
    # Only the footers are read, and from a store each is a round trip: several at a time.
    with ThreadPoolExecutor(OPEN_THREADS) as pool:
        opened = list(pool.map(_open_or_error, expand(patterns)))
    for item in opened:
        if isinstance(item, RecordingFile):
            found.append(item)
        else:
            skipped.append(str(item))
            print(f"cabin-monitor: skipped {item}", file=err)
    if not found:
        raise RecordingError("no usable recording among " + ", ".join(patterns))
    grouped = sessions(found)
    for session in grouped:
        if missing := session.missing_segments():
            print(
                f"cabin-monitor: {session.vehicle_id} session {session.session_id[:8]}: segments {missing} missing; "
                "the replay goes on over the gap",
                file=err,
            )
    return Loaded(found, grouped, skipped)


def _open_or_error(path: Path | str) -> RecordingFile | RecordingError:
    try:
        return open_file(path)
    except RecordingError as exc:
        return exc


def replay_rows(loaded: Loaded, choices: int = 1) -> int:
    """The rows ``replay_all`` counts on its progress bar: every row once per rule set."""
    return choices * sum(s.rows for s in loaded.sessions)


def replay_all(
    loaded: Loaded, choices: Sequence[RulesChoice], progress: Progress, trace: bool = False
) -> list[list[SessionReplay]]:
    """Each session replayed under each choice: ``result[choice][session]``; ``progress`` counts rows replayed."""
    results: list[list[SessionReplay]] = [[] for _ in choices]
    for session in loaded.sessions:
        items: list[RecordingMeta | Entry] = list(session_items(session))
        for i, choice in enumerate(choices):
            results[i].append(replay_session(_counted(items, progress), choice, trace=trace))
    return results


def _counted(items: Iterable[RecordingMeta | Entry], progress: Progress) -> Iterator[RecordingMeta | Entry]:
    """``items``, counting each entry's rows on ``progress`` once it has been replayed."""
    for item in items:
        yield item
        if not isinstance(item, RecordingMeta):
            progress.advance(entry_rows(item))


def replay_command(args: Any, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The ``replay`` sub-command."""
    out = out or sys.stdout
    err = err or sys.stderr
    check_options(args)
    axes = [sweep.parse_axis(text) for text in args.sweep]
    points = sweep.grid(axes) if axes else []
    choices = _rule_choices(args, points)
    loaded = load_recordings(args.recordings, err)
    labels = ["rule set A", "rule set B"] if args.compare else ["the rules"]
    labels += [f"--sweep {p.label()}" for p in points]
    for label, choice in zip(labels, choices, strict=True):
        check_choice(choice, loaded.sessions[0].files[0].meta, label)
    started = time.perf_counter()
    events = not (args.compare or args.no_events or points)
    outcomes = run_units(loaded, choices, args, events=events, keep_alerts=args.compare, err=err)
    elapsed_s = time.perf_counter() - started
    summaries = [fold(o[i].summary for o in outcomes) for i in range(len(choices))]
    swept = sweep.SweepResult(
        points, summaries[len(choices) - len(points) :], sweep.judged_rules(axes), args.target_rate
    )
    changes = _write_lines(args, outcomes, events, out)
    print(_speed_line(loaded, summaries[0], elapsed_s), file=err)
    print(_summary_text(args, summaries, changes, swept), file=err)
    if args.summary_json:
        _write_summary_json(Path(args.summary_json), loaded, summaries, changes if args.compare else None, swept)
    return 0


def _rule_choices(args: Any, points: Sequence[sweep.Point]) -> list[RulesChoice]:
    """The rule sets to replay: A, then B with --compare, then one per swept value."""
    choices = [rules_choice(args.config, args.set)]
    if args.compare:
        choices.append(rules_choice(args.config_b, args.set_b, "--set-b"))
    return choices + sweep.choices(choices[0], points)


def _write_lines(args: Any, outcomes: list[list[Outcome]], events: bool, out: TextIO) -> list[AlertChange]:
    """The compared alerts (with --compare) or the events as JSON lines; returns the compared alerts."""
    changes: list[AlertChange] = []
    if args.compare:
        changes = compare([a for o in outcomes for a in o[0].alerts], [a for o in outcomes for a in o[1].alerts])
        out.writelines(json.dumps(change_json(change)) + "\n" for change in changes)
    elif events:
        for outcome in outcomes:
            out.writelines(line + "\n" for line in outcome[0].events)
    out.flush()
    return changes


def _speed_line(loaded: Loaded, summary: Summary, elapsed_s: float) -> str:
    recorded_s = summary.overall.seconds
    speed = f", {recorded_s / elapsed_s:.0f}x real time" if elapsed_s > 0 and recorded_s > 0 else ""
    return (
        f"replayed {len(loaded.files)} files, {len(loaded.sessions)} sessions of {len(summary.vehicles)} vehicles, "
        f"{recorded_s / 3600:.2f} h of readings ({summary.frames} frames) in {elapsed_s:.2f} s{speed}"
    )


def _summary_text(args: Any, summaries: list[Summary], changes: list[AlertChange], swept: sweep.SweepResult) -> str:
    if args.compare:
        added = sum(c.change == "added" for c in changes)
        removed = sum(c.change == "removed" for c in changes)
        return f"{compare_table(summaries[0], summaries[1])}\n{added} alerts added, {removed} removed by rule set B"
    if swept.points:
        verdict = swept.verdict()
        return swept.table() if verdict is None else f"{swept.table()}\n{verdict}"
    return summary_table(summaries[0])


def _write_summary_json(
    path: Path,
    loaded: Loaded,
    summaries: list[Summary],
    changes: list[AlertChange] | None,
    swept: sweep.SweepResult,
) -> None:
    """The summary as JSON: set A, set B and the compared alerts (``changes`` given with --compare), the sweep."""
    document: dict[str, Any] = {"a": summaries[0].as_json(), "skipped": loaded.skipped}
    if changes is not None:
        document["b"] = summaries[1].as_json()
        document["changes"] = [change_json(c) for c in changes]
    if swept.points:
        document |= swept.as_json()
    path.write_text(json.dumps(document, indent=2) + "\n")


def check_options(args: Any) -> None:
    """Refuse options that do not go together."""
    if (args.config_b or args.set_b) and not args.compare:
        raise ConfigurationError("--config-b and --set-b describe the second rule set of --compare")
    if args.compare and not (args.config_b or args.set_b):
        raise ConfigurationError("--compare needs the second rule set: --set-b KEY=VALUE ... and/or --config-b FILE")
    if args.sweep and args.compare:
        raise ConfigurationError("--sweep and --compare do not go together: sweep over the rules of A")
    if args.target_rate is not None and not args.sweep:
        raise ConfigurationError("--target-rate chooses among the values of --sweep")
    if args.workers is not None and args.workers < 1:
        raise ConfigurationError("--workers needs at least 1")
    if args.scheduler and args.workers:
        raise ConfigurationError("--scheduler (a running cluster) or --workers N (a local one), not both")


def run_units(
    loaded: Loaded, choices: Sequence[RulesChoice], args: Any, *, events: bool, keep_alerts: bool, err: TextIO
) -> list[list[Outcome]]:
    """Each session under each choice, ``result[session][choice]``: in this process, or on Dask when
    ``--scheduler`` or ``--workers`` is given."""
    with Progress("replay", replay_rows(loaded, len(choices)), stream=err) as progress:
        if args.scheduler or args.workers:
            if importlib.util.find_spec("distributed") is None:
                raise ConfigurationError("--scheduler and --workers need Dask: pip install 'cabin-monitor[fleet]'")
            from cabin_monitor.fleet.whatif import replay_on_dask

            return replay_on_dask(
                loaded.sessions,
                choices,
                scheduler=args.scheduler,
                workers=args.workers,
                events=events,
                keep_alerts=keep_alerts,
                on_done=lambda session: progress.advance(session.rows * len(choices)),
            )
        outcomes = []
        for session in loaded.sessions:
            outcomes.append(replay_unit(session, choices, events=events, keep_alerts=keep_alerts))
            progress.advance(session.rows * len(choices))
        return outcomes


def change_json(change: AlertChange) -> dict[str, Any]:
    """One compared alert as a JSON object."""
    a = change.alert
    return {"change": change.change, **alert_json(a)}


def alert_json(a: Alert) -> dict[str, Any]:
    """An alert as a JSON object, times as the payloads give them."""
    return {
        "vehicle_id": a.vehicle_id,
        "session_id": a.session_id,
        "occupant_id": a.occupant_id,
        "seat": a.seat,
        "type": a.type,
        "severity": a.severity,
        "start_ts": utc_iso(a.start_wall_s),
        "end_ts": utc_iso(a.end_wall_s) if a.ended else None,
        "duration_s": round(a.duration_s, 3),
        "score": a.score,
    }


def _scopes(summary: Summary) -> list[tuple[str, Tally]]:
    rows = [("all", summary.overall)]
    for vehicle, tally in sorted(summary.vehicles.items()):
        rows.append((vehicle, tally))
        rows += [(f"  {o}", t) for (v, o), t in sorted(summary.occupants.items()) if v == vehicle]
    return rows


def summary_table(summary: Summary) -> str:
    """Per type: alerts, alerts per hour, time in alert; overall, per vehicle, per occupant (over its time in view)."""
    head = ["", "hours", *(f"{rule}: n  /h  in alert" for rule in RULE_NAMES)]
    rows = [
        [
            name,
            f"{tally.seconds / 3600:.2f}",
            *(f"{tally.count[r]}  {tally.per_hour(r):.2f}/h  {tally.alert_s[r]:.1f} s" for r in RULE_NAMES),
        ]
        for name, tally in _scopes(summary)
    ]
    return _table([head, *rows])


def compare_table(a: Summary, b: Summary) -> str:
    """Alerts per hour of each type under rule set A and B, side by side."""
    b_scopes = dict(_scopes(b))
    head = ["", "hours", *(f"{rule}/h: A -> B" for rule in RULE_NAMES)]
    rows = []
    for name, tally in _scopes(a):
        other = b_scopes.get(name, Tally())
        cells = [f"{tally.per_hour(r):.2f} -> {other.per_hour(r):.2f}" for r in RULE_NAMES]
        rows.append([name, f"{tally.seconds / 3600:.2f}", *cells])
    return _table([head, *rows])


def _table(rows: list[list[str]]) -> str:
    """Columns padded to their widest cell: the first left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "   ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )
