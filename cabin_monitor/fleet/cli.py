"""``cabin-monitor fleet ...``: the sub-commands of the fleet side, added to the main parser by one call.

Only argparse here: the commands import psycopg and paho when they run, so the main command line works
without the ``fleet`` extra.
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import socket
import sys
import threading
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

    db = cmds.add_parser("db", help="the fleet store's schema")
    db_cmds = db.add_subparsers(dest="db_command", required=True)
    up = db_cmds.add_parser("upgrade", help="create or migrate the schema (safe to run again)")
    _db_option(up)
    up.set_defaults(fleet_func=_cmd_db_upgrade)

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


def _db_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", required=True, help="PostgreSQL connection string, e.g. postgresql://fleet@db/fleet")


def _broker_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", required=True, help="fleet broker, mqtt[s]://[user[:password]@]host[:port]")
    p.add_argument("--ca-file", type=Path, help="CA certificate of an mqtts:// broker")
    p.add_argument("--cert-file", type=Path, help="client certificate (mutual TLS)")
    p.add_argument("--key-file", type=Path, help="client key (mutual TLS)")


def _fleet_main(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("psycopg") is None:
        print("cabin-monitor: 'fleet' needs the fleet extra: pip install 'cabin-monitor[fleet]'", file=sys.stderr)
        return EXIT_FAILED
    from cabin_monitor.logs import configure_logging

    configure_logging("info", "auto")
    code: int = args.fleet_func(args)
    return code


def _address(args: argparse.Namespace) -> Any:
    from cabin_monitor.fleet.link import BrokerAddress

    return BrokerAddress.from_url(args.broker, ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


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
