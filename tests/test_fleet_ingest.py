"""fleet db upgrade and fleet ingest: a real fleet broker (passwords, the repo's ACL), real PostgreSQL and processes."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cabin_monitor.config import RulesConfig
from cabin_monitor.fleet.db import applied_versions, upgrade
from tests.support.broker import MosquittoBroker
from tests.support.fleet import (
    FleetCommand,
    Publisher,
    event_json,
    fleet_broker,
    fresh_database,
    ingest,
    query,
    requires_postgres,
)
from tests.support.helpers import wait_until
from tests.support.vehicle_rules import VehicleRules

pytestmark = requires_postgres()

VEHICLES = ["car-1", "car-2", "car-3"]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """The fleet broker with persistence, password accounts and the repo's ACL."""
    with fleet_broker(tmp_path / "fleet-broker", VEHICLES) as b:
        yield b


def rules_state_json(vehicle_id: str) -> bytes:
    """The retained rules/state a daemon publishes at start, made by the daemon's own request handling."""
    return VehicleRules(RulesConfig()).state(vehicle_id, "start").model_dump_json().encode()


def event_count(dsn: str) -> int:
    """Rows in ``events``."""
    return int(query(dsn, "SELECT count(*) FROM events")[0][0])


def test_upgrade_is_versioned_and_runs_again_as_a_no_op() -> None:
    """A new database gets every migration once; a second upgrade applies nothing and changes nothing."""
    with fresh_database() as url:
        assert upgrade(url) == [1, 2, 3, 4]
        assert upgrade(url) == []
        assert applied_versions(url) == [1, 2, 3, 4]


def connections(worker: FleetCommand) -> int:
    """How often an ingest process has connected to the broker so far."""
    return worker.output().count("connected to the fleet broker")


def send_events(car: Publisher, vehicle: str, n: int, sent: set[str]) -> None:
    """Publish ``n`` new events of ``vehicle``, each twice (a vehicle re-sending the same bytes)."""
    for _ in range(n):
        event_id = str(uuid.uuid4())
        sent.add(event_id)
        payload = event_json(vehicle, event_id=event_id)
        assert car.publish(f"cabin/{vehicle}/events", payload) == 0
        assert car.publish(f"cabin/{vehicle}/events", payload) == 0


def test_every_event_is_stored_once_across_an_ingest_kill_and_a_broker_restart(
    tmp_path: Path, broker: MosquittoBroker, dsn: str
) -> None:
    """Each event sent twice; ingest SIGKILLed, the broker restarted, ingest SIGTERMed mid-stream: each stored once."""
    sent: set[str] = set()
    worker = ingest(tmp_path, broker.url, dsn, "ingest-a", "--batch-size", "50")
    wait_until(lambda: connections(worker) == 1, 30, "ingest connected")
    with Publisher(broker.url, "car-1") as car1, Publisher(broker.url, "car-2") as car2:
        send_events(car1, "car-1", 60, sent)
        worker.kill()  # batches received, maybe committed, not all acknowledged
        send_events(car2, "car-2", 60, sent)  # queued in the ingest session meanwhile
    worker = ingest(tmp_path, broker.url, dsn, "ingest-a", "--batch-size", "50")
    wait_until(lambda: connections(worker) == 1, 30, "ingest connected again")
    with Publisher(broker.url, "car-3") as car3:
        send_events(car3, "car-3", 60, sent)
    broker.restart()  # with messages in flight to ingest, unacknowledged
    wait_until(lambda: connections(worker) == 2, 30, "ingest reconnected")
    with Publisher(broker.url, "car-3") as car3:
        sending = threading.Thread(target=send_events, args=(car3, "car-3", 150, sent))
        sending.start()
        time.sleep(0.3)
        started = time.monotonic()
        assert worker.terminate() == 0, worker.output()  # SIGTERM mid-stream: commit, acknowledge, exit
        assert time.monotonic() - started < 10
        sending.join(30)
    worker = ingest(tmp_path, broker.url, dsn, "ingest-a", "--batch-size", "50")
    wait_until(lambda: connections(worker) == 1, 30, "ingest connected after SIGTERM")
    wait_until(lambda: event_count(dsn) >= len(sent), 60, f"{len(sent)} events stored")
    time.sleep(1.0)  # room for a late duplicate to show up
    assert worker.terminate() == 0, worker.output()
    stored = {str(r[0]) for r in query(dsn, "SELECT event_id FROM events")}
    assert stored == sent and event_count(dsn) == len(sent)
    assert "ingest stopped" in worker.output()


def test_a_resent_end_with_a_later_time_is_still_stored_once(tmp_path: Path, broker: MosquittoBroker, dsn: str) -> None:
    """Same event_id, different ts (an end sent again as interrupted after a crash): one row, the first copy."""
    worker = ingest(tmp_path, broker.url, dsn, "ingest-a")
    event_id = str(uuid.uuid4())
    with Publisher(broker.url, "car-1") as car:
        wait_until(lambda: "connected to the fleet broker" in worker.output(), 30, "ingest connected")
        car.publish("cabin/car-1/events", event_json("car-1", event_id=event_id, ts_s=1_780_000_000.0))
        car.publish("cabin/car-1/events", event_json("car-1", event_id=event_id, ts_s=1_790_000_000.0))
        marker = str(uuid.uuid4())
        car.publish("cabin/car-1/events", event_json("car-1", event_id=marker))
    wait_until(lambda: bool(query(dsn, "SELECT 1 FROM events WHERE event_id = %s", (marker,))), 30, "marker stored")
    assert worker.terminate() == 0
    rows = query(dsn, "SELECT extract(epoch FROM ts) FROM events WHERE event_id = %s", (event_id,))
    assert [float(r[0]) for r in rows] == [1_780_000_000.0]


def test_bad_payloads_go_to_quarantine_with_their_reason_and_the_stream_goes_on(
    tmp_path: Path, broker: MosquittoBroker, dsn: str
) -> None:
    """Each kind of bad payload (and one PostgreSQL refuses) is quarantined with its reason; the rest is stored."""
    good = json.loads(event_json("car-1"))
    bad = {
        "not_utf8": b"\xff\xfe{",
        "bad_json": b"{not json",
        "not_an_object": b"[1, 2]",
        "unknown_schema_version": json.dumps({**good, "schema_version": 2}).encode(),
        "vehicle_mismatch": json.dumps({**good, "vehicle_id": "car-2"}).encode(),
        "invalid_payload": json.dumps({**good, "phase": "middle"}).encode(),
        "implausible_time": json.dumps({**good, "ts": "1970-01-01T00:00:00.000Z"}).encode(),
        # Valid JSON and a valid payload, but PostgreSQL's jsonb takes no lone surrogate.
        "refused_by_store": json.dumps({**good, "occupant_id": "\ud800"}).encode(),
    }
    with Publisher(broker.url, "car-1") as car:  # before ingest ever subscribed: retained only
        car.client.publish("cabin/car-1/rules/state", rules_state_json("car-1"), qos=1, retain=True).wait_for_publish(
            10
        )
    worker = ingest(tmp_path, broker.url, dsn, "ingest-a")
    last = str(uuid.uuid4())
    with Publisher(broker.url, "car-1") as car:
        wait_until(lambda: "connected to the fleet broker" in worker.output(), 30, "ingest connected")
        for payload in bad.values():
            assert car.publish("cabin/car-1/events", payload) == 0
        assert car.publish("cabin/car-1/health", b'{"schema_version": 1, "vehicle_id": "car-1"}') == 0
        assert car.publish("cabin/car-1/status", b"online") == 0
        assert car.publish("cabin/car-1/events", event_json("car-1", event_id=last)) == 0
    wait_until(lambda: bool(query(dsn, "SELECT 1 FROM events WHERE event_id = %s", (last,))), 30, "last event stored")
    assert worker.terminate() == 0, worker.output()
    rows = query(dsn, "SELECT topic, payload, reason, detail FROM quarantine ORDER BY id")
    by_reason = {r[2]: (r[0], bytes(r[1])) for r in rows if r[0] == "cabin/car-1/events"}
    assert by_reason == {reason: ("cabin/car-1/events", payload) for reason, payload in bad.items()}
    assert [r[2] for r in rows if r[0] == "cabin/car-1/health"] == ["invalid_payload"]
    assert query(dsn, "SELECT status FROM vehicle_status WHERE vehicle_id = 'car-1'") == [("online",)]
    assert event_count(dsn) == 1
    assert query(dsn, "SELECT vehicle_id, cause FROM rules_state") == [("car-1", "start")]


def test_shadow_events_are_stored_apart_and_a_lying_vehicle_id_is_quarantined(
    tmp_path: Path, broker: MosquittoBroker, dsn: str
) -> None:
    """shadow/events (QoS 0, one sent twice) land in shadow_events only; one naming another vehicle is quarantined."""
    worker = ingest(tmp_path, broker.url, dsn, "ingest-a")
    shadow_ids = [str(uuid.uuid4()) for _ in range(3)]
    live_id = str(uuid.uuid4())
    lying = event_json("car-2")
    with Publisher(broker.url, "car-1") as car:
        wait_until(lambda: "connected to the fleet broker" in worker.output(), 30, "ingest connected")
        for event_id in [*shadow_ids, shadow_ids[0]]:
            car.client.publish("cabin/car-1/shadow/events", event_json("car-1", event_id=event_id), qos=0)
        car.client.publish("cabin/car-1/shadow/events", lying, qos=0)
        assert car.publish("cabin/car-1/events", event_json("car-1", event_id=live_id)) == 0
        wait_until(
            lambda: (
                query(dsn, "SELECT count(*) FROM shadow_events")[0][0] == 3
                and query(dsn, "SELECT count(*) FROM quarantine")[0][0] == 1
                and event_count(dsn) == 1
            ),
            30,
            "shadow events, the quarantined one and the live event stored",
        )
    time.sleep(0.5)  # room for a late duplicate to show up
    assert worker.terminate() == 0, worker.output()
    assert sorted(str(r[0]) for r in query(dsn, "SELECT event_id FROM shadow_events")) == sorted(shadow_ids)
    assert [str(r[0]) for r in query(dsn, "SELECT event_id FROM events")] == [live_id]
    assert query(dsn, "SELECT topic, payload, reason FROM quarantine") == [
        ("cabin/car-1/shadow/events", lying, "vehicle_mismatch")
    ]
    totals = json.loads(worker.output().strip().splitlines()[-1])
    assert (totals["event"], totals["shadow_events_new"], totals["shadow_events_duplicate"]) == ("ingest stopped", 3, 1)
