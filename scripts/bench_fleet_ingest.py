"""Events per second from the fleet broker into PostgreSQL: many vehicle ids, two ``fleet ingest`` processes.

A private Mosquitto (anonymous, on a free port) and a scratch database on the PostgreSQL server at ``--db``
(created, upgraded, dropped). Publisher processes send ``--events`` valid events at QoS 1 from ``--vehicles``
vehicle ids as fast as the broker takes them; the figure is events stored over the time from the first publish
to the last row committed, with the publish rate beside it. ``--kill-ingest`` SIGKILLs one ingest process once
a third of the events is stored and starts it again: the store must still hold every event once.

    python scripts/bench_fleet_ingest.py --db postgresql://postgres@127.0.0.1:5432/postgres --events 20000
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.fleet import DeepQueueBroker, event_json, fleet_database  # noqa: E402


def publish(port: int, vehicles: list[str], count: int, start_at: float) -> float:
    """Publish ``count`` events round-robin over ``vehicles`` at QoS 1; seconds until the last PUBACK."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    payloads = [(v, event_json(v)) for v in (vehicles[i % len(vehicles)] for i in range(count))]
    time.sleep(max(0.0, start_at - time.time()))
    started = time.monotonic()
    infos = [client.publish(f"cabin/{v}/events", p, qos=1) for v, p in payloads]
    for info in infos:
        info.wait_for_publish(120)
    elapsed = time.monotonic() - started
    client.disconnect()
    client.loop_stop()
    return elapsed


def main() -> None:
    """Broker, database, two ingest processes, publishers; print the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="postgresql://postgres@127.0.0.1:5432/postgres", help="server DSN")
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--vehicles", type=int, default=1000)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--ingest", type=int, default=2, help="ingest processes in the shared group")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--kill-ingest", action="store_true", help="SIGKILL and restart one ingest process mid-run")
    args = parser.parse_args()

    with fleet_database(args.db) as dsn:
        work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
        workers: list[subprocess.Popen[bytes]] = []
        try:
            with DeepQueueBroker(work / "broker") as broker:
                env = {**os.environ, "PYTHONPATH": str(REPO)}

                def start_ingest(i: int) -> subprocess.Popen[bytes]:
                    command = [
                        sys.executable,
                        "-m",
                        "cabin_monitor",
                        "fleet",
                        "ingest",
                        "--broker",
                        broker.url,
                        "--db",
                        dsn,
                    ]
                    command += ["--client-id", f"bench-ingest-{i}", "--batch-size", str(args.batch_size)]
                    with (work / f"ingest-{i}.log").open("ab") as log:
                        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

                workers += [start_ingest(i) for i in range(args.ingest)]
                while (
                    sum(
                        "connected to the fleet broker" in (work / f"ingest-{i}.log").read_text()
                        for i in range(args.ingest)
                    )
                    < args.ingest
                ):
                    time.sleep(0.2)
                vehicles = [f"car-{i:05d}" for i in range(args.vehicles)]
                share = args.events // args.publishers
                start_at = time.time() + 3.0  # payloads are made before the clock starts
                with multiprocessing.Pool(args.publishers) as pool:
                    pending = pool.starmap_async(
                        publish,
                        [
                            (broker.port, vehicles[i :: args.publishers], share, start_at)
                            for i in range(args.publishers)
                        ],
                    )
                    total = share * args.publishers
                    killed = not args.kill_ingest
                    with psycopg.connect(dsn, autocommit=True) as conn:
                        while (stored := conn.execute("SELECT count(*) FROM events").fetchone()[0]) < total:  # type: ignore[index]
                            if not killed and stored >= total // 3:
                                workers[0].kill()  # SIGKILL: its uncommitted batch was never acknowledged
                                workers[0].wait(10)
                                workers[0], killed = start_ingest(0), True
                                print(f"ingest 0 SIGKILLed with {stored} events stored, started again")
                            time.sleep(0.05)
                        stored_s = time.time() - start_at
                        distinct = conn.execute("SELECT count(DISTINCT event_id) FROM events").fetchone()[0]  # type: ignore[index]
                    publish_s = max(pending.get(300))
            for w in workers:
                w.terminate()
                w.wait(30)
            setup = f"{args.vehicles} vehicles, {args.publishers} publishers, {args.ingest} ingest processes"
            print(f"{total} events, {setup}")
            print(f"published (QoS 1, acknowledged by the broker): {total / publish_s:.0f} events/s")
            print(
                f"stored in PostgreSQL (committed, exactly once):  {stored / stored_s:.0f} events/s ({stored_s:.1f} s)"
            )
            print(f"events published {total}, rows {stored}, distinct event ids {distinct}")
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()


if __name__ == "__main__":
    main()
