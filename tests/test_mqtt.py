"""The MQTT sink against a real Mosquitto: delivery, availability, outages, refusals, remote config, TLS."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, MutableMapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt import publish as mqtt_publish
from pydantic import SecretStr
from structlog.testing import capture_logs

from cabin_monitor.bus.mqtt import MqttSink, TlsSetupError
from cabin_monitor.bus.outbox import Outbox
from cabin_monitor.bus.payloads import (
    ConfigResultPayload,
    ConfigSetPayload,
    event_payload,
    health_payload,
    state_payloads,
    utc_iso,
)
from cabin_monitor.bus.remote import answer_config_set
from cabin_monitor.config import MqttConfig, TlsConfig
from cabin_monitor.messages import CameraState, Event
from cabin_monitor.rules import OccupantState
from tests.support.broker import MosquittoBroker, MqttRecorder, RecordedMessage, free_port
from tests.support.helpers import capturing_logger, make_event, make_health, wait_until
from tests.support.pki import make_test_pki

REPO = Path(__file__).resolve().parents[1]  # the child imports tests.support from here
BASE = "cabin/car-1"
FAST = {"reconnect_min_s": 0.05, "reconnect_max_s": 0.5, "keepalive_s": 5, "max_inflight": 5}

# Runs an MqttSink in a child process so that the test can SIGKILL it: argv = url, outbox path, event ids.
CHILD = """
import sys, time
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
from cabin_monitor.config import MqttConfig
from cabin_monitor.bus.outbox import Outbox
from cabin_monitor.bus.mqtt import MqttSink
from tests.support.helpers import make_event
url, outbox_path, *event_ids = sys.argv[1:]
sink = MqttSink(MqttConfig(url=url, reconnect_min_s=0.05, reconnect_max_s=0.5), "car-1", Outbox(outbox_path))
for event_id in event_ids:
    sink.submit_event(make_event(event_id=event_id))
sink.start()
print("ready", flush=True)
time.sleep(60)
"""


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    """An empty outbox in the test's folder."""
    with Outbox(tmp_path / "outbox.sqlite") as box:
        yield box


@pytest.fixture
def persistent_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A broker that keeps sessions and queued messages across stop/start."""
    with MosquittoBroker(tmp_path / "persistent-mosquitto", persistence=True) as broker:
        yield broker


def make_sink(url: str, outbox: Outbox, **options: Any) -> MqttSink:
    """A started sink with fast reconnects."""
    sink_options = {k: options.pop(k) for k in ("on_config_set", "logger") if k in options}
    sink = MqttSink(MqttConfig(url=url, **(FAST | options)), "car-1", outbox, **sink_options)
    sink.start()
    return sink


def event_ids(messages: list[RecordedMessage]) -> list[str]:
    """Event ids in arrival order, duplicates removed (keeping the first)."""
    seen: dict[str, None] = {}
    for m in messages:
        seen.setdefault(json.loads(m.payload)["event_id"], None)
    return list(seen)


def expected_bytes(event: Event) -> bytes:
    return event_payload(event, "car-1").model_dump_json().encode()


def test_events_arrive_once_in_order(mqtt_broker: MosquittoBroker, outbox: Outbox) -> None:
    """Events are published at QoS 1 as EventPayload JSON, once each, in order, and leave the outbox."""
    events = [make_event(frame_id=i) for i in range(30)]
    with capture_logs() as logs, MqttRecorder(mqtt_broker.url, [f"{BASE}/events"]) as recorder:
        sink = make_sink(mqtt_broker.url, outbox)
        for event in events:
            sink.submit_event(event)
        recorder.wait_for(lambda ms: len(ms) >= len(events))
        wait_until(lambda: sink.stats().outbox_depth == 0, what="empty outbox")
        sink.stop(flush_timeout_s=2.0)
        for what in ("event accepted", "event delivered"):
            lines = [e for e in logs if e["event"] == what]
            assert [e["event_id"] for e in lines] == [e.event_id for e in events], what
            assert all(e["type"] == events[0].type and e["phase"] == events[0].phase for e in lines), what
        assert [m.payload for m in recorder.messages] == [expected_bytes(e) for e in events]
        stats = sink.stats()
        assert stats.published_total == 30 and stats.dropped_total == 0 and not stats.connected


def test_status_online_then_offline_on_stop(mqtt_broker: MosquittoBroker, outbox: Outbox) -> None:
    """'online' is retained after connecting; a clean stop leaves a retained 'offline'."""
    sink = make_sink(mqtt_broker.url, outbox)
    wait_until(lambda: sink.stats().connected, what="connected")
    with MqttRecorder(mqtt_broker.url, [f"{BASE}/status"], clean_session=True, client_id="r1") as recorder:
        recorder.wait_for(lambda ms: RecordedMessage(f"{BASE}/status", b"online", True) in ms)
        sink.stop(flush_timeout_s=1.0)
        recorder.wait_for(lambda ms: ms[-1].payload == b"offline")
    with MqttRecorder(mqtt_broker.url, [f"{BASE}/status"], clean_session=True, client_id="r2") as late:
        late.wait_for(lambda ms: ms == [RecordedMessage(f"{BASE}/status", b"offline", True)])


def test_last_will_when_killed(mqtt_broker: MosquittoBroker, tmp_path: Path) -> None:
    """A SIGKILLed daemon's broker publishes the retained 'offline' last will."""
    with MqttRecorder(mqtt_broker.url, [f"{BASE}/status"], clean_session=True) as recorder:
        child = subprocess.Popen([sys.executable, "-c", CHILD, mqtt_broker.url, str(tmp_path / "o.sqlite")], cwd=REPO)
        try:
            recorder.wait_for(lambda ms: [m.payload for m in ms] == [b"online"], timeout_s=30)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        recorder.wait_for(lambda ms: [m.payload for m in ms] == [b"online", b"offline"])
    with MqttRecorder(mqtt_broker.url, [f"{BASE}/status"], clean_session=True, client_id="late") as late:
        late.wait_for(lambda ms: ms == [RecordedMessage(f"{BASE}/status", b"offline", True)])


def test_new_sink_sends_what_a_killed_one_left(mqtt_broker: MosquittoBroker, tmp_path: Path) -> None:
    """Events submitted by a daemon killed before it could publish are sent by the next one, in order."""
    path = tmp_path / "outbox.sqlite"
    ids = [make_event().event_id for _ in range(5)]
    unreachable = f"mqtt://127.0.0.1:{free_port()}"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, unreachable, str(path), *ids], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    with MqttRecorder(mqtt_broker.url, [f"{BASE}/events"]) as recorder, Outbox(path) as outbox:
        assert outbox.depth() == 5
        sink = make_sink(mqtt_broker.url, outbox)
        recorder.wait_for(lambda ms: len(event_ids(ms)) >= 5)
        wait_until(lambda: outbox.depth() == 0, what="empty outbox")
        sink.stop(flush_timeout_s=1.0)
        assert event_ids(recorder.messages) == ids


def test_broker_restart_mid_stream(persistent_broker: MosquittoBroker, outbox: Outbox) -> None:
    """With the broker stopped and restarted mid-stream, every event arrives, in order after de-duplication."""
    events = [make_event(frame_id=i) for i in range(60)]
    submitted = threading.Semaphore(0)

    def feed() -> None:
        for event in events:
            sink.submit_event(event)
            submitted.release()
            time.sleep(0.01)

    with MqttRecorder(persistent_broker.url, [f"{BASE}/events"]) as recorder:
        sink = make_sink(persistent_broker.url, outbox)
        wait_until(lambda: sink.stats().connected, what="connected")
        feeder = threading.Thread(target=feed)
        feeder.start()
        for _ in range(20):
            submitted.acquire(timeout=10)
        persistent_broker.stop()
        for _ in range(20):
            submitted.acquire(timeout=10)
        persistent_broker.start()
        feeder.join(10)
        recorder.wait_for(lambda ms: len(event_ids(ms)) >= len(events), timeout_s=20)
        wait_until(lambda: outbox.depth() == 0, what="empty outbox")
        sink.stop(flush_timeout_s=1.0)
        assert event_ids(recorder.messages) == [e.event_id for e in events]
        assert sink.stats().reconnects >= 1


def test_events_kept_while_broker_down(persistent_broker: MosquittoBroker, outbox: Outbox) -> None:
    """Events submitted while the broker is down wait in the outbox and are sent after it returns."""
    with MqttRecorder(persistent_broker.url, [f"{BASE}/events"]) as recorder:
        sink = make_sink(persistent_broker.url, outbox)
        wait_until(lambda: sink.stats().connected, what="connected")
        persistent_broker.stop()
        wait_until(lambda: not sink.stats().connected, what="disconnected")
        events = [make_event(severity="critical") for _ in range(5)]
        for event in events:
            sink.submit_event(event)
        assert sink.stats().outbox_depth == 5
        persistent_broker.start()
        recorder.wait_for(lambda ms: len(event_ids(ms)) >= 5, timeout_s=20)
        wait_until(lambda: outbox.depth() == 0, what="empty outbox")
        sink.stop(flush_timeout_s=1.0)
        assert event_ids(recorder.messages) == [e.event_id for e in events]


def test_health_retained_latest_wins_and_state(mqtt_broker: MosquittoBroker, outbox: Outbox) -> None:
    """Health given while offline is published retained on connect (latest only); states go out at QoS 0."""
    first = make_health()
    latest = replace(first, camera=replace(first.camera, state=CameraState.STALLED, last_error="camera stalled"))
    sink = MqttSink(MqttConfig(url=mqtt_broker.url, **FAST), "car-1", outbox)
    sink.publish_health(first)
    sink.publish_health(latest)
    sink.start()
    occupant = OccupantState("occupant-1", "driver", 10.0, {"neutral": 0.9, "anger": 0.1}, ())
    with MqttRecorder(mqtt_broker.url, [f"{BASE}/#"], clean_session=True) as recorder:
        recorder.wait_for(lambda ms: any(m.topic == f"{BASE}/health" for m in ms))
        sink.publish_state([occupant], 1_700_000_000)
        recorder.wait_for(lambda ms: any(m.topic == f"{BASE}/occupants/occupant-1/state" for m in ms))
    sink.stop(flush_timeout_s=1.0)
    health = [m for m in recorder.messages if m.topic == f"{BASE}/health"]
    assert [m.payload for m in health] == [health_payload(latest, "car-1").model_dump_json().encode()]
    assert json.loads(health[0].payload)["status"] == "degraded"
    states = [m for m in recorder.messages if m.topic.endswith("/state")]
    assert [m.payload for m in states] == [
        s.model_dump_json().encode() for s in state_payloads([occupant], "car-1", 1_700_000_000)
    ]


def test_config_set(mqtt_broker: MosquittoBroker, outbox: Outbox) -> None:
    """Valid requests are applied; oversized, non-JSON and failing ones get error results; the sink goes on."""
    applied: list[ConfigSetPayload] = []

    def apply(request: ConfigSetPayload, now: float) -> ConfigResultPayload:
        applied.append(request)
        if request.rules.get("boom"):
            raise RuntimeError("disk full")
        return ConfigResultPayload(ts=utc_iso(now), request_id=request.request_id, ok=True, rules=request.rules)

    def on_config_set(payload: bytes) -> ConfigResultPayload:
        if payload == b"crash":
            raise RuntimeError("a handler that raises")  # the sink must outlive it
        return answer_config_set(payload, 200, apply, time.time())

    logger, logs = capturing_logger()
    sink = make_sink(mqtt_broker.url, outbox, on_config_set=on_config_set, logger=logger)
    wait_until(lambda: sink.stats().connected, what="connected")
    requests = [
        ConfigSetPayload(request_id="ok-1", rules={"smoothing_s": 1.0}).model_dump_json().encode(),
        json.dumps({"request_id": "big", "rules": {"x": "y" * 300}}).encode(),
        b"{not json",
        b"\xff\xfe\x00",
        b"[1, 2]",
        json.dumps({"request_id": "boom-1", "rules": {"boom": True}}).encode(),
    ]
    topics = [f"{BASE}/config/result", f"{BASE}/events"]
    with capture_logs() as remote_logs, MqttRecorder(mqtt_broker.url, topics, clean_session=True) as recorder:
        for payload in [*requests, b"crash"]:
            mqtt_publish.single(f"{BASE}/config/set", payload, qos=1, hostname="127.0.0.1", port=mqtt_broker.port)
        recorder.wait_for(lambda ms: len(ms) >= len(requests))
        wait_until(lambda: any(e["event"] == "config/set could not be answered" for e in logs.entries), what="crash")
        event = make_event()
        sink.submit_event(event)
        recorder.wait_for(lambda ms: any(m.topic == f"{BASE}/events" for m in ms))
    sink.stop(flush_timeout_s=1.0)
    results = [ConfigResultPayload.model_validate_json(m.payload) for m in recorder.messages[: len(requests)]]
    assert all(not m.retain for m in recorder.messages)
    assert [r.request_id for r in applied] == ["ok-1", "boom-1"]
    assert results[0].ok and results[0].request_id == "ok-1" and results[0].rules == {"smoothing_s": 1.0}
    assert [r.ok for r in results[1:]] == [False] * 5
    assert "at most 200" in results[1].errors[0].message
    assert "not JSON" in results[2].errors[0].message and "not JSON" in results[3].errors[0].message
    assert "JSON object" in results[4].errors[0].message
    assert results[5].request_id == "boom-1" and "disk full" in results[5].errors[0].message
    assert len(recorder.messages) == len(requests) + 1  # nothing published for the crash
    assert recorder.messages[-1].payload == expected_bytes(event)
    assert any(e["event"] == "config/set handler failed" and e["log_level"] == "error" for e in remote_logs)


def test_tls_mutual_authentication(tmp_path: Path, outbox: Outbox) -> None:
    """With the right CA and a client certificate, the sink connects over TLS and delivers events."""
    pki = make_test_pki(tmp_path / "pki")
    with MosquittoBroker(tmp_path / "broker", pki=pki, require_certificate=True) as broker:
        tls = TlsConfig(ca_file=pki.ca_file, cert_file=pki.client_cert, key_file=pki.client_key)
        with MqttRecorder(broker.url, [f"{BASE}/events"]) as recorder:
            sink = make_sink(broker.tls_url, outbox, tls=tls)
            event = make_event()
            sink.submit_event(event)
            recorder.wait_for(lambda ms: len(ms) == 1)
            sink.stop(flush_timeout_s=1.0)
        assert recorder.messages[0].payload == expected_bytes(event)


def test_tls_wrong_ca_is_logged_and_retried(tmp_path: Path, outbox: Outbox) -> None:
    """A broker certificate from another CA gives a clear TLS error, retried with backoff, never a connection."""
    pki = make_test_pki(tmp_path / "pki")
    other = make_test_pki(tmp_path / "other", common_name="some other CA")
    with MosquittoBroker(tmp_path / "broker", pki=pki) as broker:
        logger, logs = capturing_logger()
        sink = make_sink(broker.tls_url, outbox, tls=TlsConfig(ca_file=other.ca_file), logger=logger)
        prefix = f"TLS handshake with 127.0.0.1:{broker.tls_port} failed"

        def failures() -> list[MutableMapping[str, Any]]:
            return [e for e in logs.entries if e["event"].startswith(prefix)]

        wait_until(lambda: len(failures()) >= 2, what="two failed TLS attempts")
        sink.stop(flush_timeout_s=0.1)
    assert "certificate verify failed" in failures()[0]["event"]
    assert failures()[0]["log_level"] == "error"
    assert sink.stats().reconnects == 0 and not sink.stats().connected


def test_missing_tls_file_refuses_to_start(tmp_path: Path, outbox: Outbox) -> None:
    """A configured certificate that does not exist is named in an exception at construction."""
    missing = tmp_path / "nope" / "client.crt"
    pki = make_test_pki(tmp_path / "pki")
    tls = TlsConfig(ca_file=pki.ca_file, cert_file=missing, key_file=pki.client_key)
    with pytest.raises(TlsSetupError, match=f"mqtt.tls.cert_file: cannot read {missing}"):
        MqttSink(MqttConfig(url="mqtts://127.0.0.1:8883", tls=tls), "car-1", outbox)


def test_username_password(tmp_path: Path, outbox: Outbox) -> None:
    """Credentials from the config are used; wrong ones are refused and logged, not fatal."""
    with MosquittoBroker(tmp_path / "broker", passwords={"car-1": "s3cret"}) as broker:
        good = make_sink(broker.url, outbox, username="car-1", password=SecretStr("s3cret"))
        wait_until(lambda: good.stats().connected, what="connected")
        good.stop(flush_timeout_s=0.1)
        logger, logs = capturing_logger()
        bad = make_sink(broker.url, outbox, username="car-1", password=SecretStr("wrong"), logger=logger)
        wait_until(lambda: any(e["event"] == "mqtt broker refused the connection" for e in logs.entries))
        bad.stop(flush_timeout_s=0.1)
        assert not bad.stats().connected


REFUSED = "mqtt broker refused an event; it stays in the outbox"


def test_events_refused_by_the_acl_stay_until_it_allows_them(tmp_path: Path, outbox: Outbox) -> None:
    """MQTT 5: ACL-denied events are kept, logged, counted, retried oldest first; delivered once the ACL allows."""
    denied = "topic read #\n\nuser car-1\ntopic readwrite cabin/car-2/#\n"  # vehicle id and credentials mismatched
    allowed = "topic read #\n\nuser car-1\ntopic readwrite cabin/car-1/#\n"
    events = [make_event(frame_id=i) for i in range(12)]
    window = int(FAST["max_inflight"])
    logger, capture = capturing_logger()
    with (
        MosquittoBroker(tmp_path / "acl-mosquitto", passwords={"car-1": "s3cret"}, acl=denied) as broker,
        MqttRecorder(broker.url, [f"{BASE}/events"]) as recorder,
    ):
        sink = make_sink(broker.url, outbox, username="car-1", password=SecretStr("s3cret"), logger=logger)
        try:
            for event in events:
                sink.submit_event(event)
            # What was in flight (max_inflight=5 at most) is refused, then single probes of the oldest event.
            wait_until(lambda: sink.stats().refused_total >= window + 3, 30, "three refused probes")
            stats = sink.stats()
            assert (stats.outbox_depth, stats.published_total, stats.refusing) == (12, 0, True)
            assert stats.last_refusal is not None and stats.last_refusal.reason_code == 0x87
            assert stats.last_refusal.reason == "Not authorized"
            refusals = [e for e in capture.entries if e["event"] == REFUSED]
            assert {r["reason_code"] for r in refusals} == {"0x87"}
            refused_ids = [r["event_id"] for r in refusals]
            assert refused_ids[0] == events[0].event_id
            assert set(refused_ids) <= {e.event_id for e in events[:window]}, "one window at most"
            assert refused_ids[-3:] == [events[0].event_id] * 3, "a retry is the oldest pending event alone"
            assert all(r["retry_in_s"] <= 0.5 for r in refusals)
            assert event_ids(recorder.messages) == []

            broker.set_acl(allowed)
            broker.reload()
            recorder.wait_for(lambda ms: len(event_ids(ms)) == len(events), 30)
            wait_until(lambda: outbox.depth() == 0, 10, "an empty outbox")
        finally:
            sink.stop(flush_timeout_s=5)
    assert event_ids(recorder.messages) == [e.event_id for e in events]
    stats = sink.stats()
    assert (stats.reconnects, stats.refusing, stats.published_total) == (0, False, 12)
    assert any(e["event"] == "mqtt broker accepts events again" for e in capture.entries)


def test_mqtt_3_1_1_stays_selectable(mqtt_broker: MosquittoBroker, outbox: Outbox) -> None:
    """protocol: "3.1.1" connects and delivers as before (without refusals: 3.1.1 PUBACKs cannot say no)."""
    events = [make_event(frame_id=i) for i in range(3)]
    with MqttRecorder(mqtt_broker.url, [f"{BASE}/events"]) as recorder:
        sink = make_sink(mqtt_broker.url, outbox, protocol="3.1.1")
        for event in events:
            sink.submit_event(event)
        recorder.wait_for(lambda ms: len(event_ids(ms)) == 3)
        sink.stop(flush_timeout_s=5)
    assert event_ids(recorder.messages) == [e.event_id for e in events]
    assert "as cabin-monitor-car-1 (p2," in mqtt_broker.log_text()  # Mosquitto's p2 is 3.1.1, p5 is 5


def test_mqtt_5_is_the_default(mqtt_broker: MosquittoBroker, outbox: Outbox) -> None:
    """Without a protocol setting the sink speaks MQTT 5, as the broker's log shows."""
    with MqttRecorder(mqtt_broker.url, [f"{BASE}/status"]) as recorder:
        sink = make_sink(mqtt_broker.url, outbox)
        recorder.wait_for(lambda ms: any(m.payload == b"online" for m in ms))
        sink.stop(flush_timeout_s=5)
    assert "as cabin-monitor-car-1 (p5," in mqtt_broker.log_text()
