"""``cabin-monitor fleet ...``: the sub-commands of the fleet side, added to the main parser by one call.

Only argparse here: the commands import psycopg and paho when they run, so the main command line works
without the ``fleet`` extra.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import secrets
import signal
import socket
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def add_fleet_parser(sub: Any) -> None:
    """Add ``fleet`` and its sub-commands to ``sub`` (the main parser's sub-parsers)."""
    fleet = sub.add_parser("fleet", help="fleet operators: event store, ingest, rule roll-outs, alert rates")
    fleet.set_defaults(func=_fleet_main)
    cmds = fleet.add_subparsers(dest="fleet_command", required=True)
    for add in (_add_db, _add_ingest, _add_rollout, _add_rates, _add_report, _add_retention):
        add(cmds)


def _add_db(cmds: Any) -> None:
    db = cmds.add_parser("db", help="the fleet store's schema")
    db_cmds = db.add_subparsers(dest="db_command", required=True)
    up = db_cmds.add_parser("upgrade", help="create or migrate the schema (safe to run again)")
    _db_option(up)
    up.set_defaults(fleet_func=_cmd_db_upgrade)


def _add_ingest(cmds: Any) -> None:
    ing = cmds.add_parser("ingest", help="take every vehicle's messages from the fleet broker into the store")
    _broker_options(ing)
    _db_option(ing)
    ing.add_argument("--group", default="cabin-fleet-ingest", help="shared subscription group (default: %(default)s)")
    ing.add_argument(
        "--client-id",
        help="MQTT client id, stable across restarts and unique per process (default: ingest-<group>-<host>)",
    )
    ing.add_argument("--batch-size", type=int, default=500, help="messages per transaction (default: %(default)s)")
    ing.add_argument("--prefix", default="cabin", help="topic prefix (default: %(default)s)")
    ing.set_defaults(fleet_func=_cmd_ingest)


def _add_rollout(cmds: Any) -> None:
    ro = cmds.add_parser(
        "rollout",
        help="change rules on a canary group, then in waves, aborting and restoring on refusals or alert rates",
        description="'fleet rollout [options]' starts a roll-out; 'fleet rollout status ID --db DSN' shows one; "
        "'fleet rollout resume ID --broker URL --db DSN' goes on with one whose process ended.",
    )
    ro.add_argument(
        "existing",
        nargs="*",
        metavar="status|resume ID",
        help="show roll-out ID, or go on with it where its process ended, instead of starting one",
    )
    _db_option(ro)
    _broker_options(ro, required=False)
    who = ro.add_mutually_exclusive_group()
    who.add_argument("--vehicles", type=Path, help="file of vehicle ids, one a line (# comments)")
    who.add_argument("--all", action="store_true", help="every vehicle with health in the store")
    ro.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="rules change, e.g. stress.sustain_s=5 (JSON value)",
    )
    ro.add_argument("--id", dest="rollout_id", help="roll-out id (default: r-<UTC time>-<random>)")
    ro.add_argument("--canary", default="10%", help="canary share of the vehicles (default: %(default)s)")
    ro.add_argument("--waves", type=int, default=3, help="waves after the canary (default: %(default)s)")
    ro.add_argument("--wait", default="10m", help="observe the canary this long: 90s, 10m, 2h (default: %(default)s)")
    ro.add_argument("--answer-timeout", default="60s", help="a vehicle silent this long counts as no answer")
    ro.add_argument("--max-per-minute", type=float, default=60.0, help="requests per minute at most")
    ro.add_argument(
        "--abort-if-rate-above",
        type=float,
        metavar="X",
        help="abort when the canary's alert rate is above X times its own before and the rest's",
    )
    ro.add_argument(
        "--rate-floor", type=float, default=0.1, help="alerts per vehicle-hour the comparison never goes under"
    )
    ro.add_argument(
        "--max-failures-percent", type=float, metavar="P", help="abort when more than P %% refused or gave no answer..."
    )
    ro.add_argument("--min-answered", type=int, default=10, metavar="N", help="...once at least N have answered")
    ro.add_argument("--prefix", default="cabin", help="topic prefix (default: %(default)s)")
    ro.set_defaults(fleet_func=_cmd_rollout)


def _add_rates(cmds: Any) -> None:
    ra = cmds.add_parser("rates", help="alerts per vehicle-hour, top vehicles, rules that differ from the fleet's")
    _db_option(ra)
    ra.add_argument("--since", default="7d", help="window up to now: 90m, 12h, 7d (default: %(default)s)")
    ra.add_argument("--by", choices=("vehicle", "rule", "day"), default="vehicle", help="grouping (default: vehicle)")
    ra.add_argument("--top", type=int, default=10, help="top vehicles listed (default: %(default)s)")
    ra.add_argument(
        "--shadow",
        action="store_true",
        help="instead: live against shadow alerts per vehicle-hour, over the hours each vehicle ran shadow rules",
    )
    ra.add_argument("--json", action="store_true", help="print JSON")
    ra.set_defaults(fleet_func=_cmd_rates)


def _add_report(cmds: Any) -> None:
    rp = cmds.add_parser("report", help="the alert rates as an HTML page with plots")
    _db_option(rp)
    rp.add_argument("--out", type=Path, required=True, help="folder for index.html and plotly.min.js")
    rp.add_argument("--since", default="7d", help="window up to now: 90m, 12h, 7d (default: %(default)s)")
    rp.add_argument("--top", type=int, default=20, help="top vehicles plotted (default: %(default)s)")
    rp.set_defaults(fleet_func=_cmd_report)


def _add_retention(cmds: Any) -> None:
    rt = cmds.add_parser(
        "retention",
        help="drop what is older than --keep: events by whole monthly partitions, other tables by row",
        description="Events and shadow events go by whole months: every partition ending before the month of "
        "now minus --keep is dropped; copies of dropped events arriving later are quarantined.",
    )
    _db_option(rt)
    rt.add_argument("--keep", required=True, help="what to keep, up to now: 400d, 9600h (at least 1d)")
    rt.add_argument("--dry-run", action="store_true", help="count what would go, change nothing")
    rt.set_defaults(fleet_func=_cmd_retention)


def parse_duration_s(text: str) -> float:
    """``90s``, ``10m``, ``2h``, ``7d`` (or plain seconds) as seconds; ``ValueError`` otherwise."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    number, unit = (text[:-1], units[text[-1]]) if text and text[-1] in units else (text, 1.0)
    value = float(number) * unit
    if not value >= 0:
        raise ValueError(f"not a duration: {text!r}")
    return value


def parse_changes(assignments: list[str]) -> dict[str, Any]:
    """``stress.sustain_s=5`` ... as a nested rules mapping; values are JSON (bare words are strings)."""
    changes: dict[str, Any] = {}
    for item in assignments:
        path, sep, raw = item.partition("=")
        if not sep or not path:
            raise ValueError(f"--set wants PATH=VALUE, not {item!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        *parents, leaf = path.removeprefix("rules.").split(".")
        node = changes
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return changes


def _db_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", required=True, help="PostgreSQL connection string, e.g. postgresql://fleet@db/fleet")


def _broker_options(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--broker", required=required, help="fleet broker, mqtt[s]://[user[:password]@]host[:port]")
    p.add_argument("--ca-file", type=Path, help="CA certificate of an mqtts:// broker")
    p.add_argument("--cert-file", type=Path, help="client certificate (mutual TLS)")
    p.add_argument("--key-file", type=Path, help="client key (mutual TLS)")


def _fleet_main(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("psycopg") is None:
        print("cabin-monitor: 'fleet' needs the fleet extra: pip install 'cabin-monitor[fleet]'", file=sys.stderr)
        return EXIT_FAILED
    import psycopg
    from psycopg_pool import PoolTimeout

    from cabin_monitor.logs import configure_logging

    configure_logging("info", "auto")
    try:
        code: int = args.fleet_func(args)
    except (psycopg.OperationalError, PoolTimeout) as exc:
        print(f"cabin-monitor fleet: the store cannot be reached: {str(exc).strip()}", file=sys.stderr)
        return EXIT_FAILED
    except (TimeoutError, ValueError, OSError) as exc:
        print(f"cabin-monitor fleet: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return code


def _address(args: argparse.Namespace) -> Any:
    from cabin_monitor.fleet.link import BrokerAddress

    return BrokerAddress.from_url(args.broker, ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _read_vehicles(args: argparse.Namespace, pool: Any) -> list[str]:
    if args.vehicles is not None:
        lines = (line.split("#", 1)[0].strip() for line in args.vehicles.read_text().splitlines())
        return [line for line in lines if line]
    with pool.connection() as conn:
        return [r[0] for r in conn.execute("SELECT vehicle_id FROM health_latest ORDER BY vehicle_id")]


def _cmd_rollout(args: argparse.Namespace) -> int:
    if args.existing:
        if len(args.existing) != 2 or args.existing[0] not in ("status", "resume"):
            return _usage("give 'status ID' or 'resume ID', or no positional argument to start a roll-out")
        return _rollout_status(args) if args.existing[0] == "status" else _rollout_resume(args)
    return _rollout_start(args)


def _rollout_status(args: argparse.Namespace) -> int:
    from cabin_monitor.fleet.db import open_pool
    from cabin_monitor.fleet.rollout_run import status_text

    with open_pool(args.db, max_size=1) as pool:
        text = status_text(pool, args.existing[1])
    if text is None:
        return _usage(f"no roll-out {args.existing[1]!r}")
    print(text)
    return EXIT_OK


def _rollout_plan(args: argparse.Namespace) -> Any:
    from cabin_monitor.fleet.rollout import Plan

    return Plan(
        changes=parse_changes(args.set),
        canary_percent=float(args.canary.rstrip("%")),
        waves=args.waves,
        wait_s=parse_duration_s(args.wait),
        answer_timeout_s=parse_duration_s(args.answer_timeout),
        max_per_minute=args.max_per_minute,
        abort_rate_ratio=args.abort_if_rate_above,
        rate_floor_per_hour=args.rate_floor,
        max_failures_percent=args.max_failures_percent,
        min_answered=args.min_answered,
    )


def _rollout_start(args: argparse.Namespace) -> int:
    from cabin_monitor.fleet.db import open_pool
    from cabin_monitor.fleet.rollout_run import create_rollout, status_text

    if args.broker is None or not args.set or not (args.vehicles or args.all):
        return _usage("a roll-out needs --broker, --vehicles FILE or --all, and at least one --set PATH=VALUE")
    try:
        plan = _rollout_plan(args)
    except ValueError as exc:
        return _usage(str(exc))
    rollout_id = args.rollout_id or f"r-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(2)}"
    with open_pool(args.db, max_size=2) as pool:
        vehicles = _read_vehicles(args, pool)
        if not vehicles:
            return _usage("no vehicles to roll out to")
        if status_text(pool, rollout_id) is not None:
            return _usage(f"roll-out {rollout_id!r} exists already (see: fleet rollout status {rollout_id})")
        print(f"rollout {rollout_id}: {len(vehicles)} vehicles", flush=True)
        machine, previous = create_rollout(pool, rollout_id, plan, vehicles, time.time())
        return _run_rollout(args, pool, machine, previous)


def _rollout_resume(args: argparse.Namespace) -> int:
    from cabin_monitor.fleet.db import open_pool
    from cabin_monitor.fleet.rollout import Phase
    from cabin_monitor.fleet.rollout_run import load_rollout

    rollout_id = args.existing[1]
    if args.broker is None:
        return _usage("resuming a roll-out needs --broker")
    with open_pool(args.db, max_size=2) as pool:
        loaded = load_rollout(pool, rollout_id, time.time())
        if loaded is None:
            return _usage(f"no roll-out {rollout_id!r}")
        machine, previous = loaded
        if machine.phase in (Phase.DONE, Phase.ABORTED):
            return _usage(f"roll-out {rollout_id!r} has ended ({machine.phase.value}); nothing to resume")
        print(f"rollout {rollout_id}: resumed in {machine.phase.value}, wave {machine.wave}", flush=True)
        return _run_rollout(args, pool, machine, previous)


def _run_rollout(args: argparse.Namespace, pool: Any, machine: Any, previous: Any) -> int:
    from cabin_monitor.fleet.rollout import Phase
    from cabin_monitor.fleet.rollout_run import RolloutBusy, RolloutRunner, status_text

    runner = RolloutRunner(_address(args), pool, machine, previous, args.prefix)
    try:
        phase = runner.run(_stop_on_signals())
    except RolloutBusy as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(status_text(pool, machine.rollout_id), flush=True)
    return EXIT_OK if phase == Phase.DONE else EXIT_FAILED


def _window(duration: str) -> tuple[datetime, datetime]:
    """(now minus ``duration``, now) in UTC; ``ValueError`` for a duration ``parse_duration_s`` refuses."""
    end = datetime.now(timezone.utc)
    return end - timedelta(seconds=parse_duration_s(duration)), end


def _cmd_rates(args: argparse.Namespace) -> int:
    import psycopg

    from cabin_monitor.fleet.rates import format_report, report
    from cabin_monitor.fleet.shadow_rates import compare, format_compare

    try:
        start, end = _window(args.since)
    except ValueError as exc:
        return _usage(str(exc))
    with psycopg.connect(args.db) as conn:
        if args.shadow:
            data = compare(conn, start, end)
            text = format_compare
        else:
            data = report(conn, start, end, args.by, args.top)
            text = format_report
    print(json.dumps(data, indent=2) if args.json else text(data))
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    import psycopg

    from cabin_monitor.fleet.report import write_report

    try:
        start, end = _window(args.since)
    except ValueError as exc:
        return _usage(str(exc))
    with psycopg.connect(args.db) as conn:
        path = write_report(conn, args.out, start, end, args.top)
    print(path)
    return EXIT_OK


def _cmd_retention(args: argparse.Namespace) -> int:
    import psycopg

    from cabin_monitor.fleet.retention import apply_retention, format_retention

    try:
        cutoff, now = _window(args.keep)
    except ValueError as exc:
        return _usage(str(exc))
    if now - cutoff < timedelta(days=1):
        return _usage(f"--keep {args.keep} is under a day: the store would lose the events it is taking in now")
    with psycopg.connect(args.db) as conn:
        result = apply_retention(conn, cutoff, dry_run=args.dry_run)
    print(format_retention(result, dry_run=args.dry_run))
    return EXIT_OK


def _usage(message: str) -> int:
    print(f"cabin-monitor fleet: {message}", file=sys.stderr)
    return EXIT_USAGE


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from cabin_monitor.fleet.db import applied_versions, upgrade

    applied = upgrade(args.db)
    print(f"schema at version {applied_versions(args.db)[-1]}; applied now: {applied or 'none (up to date)'}")
    return EXIT_OK


def _cmd_ingest(args: argparse.Namespace) -> int:
    from cabin_monitor.fleet.db import open_pool
    from cabin_monitor.fleet.ingest import Ingest, IngestSettings

    client_id = args.client_id or f"ingest-{args.group}-{socket.gethostname()}"
    settings = IngestSettings(args.group, client_id, args.prefix, args.batch_size)
    stop = _stop_on_signals()
    with open_pool(args.db, max_size=2) as pool:
        return Ingest(_address(args), pool, settings).run(stop)
