"""The fleet side under test: a PostgreSQL database per test, the fleet broker with the repo's ACL, ingest processes.

``fresh_database`` creates a uniquely named database on the PostgreSQL server at ``CABIN_FLEET_TEST_PG``
(default ``postgresql://postgres@127.0.0.1:5432/postgres``) and drops it afterwards; ``pg_server_dsn``
says why no server can be reached, for a skip (``requires_postgres``); ``fleet_database`` is one with the fleet schema.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from psycopg import sql

from cabin_monitor.bus.payloads import (
    CameraHealth,
    EventPayload,
    HealthPayload,
    ModelHealth,
    MqttHealth,
    OutboxHealth,
    PipelineHealth,
    utc_iso,
)
from cabin_monitor.config import RulesConfig, parse_mqtt_url
from cabin_monitor.fleet.db import upgrade
from cabin_monitor.messages import RemoteRequest
from tests.support.broker import MosquittoBroker
from tests.support.helpers import exit_code
from tests.support.pki import TestPki
from tests.support.vehicle_rules import VehicleRules

REPO = Path(__file__).resolve().parent.parent.parent
FLEET_ACL = REPO / "deploy" / "mosquitto" / "acl"
SERVER_DSN = os.environ.get("CABIN_FLEET_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
PASSWORD = "secret"  # every test account's


def pg_unreachable_reason() -> str | None:
    """Why the test PostgreSQL server cannot be used, or None when it can."""
    try:
        with psycopg.connect(SERVER_DSN, connect_timeout=3):
            return None
    except psycopg.OperationalError as exc:
        return f"no PostgreSQL server at {SERVER_DSN} ({str(exc).strip()[:200]}); set CABIN_FLEET_TEST_PG"


@contextlib.contextmanager
def fresh_database(server_dsn: str = SERVER_DSN) -> Iterator[str]:
    """A new, empty database (DSN) on ``server_dsn``'s server, dropped on exit with any session still connected."""
    name = f"cabin_fleet_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base, _, _ = server_dsn.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


class DeepQueueBroker(MosquittoBroker):
    """The test broker (anonymous) with the fleet broker's deep per-session queue (deploy/mosquitto/mosquitto.conf),
    for the benchmarks' load."""

    def _write_config(self) -> None:
        super()._write_config()
        with self.config_file.open("a") as config:
            config.write("max_queued_messages 1000000\n")


@contextlib.contextmanager
def fleet_database(server_dsn: str = SERVER_DSN) -> Iterator[str]:
    """A fresh database (DSN) with the fleet schema, dropped on exit."""
    with fresh_database(server_dsn) as dsn:
        upgrade(dsn)
        yield dsn


def requires_postgres() -> pytest.MarkDecorator:
    """A mark skipping a module's tests when the test PostgreSQL server cannot be reached."""
    reason = pg_unreachable_reason()
    return pytest.mark.skipif(reason is not None, reason=str(reason))


def query(dsn: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The rows of one statement."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(statement.encode(), params).fetchall()


def fleet_broker(directory: Path, vehicles: list[str], *, pki: TestPki | None = None) -> MosquittoBroker:
    """The fleet broker (not started, persistent): password accounts for the vehicles and the fleet identities,
    the repo's ACL, and with ``pki`` a TLS listener too."""
    accounts = {name: PASSWORD for name in (*vehicles, "fleet-ingest", "fleet-rollout", "fleet-operator")}
    return MosquittoBroker(directory, persistence=True, pki=pki, passwords=accounts, acl=FLEET_ACL.read_text())


def account_url(broker_url: str, account: str) -> str:
    """``mqtt://account:secret@host:port`` for a broker's plain listener."""
    host, port, _ = parse_mqtt_url(broker_url)
    return f"mqtt://{account}:{PASSWORD}@{host}:{port}"


def event_json(
    vehicle_id: str, *, event_id: str | None = None, ts_s: float | None = None, rule: str = "stress"
) -> bytes:
    """A valid ``start`` event payload, as the daemon writes it."""
    payload = EventPayload(
        event_id=event_id or str(uuid.uuid4()),
        vehicle_id=vehicle_id,
        type=rule,
        phase="start",
        occupant_id="occupant-1",
        seat="driver",
        ts=utc_iso(time.time() if ts_s is None else ts_s),
        score=0.8,
        emotions={"anger": 0.6, "neutral": 0.4},
        rule=rule,
        severity="warning",
        frame_id=1,
    )
    return payload.model_dump_json().encode()


class Publisher:
    """An MQTT 5 client logged in as one account that publishes at QoS 1 and waits for each PUBACK."""

    def __init__(
        self,
        broker_url: str,
        account: str,
        *,
        client_id: str | None = None,
        persistent: bool = False,
        on_message: Callable[[mqtt.Client, object, mqtt.MQTTMessage], None] | None = None,
    ) -> None:
        """With ``persistent``, the broker keeps the session (subscriptions, queued messages) for an hour after a
        disconnect; ``on_message`` is in place before connecting, so nothing queued meanwhile is missed."""
        host, port, _ = parse_mqtt_url(broker_url)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or f"pub-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
        )
        self.client.username_pw_set(account, PASSWORD)
        self._connected = threading.Event()
        self.client.on_connect = lambda *_a: self._connected.set()
        self.client.on_message = on_message
        self._acks: dict[int, int] = {}
        self._acked = threading.Condition()
        self.client.on_publish = self._on_publish
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 3600 if persistent else 0
        self.client.connect(host, port, keepalive=10, clean_start=not persistent, properties=properties)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise TimeoutError(f"{account} could not connect to {broker_url}")

    def _on_publish(self, _c: mqtt.Client, _u: object, mid: int, reason: Any, _p: object) -> None:
        with self._acked:
            self._acks[mid] = int(reason.value)
            self._acked.notify_all()

    def publish(self, topic: str, payload: bytes, timeout_s: float = 10.0) -> int:
        """Publish at QoS 1 and wait for the PUBACK; its reason code (0: accepted, 135: not authorized)."""
        with self._acked:
            info = self.client.publish(topic, payload, qos=1)
            if not self._acked.wait_for(lambda: info.mid in self._acks, timeout_s):
                raise TimeoutError(f"no PUBACK for {topic} within {timeout_s} s")
            return self._acks.pop(info.mid)

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FleetCommand:
    """``python -m cabin_monitor fleet ARGS`` as a child process, output in a file."""

    def __init__(self, directory: Path, args: list[str], env: Mapping[str, str] | None = None) -> None:
        self.log_path = directory / f"fleet-{args[0]}-{time.monotonic_ns()}.log"
        environment = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cabin_monitor", "fleet", *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=environment,
            )

    def output(self) -> str:
        """What it printed so far."""
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout_s: float = 60.0) -> int:
        """The exit code; AssertionError (with its output) when it runs longer than ``timeout_s``."""
        return exit_code(self.proc, timeout_s, f"fleet command still running after {timeout_s} s:", self.output)

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait for the exit code."""
        self.proc.terminate()
        return self.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL: nothing committed or acknowledged after this."""
        self.proc.kill()
        self.proc.wait(10)


def ingest(directory: Path, broker_url: str, dsn: str, client_id: str, *extra: str) -> FleetCommand:
    """``fleet ingest`` logged in as fleet-ingest with a fixed client id."""
    url = account_url(broker_url, "fleet-ingest")
    return FleetCommand(directory, ["ingest", "--broker", url, "--db", dsn, "--client-id", client_id, *extra])


BRIDGE_SCRIPT = REPO / "deploy" / "mosquitto" / "bridge.sh"


class BridgedVehicleBroker(MosquittoBroker):
    """A vehicle's local Mosquitto (plain, anonymous, persistent) with the repo's bridge to a fleet broker.

    The bridge section is what ``deploy/mosquitto/bridge.sh`` renders for ``vehicle_id``, logging in over
    TLS with the vehicle's password.
    """

    def __init__(self, directory: Path, fleet: MosquittoBroker, vehicle_id: str) -> None:
        super().__init__(directory, persistence=True)
        if fleet.pki is None:
            raise ValueError("the fleet broker needs a TLS listener (pki=...)")
        password_file = directory / "bridge-password"
        password_file.write_text(PASSWORD + "\n")
        command = [
            "sh", str(BRIDGE_SCRIPT), "--fleet", fleet.tls_url, "--vehicle-id", vehicle_id,
            "--ca", str(fleet.pki.ca_file), "--password-file", str(password_file),
        ]  # fmt: skip
        self.bridge_text = subprocess.run(command, capture_output=True, text=True, check=True, timeout=30).stdout

    def _write_config(self) -> None:
        super()._write_config()
        with self.config_file.open("a") as config:
            config.write(self.bridge_text)


class SimulatedVehicle:
    """A vehicle on the fleet broker that answers config requests as the daemon does (``VehicleRules``).

    It publishes ``rules/state`` at start and on every change, ``health`` every ``health_interval_s``, and a
    ``stress`` start event every ``stress.sustain_s`` of the rules in force, so its alert rate follows the
    rules an operator sets.
    """

    def __init__(
        self,
        broker_url: str,
        vehicle_id: str,
        base: RulesConfig,
        health_interval_s: float = 0.5,
        *,
        persistent: bool = False,
    ) -> None:
        self.vehicle_id = vehicle_id
        self.control = VehicleRules(base)
        self.health_interval_s = health_interval_s
        self._stop = threading.Event()
        self.publisher = Publisher(
            broker_url, vehicle_id, client_id=vehicle_id, persistent=persistent, on_message=self._on_request
        )
        client = self.publisher.client
        client.subscribe([(f"cabin/{vehicle_id}/config/{a}", 1) for a in ("set", "get", "reset")])
        self._publish_state("start", None)
        self._thread = threading.Thread(target=self._run, name=f"sim-{vehicle_id}", daemon=True)
        self._thread.start()

    def _on_request(self, client: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        action = msg.topic.rsplit("/", 1)[1]
        request = RemoteRequest(action, bytes(msg.payload), retained=bool(msg.retain), received_s=time.monotonic())  # type: ignore[arg-type]
        answer = self.control.handle(request)
        # From paho's network thread: publish without waiting for the PUBACK, which this thread delivers.
        client.publish(f"cabin/{self.vehicle_id}/config/result", answer.model_dump_json(), qos=1)
        if answer.ok and action != "get":
            client.publish(
                f"cabin/{self.vehicle_id}/rules/state",
                self.control.state(self.vehicle_id, f"config/{action}", answer.request_id).model_dump_json(),  # type: ignore[arg-type]
                qos=1,
                retain=True,
            )

    def _publish_state(self, cause: str, request_id: str | None) -> None:
        state = self.control.state(self.vehicle_id, cause, request_id)  # type: ignore[arg-type]
        self.publisher.client.publish(
            f"cabin/{self.vehicle_id}/rules/state", state.model_dump_json(), qos=1, retain=True
        )

    def _run(self) -> None:
        next_health = next_alert = time.monotonic()
        while not self._stop.wait(0.02):
            now = time.monotonic()
            if now >= next_health:
                next_health = now + self.health_interval_s
                self.publisher.client.publish(f"cabin/{self.vehicle_id}/health", health_json(self.vehicle_id), qos=1)
            if now >= next_alert:
                next_alert = now + float(self.control.effective.stress.sustain_s)
                self.publisher.client.publish(f"cabin/{self.vehicle_id}/events", event_json(self.vehicle_id), qos=1)

    def overrides(self) -> dict[str, Any]:
        """Path -> value of every remote override in force."""
        return self.control.overrides()

    def close(self) -> None:
        """Stop publishing and disconnect."""
        self._stop.set()
        self._thread.join(5)
        self.publisher.close()


def health_json(vehicle_id: str) -> bytes:
    """A valid health payload of a vehicle doing well."""
    payload = HealthPayload(
        vehicle_id=vehicle_id,
        ts=utc_iso(time.time()),
        status="ok",
        camera=CameraHealth(state="streaming", source="0", fps=30.0, frames=1, corrupt_frames=0, reopen_count=0),
        pipeline=PipelineHealth(fps=30.0, frames_processed=1, dropped_frames=0, stale_frames=0),
        model=ModelHealth(path="m.onnx", providers_requested=["CPUExecutionProvider"], provider_in_use="CPU"),
        outbox=OutboxHealth(state="ok", depth=0, memory_depth=0, dropped_total=0, dropped_by_reason={}),
        mqtt=MqttHealth(connected=True, reconnects=0, refused_events=0),
    )
    return payload.model_dump_json().encode()


def health_at(vehicle_id: str, ts_s: float) -> bytes:
    """A health payload stamped ``ts_s``."""
    data = json.loads(health_json(vehicle_id))
    data["ts"] = json.loads(event_json(vehicle_id, ts_s=ts_s))["ts"]
    return json.dumps(data).encode()


def shadow_event_json(vehicle_id: str, ts_s: float, phase: str = "start") -> bytes:
    """A shadow rules' event of ``vehicle_id`` (the payload of a live one) stamped ``ts_s``."""
    return json.dumps({**json.loads(event_json(vehicle_id, ts_s=ts_s)), "phase": phase}).encode()
