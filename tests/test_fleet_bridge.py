"""The vehicle-to-fleet bridge (deploy/mosquitto/bridge.sh) and the fleet ACL: real brokers, ingest, PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.support.broker import MosquittoBroker
from tests.support.fleet import (
    BridgedVehicleBroker,
    Publisher,
    event_json,
    fleet_broker,
    ingest,
    query,
    requires_postgres,
)
from tests.support.helpers import wait_until
from tests.support.pki import make_test_pki

pytestmark = requires_postgres()


def anonymous_publish(broker: MosquittoBroker, topic: str, payloads: list[bytes]) -> None:
    """Publish on the vehicle's local broker as the daemon does (QoS 1, no account), each acknowledged."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"daemon-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    for payload in payloads:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def stored_ids(dsn: str) -> list[str]:
    """Every stored event_id (with repeats, were there any)."""
    return [str(r[0]) for r in query(dsn, "SELECT event_id FROM events")]


def test_events_published_while_the_fleet_broker_is_down_all_arrive_once_after(tmp_path: Path, dsn: str) -> None:
    """Vehicle broker bridged over TLS; fleet broker stopped, 50 events published locally, started: 50 stored once."""
    pki = make_test_pki(tmp_path / "pki")
    with (
        fleet_broker(tmp_path / "fleet", ["car-1"], pki=pki) as fleet,
        BridgedVehicleBroker(tmp_path / "vehicle", fleet, "car-1") as vehicle,
    ):
        worker = ingest(tmp_path, fleet.url, dsn, "ingest-a")
        first = [event_json("car-1") for _ in range(5)]
        wait_until(lambda: "connected to the fleet broker" in worker.output(), 30, "ingest connected")
        anonymous_publish(vehicle, "cabin/car-1/events", first)
        wait_until(lambda: len(stored_ids(dsn)) == 5, 30, "events through the bridge")
        fleet.stop()
        offline = [event_json("car-1") for _ in range(50)]
        anonymous_publish(vehicle, "cabin/car-1/events", offline)
        fleet.start()
        wait_until(lambda: len(stored_ids(dsn)) >= 55, 60, "events queued on the vehicle stored")
        assert worker.terminate() == 0, worker.output()
    ids = stored_ids(dsn)
    assert len(ids) == len(set(ids)) == 55


class Subscriber:
    """An MQTT 5 client of one account that records what it receives and the reason codes of its SUBACKs."""

    def __init__(self, broker: MosquittoBroker, account: str, topics: list[str]) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.granted: list[int] = []
        self._ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sub-{account}", protocol=mqtt.MQTTv5)
        self.client.username_pw_set(account, "secret")
        self.client.on_connect = lambda c, *_: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda _c, _u, m: self.messages.append((m.topic, bytes(m.payload)))
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert self._ready.wait(10), f"{account} could not subscribe"

    def _on_subscribe(self, _c: mqtt.Client, _u: object, _mid: int, codes: list[ReasonCode], _p: Properties) -> None:
        self.granted = [int(c.value) for c in codes]
        self._ready.set()

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


def test_fleet_acl_limits_the_ingest_and_rollout_identities(tmp_path: Path) -> None:
    """Ingest reads vehicles' topics and writes nothing; rollout writes only config/set and config/reset."""
    with fleet_broker(tmp_path / "fleet", ["car-1"]) as fleet:
        ingest_sub = Subscriber(fleet, "fleet-ingest", ["$share/g/cabin/+/events", "cabin/+/config/set"])
        rollout_sub = Subscriber(fleet, "fleet-rollout", ["cabin/+/config/result", "cabin/+/health"])
        car_sub = Subscriber(fleet, "car-1", ["cabin/car-1/config/set", "cabin/car-1/config/reset"])
        assert ingest_sub.granted[0] == 1 and rollout_sub.granted[0] == 1
        with Publisher(fleet.url, "fleet-ingest") as as_ingest, Publisher(fleet.url, "fleet-rollout") as as_rollout:
            assert as_ingest.publish("cabin/car-1/config/set", b'{"rules": {}}') == 135  # not authorized
            assert as_ingest.publish("cabin/car-1/events", event_json("car-1")) == 135
            assert as_rollout.publish("cabin/car-1/events", event_json("car-1")) == 135
            assert as_rollout.publish("cabin/car-1/config/get", b"{}") == 135
            assert as_rollout.publish("cabin/car-1/config/reset", b"{}") == 0
            assert as_rollout.publish("cabin/car-1/config/set", b'{"rules": {}}') == 0
        with Publisher(fleet.url, "car-1") as car:
            assert car.publish("cabin/car-2/events", event_json("car-2")) == 135  # only under its own id
            assert car.publish("cabin/car-1/health", b"{}") == 0
            assert car.publish("cabin/car-1/config/result", b"{}") == 0
        wait_until(lambda: len(car_sub.messages) == 2, 10, "the car got its requests")
        wait_until(lambda: len(rollout_sub.messages) == 1, 10, "rollout got the answer")
        assert [t for t, _ in rollout_sub.messages] == ["cabin/car-1/config/result"]  # health is not its to read
        assert [t for t, _ in ingest_sub.messages] == []  # config/set is not ingest's to read
        for sub in (ingest_sub, rollout_sub, car_sub):
            sub.close()
