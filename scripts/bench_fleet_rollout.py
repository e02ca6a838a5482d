"""A roll-out to a thousand vehicles: canary, observation, two waves; and one that aborts and restores its canary.

A private Mosquitto (anonymous, on a free port), a scratch database on the PostgreSQL server at ``--db``
(created, upgraded, dropped), one ``fleet ingest`` process, ``--vehicles`` simulated vehicles answering
``config/set`` and ``config/reset`` exactly as the daemon does (its own rules-in-force code, one instance per
vehicle, all on one MQTT connection) while publishing health and a ``stress`` start every ``stress.sustain_s`` of
the rules in force, and ``--daemons`` real daemons on the sample clip. Two roll-outs through the command line:
one that makes the canary alert far more (aborted, canary restored) and one that changes nothing the alert rate
sees (canary, observation, two waves, done). The figures are the times between the stored steps.

    python scripts/bench_fleet_rollout.py --vehicles 1000 --daemons 2 --wait 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import yaml
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cabin_monitor.assets import sample_path  # noqa: E402
from cabin_monitor.config import RulesConfig  # noqa: E402
from cabin_monitor.logs import configure_logging  # noqa: E402
from cabin_monitor.messages import RemoteRequest  # noqa: E402
from tests.support.fleet import DeepQueueBroker, event_json, fleet_database, health_json  # noqa: E402
from tests.support.vehicle_rules import VehicleRules  # noqa: E402


class SimulatedFleet:
    """Many vehicles on one MQTT connection, each answering config requests with the daemon's own code."""

    def __init__(self, port: int, vehicles: list[str], base: RulesConfig, health_interval_s: float) -> None:
        self.rules = {v: VehicleRules(base) for v in vehicles}
        self.health_interval_s = health_interval_s
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-fleet", protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.on_message = self._on_request
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([("cabin/+/config/set", 1), ("cabin/+/config/reset", 1)])
        self.client.loop_start()
        for v, control in self.rules.items():
            state = control.state(v, "start").model_dump_json()
            self.client.publish(f"cabin/{v}/rules/state", state, qos=1, retain=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-fleet", daemon=True)
        self._thread.start()

    def _on_request(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        _, vehicle, _, action = msg.topic.split("/")
        control = self.rules.get(vehicle)
        if control is None:
            return  # a real daemon's
        request = RemoteRequest(action, bytes(msg.payload), retained=bool(msg.retain), received_s=time.monotonic())  # type: ignore[arg-type]
        answer = control.handle(request)
        self.client.publish(f"cabin/{vehicle}/config/result", answer.model_dump_json(), qos=1)
        if answer.ok:
            state = control.state(vehicle, f"config/{action}", answer.request_id).model_dump_json()  # type: ignore[arg-type]
            self.client.publish(f"cabin/{vehicle}/rules/state", state, qos=1, retain=True)

    def _run(self) -> None:
        vehicles = list(self.rules)
        start = time.monotonic()
        next_health = {v: start + self.health_interval_s * i / len(vehicles) for i, v in enumerate(vehicles)}
        next_alert = {
            v: start + float(self.rules[v].effective.stress.sustain_s) * i / len(vehicles)
            for i, v in enumerate(vehicles)
        }
        while not self._stop.wait(0.05):
            now = time.monotonic()
            for v in vehicles:
                if now >= next_health[v]:
                    next_health[v] += self.health_interval_s
                    self.client.publish(f"cabin/{v}/health", health_json(v), qos=1)
                if now >= next_alert[v]:
                    next_alert[v] = now + float(self.rules[v].effective.stress.sustain_s)
                    self.client.publish(f"cabin/{v}/events", event_json(v), qos=1)

    def overrides(self) -> dict[str, int]:
        """How many vehicles have each set of overrides in force (JSON text -> count)."""
        counts: dict[str, int] = {}
        for control in self.rules.values():
            key = json.dumps(control.overrides(), sort_keys=True)
            counts[key] = counts.get(key, 0) + 1
        return counts

    def close(self) -> None:
        """Stop publishing and disconnect."""
        self._stop.set()
        self._thread.join(5)
        self.client.disconnect()
        self.client.loop_stop()


def start_daemon(work: Path, port: int, vehicle_id: str) -> subprocess.Popen[bytes]:
    """A real daemon on the sample clip, looping, publishing to the fleet broker as ``vehicle_id``."""
    config = work / f"{vehicle_id}.yaml"
    mqtt_config = {"url": f"mqtt://127.0.0.1:{port}", "health_interval_s": 2}
    settings = {"vehicle_id": vehicle_id, "state_dir": str(work / vehicle_id), "mqtt": mqtt_config}
    config.write_text(yaml.safe_dump(settings))
    command = [sys.executable, "-m", "cabin_monitor", "run", "--config", str(config)]
    command += ["--source", str(sample_path("single_face.mp4")), "--loop"]
    with (work / f"{vehicle_id}.log").open("wb") as log:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def wait_for(dsn: str, statement: str, expected: int, timeout_s: float, what: str) -> None:
    """Poll ``statement`` (one count) until it reaches ``expected``."""
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(dsn, autocommit=True) as conn:
        while (n := conn.execute(statement).fetchone()[0]) < expected:  # type: ignore[index]
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: {n} of {expected} after {timeout_s} s")
            time.sleep(0.2)


def rollout(work: Path, port: int, dsn: str, rollout_id: str, change: str, args: argparse.Namespace) -> float:
    """Run ``fleet rollout --all`` to its end; seconds it took."""
    command = [sys.executable, "-m", "cabin_monitor", "fleet", "rollout", "--broker", f"mqtt://127.0.0.1:{port}"]
    command += ["--db", dsn, "--all", "--id", rollout_id, "--set", change, "--canary", f"{args.canary}%"]
    command += ["--waves", "2", "--wait", f"{args.wait}s", "--answer-timeout", "60s"]
    command += ["--max-per-minute", str(args.max_per_minute), "--abort-if-rate-above", "3"]
    command += ["--max-failures-percent", "5", "--min-answered", "20"]
    started = time.monotonic()
    with (work / f"{rollout_id}.log").open("wb") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=1800, check=False)
    return time.monotonic() - started


def timeline(dsn: str, rollout_id: str) -> list[str]:
    """Each stored step with its time since the first, and the answer latencies."""
    with psycopg.connect(dsn) as conn:
        steps: list[tuple[datetime, str, dict[str, Any]]] = conn.execute(  # type: ignore[assignment]
            "SELECT at, step, detail FROM rollout_steps WHERE rollout_id = %s ORDER BY id", (rollout_id,)
        ).fetchall()
        latency = conn.execute(
            "SELECT count(*), percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY answered_at - sent_at), "
            "max(answered_at - sent_at) FROM rollout_vehicles WHERE rollout_id = %s AND answered_at IS NOT NULL",
            (rollout_id,),
        ).fetchone()
        waves = conn.execute(
            "SELECT wave, count(*), extract(epoch FROM max(sent_at) - min(sent_at)), "
            "extract(epoch FROM max(answered_at) - min(sent_at)) FROM rollout_vehicles "
            "WHERE rollout_id = %s AND sent_at IS NOT NULL GROUP BY 1 ORDER BY 1",
            (rollout_id,),
        ).fetchall()
        states = conn.execute(
            "SELECT state, count(*) FROM rollout_vehicles WHERE rollout_id = %s GROUP BY 1 ORDER BY 1", (rollout_id,)
        ).fetchall()
    first = steps[0][0]
    lines = []
    for at, step, detail in steps:
        keep = {k: v for k, v in detail.items() if k in ("wave", "vehicles", "decision", "reason")}
        if step == "rates":
            keep = {"decision": detail["decision"], "canary_after_per_h": round(detail["canary_after"]["per_hour"], 1)}
            keep["reference_per_h"] = round(detail["reference_per_hour"], 1)
        lines.append(f"  {(at - first).total_seconds():7.1f} s  {step:<17} {json.dumps(keep)}")
    assert latency is not None
    n, (p50, p95), worst = latency
    lines.append(
        f"  answers: {n}, request to answer p50 {p50.total_seconds() * 1000:.0f} ms, "
        f"p95 {p95.total_seconds() * 1000:.0f} ms, max {worst.total_seconds() * 1000:.0f} ms"
    )
    lines += [
        f"  wave {w}: {n} requests sent over {sent:.1f} s, all answered {done:.1f} s after the first"
        for w, n, sent, done in waves
    ]
    lines.append(f"  vehicles: {dict(states)}")
    return lines


def main() -> None:
    """Broker, store, ingest, the simulated fleet and real daemons; the two roll-outs; print the timelines."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="postgresql://postgres@127.0.0.1:5432/postgres", help="server DSN")
    parser.add_argument("--vehicles", type=int, default=1000, help="simulated vehicles")
    parser.add_argument("--daemons", type=int, default=2, help="real daemons on the sample clip")
    parser.add_argument("--canary", type=float, default=5.0, help="canary percent")
    parser.add_argument("--wait", type=float, default=20.0, help="seconds the canary is observed")
    parser.add_argument("--max-per-minute", type=float, default=6000.0, help="requests per minute at most")
    parser.add_argument("--health-interval", type=float, default=5.0, help="seconds between a vehicle's health")
    args = parser.parse_args()
    configure_logging("warning")  # the simulated vehicles' rule changes are not news here

    with fleet_database(args.db) as dsn:
        work = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
        children: list[subprocess.Popen[bytes]] = []
        fleet: SimulatedFleet | None = None
        try:
            with DeepQueueBroker(work / "broker") as broker:
                env = {**os.environ, "PYTHONPATH": str(REPO)}
                ingest = [sys.executable, "-m", "cabin_monitor", "fleet", "ingest", "--broker", broker.url, "--db", dsn]
                with (work / "ingest.log").open("wb") as log:
                    children.append(
                        subprocess.Popen(
                            [*ingest, "--client-id", "bench-ingest"], stdout=log, stderr=subprocess.STDOUT, env=env
                        )
                    )
                while "connected to the fleet broker" not in (work / "ingest.log").read_text():
                    time.sleep(0.2)
                children += [start_daemon(work, broker.port, f"daemon-{i}") for i in range(args.daemons)]
                vehicles = [f"car-{i:05d}" for i in range(args.vehicles)]
                fleet = SimulatedFleet(
                    broker.port,
                    vehicles,
                    RulesConfig.model_validate({"stress": {"sustain_s": 10}}),
                    args.health_interval,
                )
                total = args.vehicles + args.daemons
                wait_for(
                    dsn,
                    "SELECT count(*) FROM health_latest h JOIN rules_state USING (vehicle_id)",
                    total,
                    300,
                    "vehicles stored",
                )
                time.sleep(args.wait + 1.0)  # the canary's 'before'
                print(
                    f"{args.vehicles} simulated vehicles + {args.daemons} real daemons, canary {args.canary} %, "
                    f"observed {args.wait:.0f} s, two waves, {args.max_per_minute:.0f} requests/min at most"
                )
                bad_s = rollout(work, broker.port, dsn, "bench-abort", "stress.sustain_s=1", args)
                print(f"\nabort: stress.sustain_s=1 (canary alerts 10x): {bad_s:.1f} s end to end")
                print("\n".join(timeline(dsn, "bench-abort")))
                print(f"  simulated vehicles' overrides after: {fleet.overrides()}")
                time.sleep(args.wait + 1.0)  # a fresh 'before' once the canary is back
                good_s = rollout(work, broker.port, dsn, "bench-done", "stress.cooldown_s=45", args)
                print(f"\ndone: stress.cooldown_s=45: {good_s:.1f} s end to end")
                print("\n".join(timeline(dsn, "bench-done")))
                print(f"  simulated vehicles' overrides after: {fleet.overrides()}")
                with psycopg.connect(dsn) as conn:
                    real = conn.execute(
                        "SELECT vehicle_id, cause, payload #> '{rules,stress,cooldown_s}' FROM rules_state "
                        "WHERE vehicle_id LIKE 'daemon-%%' ORDER BY 1"
                    ).fetchall()
                print(f"  real daemons' rules/state: {real}")
        finally:
            if fleet is not None:
                fleet.close()
            for child in children:
                child.terminate()
            for child in children:
                try:
                    child.wait(30)
                except subprocess.TimeoutExpired:
                    child.kill()


if __name__ == "__main__":
    main()
