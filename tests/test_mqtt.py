"""The MQTT sink against a real Mosquitto: delivery, availability, outages, refusals, remote config, TLS."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt import client as mqtt_client
from paho.mqtt import publish as mqtt_publish
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import SecretStr
from structlog.testing import capture_logs

from cabin_monitor.bus.mqtt import MqttSink, TlsSetupError
from cabin_monitor.bus.outbox import Outbox
from cabin_monitor.bus.payloads import event_payload, health_payload, state_payloads
from cabin_monitor.bus.remote import RemoteRequests, RequestQueue, RuleSets
from cabin_monitor.config import EMOTIONS_7, MqttConfig, RemoteConfigConfig, RulesConfig, TlsConfig
from cabin_monitor.messages import CameraState, Event, Phase, RemoteRequest, RemoteStats
from cabin_monitor.rules import OccupantState
from cabin_monitor.rules.in_force import RulesInForce
from cabin_monitor.rules.shadow import ShadowRules
from tests.support.broker import MosquittoBroker, MqttRecorder, RecordedMessage, free_port
from tests.support.helpers import capturing_logger, make_event, make_health, wait_until
from tests.support.mounts import fill, pin_wal, tmpfs
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
    sink_options = {k: options.pop(k) for k in ("on_remote_request", "logger") if k in options}
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


def publish(broker: MosquittoBroker, topic: str, payload: bytes | str, retain: bool = False) -> None:
    """Publish one QoS 1 message as a separate client (an operator), waiting for the broker's PUBACK."""
    mqtt_publish.single(topic, payload, qos=1, retain=retain, hostname="127.0.0.1", port=broker.port)


def test_operator_requests_are_handed_over_with_their_retain_flag(mqtt_broker: MosquittoBroker, outbox: Outbox) -> None:
    """config/set, get and reset reach the handler as bytes with their retain flag; a raising handler is survived."""
    received: list[RemoteRequest] = []

    def on_remote_request(request: RemoteRequest) -> None:
        if request.payload == b"crash":
            raise RuntimeError("a handler that raises")  # the sink must outlive it
        received.append(request)

    publish(mqtt_broker, f"{BASE}/config/set", b'{"request_id": "stale"}', retain=True)
    logger, logs = capturing_logger()
    sink = make_sink(mqtt_broker.url, outbox, on_remote_request=on_remote_request, logger=logger)
    wait_until(lambda: len(received) == 1, what="the retained request")
    for topic, payload in [("set", b"crash"), ("set", b"\xff\xfe"), ("get", b"{}"), ("reset", b'{"request_id": "r"}')]:
        publish(mqtt_broker, f"{BASE}/config/{topic}", payload)
    publish(mqtt_broker, f"{BASE}/config/result", b"not a request")  # its own answers' topic: ignored
    wait_until(lambda: len(received) == 4, what="the live requests")
    assert [(r.action, r.payload, r.retained) for r in received] == [
        ("set", b'{"request_id": "stale"}', True),
        ("set", b"\xff\xfe", False),
        ("get", b"{}", False),
        ("reset", b'{"request_id": "r"}', False),
    ]
    assert [e["event"] for e in logs.entries if e["log_level"] == "error"] == ["operator request could not be queued"]
    with MqttRecorder(mqtt_broker.url, [f"{BASE}/events"], clean_session=True) as recorder:
        event = make_event()
        sink.submit_event(event)
        recorder.wait_for(lambda ms: len(ms) == 1)
    sink.stop(flush_timeout_s=1.0)
    assert recorder.messages[0].payload == expected_bytes(event)


def test_answers_and_the_retained_rules_state(persistent_broker: MosquittoBroker, outbox: Outbox) -> None:
    """Answers go to config/result unretained; the latest rules/state is retained and sent again after a reconnect."""
    sink = make_sink(persistent_broker.url, outbox, on_remote_request=lambda request: None)
    sink.publish_rules_state(b"state-1")  # before connecting: sent once connected
    wait_until(lambda: sink.stats().connected, what="connected")
    topics = [f"{BASE}/config/result", f"{BASE}/rules/state"]
    with MqttRecorder(persistent_broker.url, topics, clean_session=True) as recorder:
        # Retained if it reached the broker before this subscription, live if after: either way, once.
        recorder.wait_for(lambda ms: any((m.topic, m.payload) == (f"{BASE}/rules/state", b"state-1") for m in ms))
        sink.publish_config_result(b"answer-1")
        sink.publish_rules_state(b"state-2")
        recorder.wait_for(lambda ms: ms[-1].payload == b"state-2")
    assert recorder.messages[-2:] == [
        RecordedMessage(f"{BASE}/config/result", b"answer-1", False),
        RecordedMessage(f"{BASE}/rules/state", b"state-2", False),  # live delivery: no retain flag
    ]
    assert retained_payload(persistent_broker, f"{BASE}/rules/state") == b"state-2"
    persistent_broker.kill()  # forgets what was retained since the last save
    (persistent_broker.directory / "mosquitto.db").unlink(missing_ok=True)
    persistent_broker.start()
    wait_until(lambda: sink.stats().reconnects >= 1 and sink.stats().connected, timeout_s=20, what="reconnected")
    assert retained_payload(persistent_broker, f"{BASE}/rules/state") == b"state-2"
    sink.stop(flush_timeout_s=1.0)


def retained_payload(broker: MosquittoBroker, topic: str) -> bytes:
    """The retained message on ``topic``, read by a fresh clean-session subscriber."""
    with MqttRecorder(broker.url, [topic], client_id=f"probe-{time.monotonic_ns()}", clean_session=True) as probe:
        messages = probe.wait_for(lambda ms: any(m.retain for m in ms))
    return next(m.payload for m in messages if m.retain)


def remote_stack(
    url: str, outbox: Outbox, state_dir: Path, **settings: Any
) -> tuple[MqttSink, RemoteRequests, RulesInForce]:
    """The daemon's remote-control parts, as build_pipeline wires them: file-backed rules in force, the request
    queue, the sink that fills it, the worker that answers through the sink."""
    rules = RulesInForce(RulesConfig(), EMOTIONS_7, state_dir / "rules_override.json")
    shadow = ShadowRules(None, lambda: rules.effective, EMOTIONS_7, state_dir / "rules_shadow_override.json")
    remote_config = RemoteConfigConfig(**settings)
    requests = RequestQueue(remote_config)
    sink = MqttSink(
        MqttConfig(url=url, **FAST),
        "car-1",
        outbox,
        on_remote_request=requests.offer,
        max_request_bytes=remote_config.max_payload_bytes,
    )
    remote = RemoteRequests(requests, RuleSets(rules, shadow), sink, remote_config, "car-1")
    remote.start()
    sink.start()
    return sink, remote, rules


def results(messages: list[RecordedMessage]) -> list[dict[str, Any]]:
    """The config/result answers, in arrival order."""
    return [json.loads(m.payload) for m in messages if m.topic == f"{BASE}/config/result"]


def test_a_retained_config_set_never_undoes_a_later_change(
    persistent_broker: MosquittoBroker, outbox: Outbox, tmp_path: Path
) -> None:
    """A retained set (refused as it arrives), then a later set, then a reconnect: the replay is refused too; the
    later value stays."""
    sink, remote, rules = remote_stack(persistent_broker.url, outbox, tmp_path)
    wait_until(lambda: sink.stats().connected, what="connected")
    with MqttRecorder(persistent_broker.url, [f"{BASE}/config/result", f"{BASE}/rules/state"]) as recorder:
        first = {"request_id": "first", "rules": {"stress": {"sustain_s": 7}}}
        publish(persistent_broker, f"{BASE}/config/set", json.dumps(first), retain=True)
        later = {"request_id": "later", "rules": {"stress": {"sustain_s": 8}}}
        publish(persistent_broker, f"{BASE}/config/set", json.dumps(later))
        recorder.wait_for(lambda ms: len(results(ms)) == 2)
        persistent_broker.restart()  # the broker keeps the retained set and replays it on the new subscription
        recorder.wait_for(lambda ms: len({json.dumps(a) for a in results(ms)}) >= 3, timeout_s=20)
        answers = list({json.dumps(a): a for a in results(recorder.messages)}.values())  # QoS 1: maybe twice
        assert [(a["request_id"], a["ok"]) for a in answers] == [("first", False), ("later", True), ("first", False)]
        assert answers[0]["errors"][0]["path"] == answers[2]["errors"][0]["path"] == "(retained)"
        assert rules.effective.stress.sustain_s == 8
        state = json.loads(retained_payload(persistent_broker, f"{BASE}/rules/state"))
        assert (state["cause"], state["request_id"], state["rules"]["stress"]["sustain_s"]) == (
            "config/set",
            "later",
            8,
        )
        assert state["sources"]["stress.sustain_s"] == "remote"
    remote.stop()
    sink.stop(flush_timeout_s=1.0)


def test_a_retained_config_set_published_while_connected_is_not_applied(
    mqtt_broker: MosquittoBroker, outbox: Outbox, tmp_path: Path
) -> None:
    """A retained set that arrives live is refused as retained; the empty message clearing it is not answered."""
    sink, remote, rules = remote_stack(mqtt_broker.url, outbox, tmp_path)
    wait_until(lambda: sink.stats().connected, what="connected")
    with MqttRecorder(mqtt_broker.url, [f"{BASE}/config/result"], clean_session=True) as recorder:
        body = {"request_id": "kept", "rules": {"stress": {"sustain_s": 7}}}
        publish(mqtt_broker, f"{BASE}/config/set", json.dumps(body), retain=True)
        publish(mqtt_broker, f"{BASE}/config/get", json.dumps({"request_id": "after"}))
        recorder.wait_for(lambda ms: len(results(ms)) == 2)
        publish(mqtt_broker, f"{BASE}/config/set", b"", retain=True)  # clears the retained one
        publish(mqtt_broker, f"{BASE}/config/get", json.dumps({"request_id": "last"}))
        recorder.wait_for(lambda ms: len(results(ms)) == 3)
        time.sleep(0.3)
    answers = results(recorder.messages)
    assert [(a["request_id"], a["ok"]) for a in answers] == [("kept", False), ("after", True), ("last", True)]
    assert answers[0]["errors"][0]["path"] == "(retained)"
    assert rules.effective.stress.sustain_s == 3.0 and remote.stats().received == 3
    remote.stop()
    sink.stop(flush_timeout_s=1.0)


def test_get_and_reset_over_the_broker(mqtt_broker: MosquittoBroker, outbox: Outbox, tmp_path: Path) -> None:
    """config/get answers the rules with their sources; config/reset drops the overrides and updates rules/state."""
    sink, remote, _ = remote_stack(mqtt_broker.url, outbox, tmp_path)
    wait_until(lambda: sink.stats().connected, what="connected")
    assert json.loads(retained_payload(mqtt_broker, f"{BASE}/rules/state"))["cause"] == "start"
    with MqttRecorder(mqtt_broker.url, [f"{BASE}/config/result"], clean_session=True) as recorder:
        publish(mqtt_broker, f"{BASE}/config/set", json.dumps({"request_id": "s", "rules": {"smoothing_s": 2}}))
        publish(mqtt_broker, f"{BASE}/config/get", json.dumps({"request_id": "g"}))
        recorder.wait_for(lambda ms: len(results(ms)) == 2)
        got = results(recorder.messages)[1]
        assert (got["action"], got["request_id"], got["ok"], got["rules"]["smoothing_s"]) == ("get", "g", True, 2)
        assert got["sources"]["smoothing_s"] == "remote" and got["overrides"][0]["file"] == 0.7
        publish(mqtt_broker, f"{BASE}/config/reset", json.dumps({"request_id": "r"}))
        recorder.wait_for(lambda ms: len(results(ms)) == 3)
    reset = results(recorder.messages)[2]
    assert (reset["action"], reset["ok"], reset["rules"]["smoothing_s"], reset["overrides"]) == ("reset", True, 0.7, [])
    assert not (tmp_path / "rules_override.json").exists()
    wait_until(
        lambda: json.loads(retained_payload(mqtt_broker, f"{BASE}/rules/state"))["cause"] == "config/reset",
        what="rules/state after the reset",
    )
    remote.stop()
    sink.stop(flush_timeout_s=1.0)


def test_every_request_gets_one_answer(mqtt_broker: MosquittoBroker, outbox: Outbox, tmp_path: Path) -> None:
    """Bad bytes, bad JSON, a lone-surrogate id, a bool for a number and a good change: one answer each, in order."""
    sink, remote, rules = remote_stack(mqtt_broker.url, outbox, tmp_path)
    wait_until(lambda: sink.stats().connected, what="connected")
    requests = [
        b"\xff\xfe",
        b"{not json",
        b'{"request_id": "\\ud800", "rules": {}}',
        json.dumps({"request_id": "bool", "rules": {"stress": {"sustain_s": True}}}).encode(),
        json.dumps({"request_id": "big", "rules": {"x": "y" * 20000}}).encode(),
        json.dumps({"request_id": "ok", "rules": {"stress": {"sustain_s": 2}}}).encode(),
    ]
    with MqttRecorder(mqtt_broker.url, [f"{BASE}/config/result"], clean_session=True) as recorder:
        for payload in requests:
            publish(mqtt_broker, f"{BASE}/config/set", payload)
        recorder.wait_for(lambda ms: len(ms) == len(requests))
    answers = results(recorder.messages)
    assert [a["ok"] for a in answers] == [False] * 5 + [True]
    assert [a["request_id"] for a in answers] == [None, None, "\\ud800", "bool", None, "ok"]
    assert answers[2]["errors"][0]["path"] == "request_id"
    assert answers[3]["errors"][0]["path"] == "rules.stress.sustain_s"
    assert "at most 16384" in answers[4]["errors"][0]["message"]
    assert remote.stats().answered == len(requests) and rules.effective.stress.sustain_s == 2
    remote.stop()
    sink.stop(flush_timeout_s=1.0)


FLOOD_REQUESTS = int(os.environ.get("CABIN_MONITOR_FLOOD_REQUESTS", "400"))
FLOOD_S = float(os.environ.get("CABIN_MONITOR_FLOOD_S", "4"))
EVENTS_PER_S = 10.0


def flood_requests(
    broker: MosquittoBroker, outbox: Outbox, tmp_path: Path, body: Callable[[int], bytes], count: int, seconds: float
) -> tuple[RemoteStats, RulesInForce, list[float]]:
    """``count`` config/set requests (``body(n)``) over ``seconds`` while 10 events/s are submitted; the worker's
    counts, the rules in force, and each event's delivery latency (submit to arrival), sorted."""
    sink, remote, rules = remote_stack(broker.url, outbox, tmp_path)
    wait_until(lambda: sink.stats().connected, what="connected")
    submitted: dict[str, float] = {}
    arrived: dict[str, float] = {}
    flood_done = threading.Event()

    def on_message(client: object, userdata: object, message: Any) -> None:
        if message.topic == f"{BASE}/events":
            arrived.setdefault(json.loads(message.payload)["event_id"], time.monotonic())

    watcher = mqtt_client.Client(CallbackAPIVersion.VERSION2, client_id="flood-watcher")
    watcher.on_message = on_message
    watcher.connect("127.0.0.1", broker.port)
    watcher.subscribe(f"{BASE}/events", qos=1)
    watcher.loop_start()

    def flood() -> None:
        operator = mqtt_client.Client(CallbackAPIVersion.VERSION2, client_id="flood-operator")
        operator.connect("127.0.0.1", broker.port)
        operator.loop_start()
        pause_s = seconds / count
        infos = []
        for n in range(count):
            infos.append(operator.publish(f"{BASE}/config/set", body(n), qos=1))
            time.sleep(pause_s)
        for info in infos:
            info.wait_for_publish(60)
        operator.disconnect()
        operator.loop_stop()
        flood_done.set()

    time.sleep(0.5)
    flooder = threading.Thread(target=flood)
    flooder.start()
    while not flood_done.is_set():
        event = make_event()
        submitted[event.event_id] = time.monotonic()
        sink.submit_event(event)
        time.sleep(1.0 / EVENTS_PER_S)
    flooder.join(60)
    wait_until(lambda: set(arrived) >= set(submitted), timeout_s=60, what="every event")
    time.sleep(0.5)  # the last requests the broker delivers
    wait_until(lambda: remote.stats().queued == 0, 60, "every queued request")
    watcher.loop_stop()
    watcher.disconnect()
    stats = remote.stats()
    remote.stop()
    sink.stop(flush_timeout_s=1.0)
    return stats, rules, sorted(arrived[i] - submitted[i] for i in submitted)


def latency_line(what: str, latencies: list[float], stats: RemoteStats) -> str:
    """One printed line: the flood, event delivery p50/p95/max, and what became of the requests."""
    p50, p95 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.95)]
    return (
        f"\n{what}; {len(latencies)} events during it, delivery p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
        f"max {latencies[-1] * 1000:.0f} ms; received {stats.received}, answered {stats.answered} "
        f"(busy {stats.busy}), dropped {stats.dropped}"
    )


def test_a_config_set_flood_never_holds_up_events(mqtt_broker: MosquittoBroker, outbox: Outbox, tmp_path: Path) -> None:
    """During a flood of valid config/set, every event arrives and every request is answered (busy past the rate).

    Prints the event delivery latency (submit to arrival) during the flood; with -s and
    CABIN_MONITOR_FLOOD_REQUESTS=2000 CABIN_MONITOR_FLOOD_S=30 it is the README's figure.
    """

    def body(n: int) -> bytes:
        return json.dumps({"request_id": f"flood-{n}", "rules": {"stress": {"cooldown_s": 30 + n % 7}}}).encode()

    stats, rules, latencies = flood_requests(mqtt_broker, outbox, tmp_path, body, FLOOD_REQUESTS, FLOOD_S)
    print(latency_line(f"config/set flood: {FLOOD_REQUESTS} requests in {FLOOD_S:g} s", latencies, stats))
    assert stats.received == FLOOD_REQUESTS and stats.busy > 0
    assert stats.answered + stats.dropped == FLOOD_REQUESTS
    assert rules.effective.stress.cooldown_s in {30 + n % 7 for n in range(FLOOD_REQUESTS)}


OVERSIZE_BYTES = int(os.environ.get("CABIN_MONITOR_FLOOD_OVERSIZE_BYTES", str(1 << 20)))
BIG_FLOOD_REQUESTS = int(os.environ.get("CABIN_MONITOR_BIG_FLOOD_REQUESTS", "40"))


def test_requests_over_the_limit_are_never_delivered(
    mqtt_broker: MosquittoBroker, outbox: Outbox, tmp_path: Path
) -> None:
    """MQTT 5 Maximum Packet Size: the broker drops a config/set over max_payload_bytes; a small one is answered."""
    sink, remote, _ = remote_stack(mqtt_broker.url, outbox, tmp_path)
    wait_until(lambda: sink.stats().connected, what="connected")
    with MqttRecorder(mqtt_broker.url, [f"{BASE}/config/result"], clean_session=True) as recorder:
        big = {"request_id": "big", "rules": {}, "pad": "x" * (1 << 20)}
        publish(mqtt_broker, f"{BASE}/config/set", json.dumps(big))
        publish(mqtt_broker, f"{BASE}/config/get", json.dumps({"request_id": "small"}))
        recorder.wait_for(lambda ms: len(results(ms)) == 1)
        time.sleep(0.3)
    assert [a["request_id"] for a in results(recorder.messages)] == ["small"]
    assert remote.stats().received == 1
    remote.stop()
    sink.stop(flush_timeout_s=1.0)


def test_a_flood_of_maximal_and_oversized_requests_never_holds_up_events(
    mqtt_broker: MosquittoBroker, outbox: Outbox, tmp_path: Path
) -> None:
    """Requests of max_payload_bytes and far over it, alternately: events still arrive; only the maximal ones do.

    With -s and CABIN_MONITOR_FLOOD_OVERSIZE_BYTES=33554432 CABIN_MONITOR_BIG_FLOOD_REQUESTS=200 it is
    the README's figure.
    """
    limit = RemoteConfigConfig().max_payload_bytes

    def body(n: int) -> bytes:
        size = limit if n % 2 == 0 else OVERSIZE_BYTES
        head = json.dumps({"request_id": f"flood-{n}", "rules": {}, "pad": ""}).encode()
        return head[:-2] + b"x" * (size - len(head)) + head[-2:]

    assert len(body(0)) == limit
    stats, _, latencies = flood_requests(mqtt_broker, outbox, tmp_path, body, BIG_FLOOD_REQUESTS, 4.0)
    what = f"{BIG_FLOOD_REQUESTS} config/set of {limit} and {OVERSIZE_BYTES} bytes alternately in 4 s"
    print(latency_line(what, latencies, stats))
    assert stats.received == BIG_FLOOD_REQUESTS // 2 and stats.answered + stats.dropped == stats.received


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


def submit_until_held(sink: MqttSink, outbox: Outbox) -> list[Event]:
    """On a filled disk, submit events until one is held in memory (the WAL may take the first few)."""
    submitted: list[Event] = []
    while outbox.memory_depth == 0 and outbox.state == "ok" and len(submitted) < 200:
        submitted.append(make_event(frame_id=len(submitted)))
        sink.submit_event(submitted[-1])
    assert outbox.state == "disk_full", "the full tmpfs never refused a write"
    return submitted


def ids_in_file(path: Path) -> set[str]:
    """The event ids the outbox file holds, read by a connection of its own."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return {row[0] for row in db.execute("SELECT event_id FROM outbox")}


def test_events_held_in_memory_reach_the_broker_while_the_disk_is_full(
    mqtt_broker: MosquittoBroker, tmp_path: Path
) -> None:
    """A full state folder still delivers: events held in memory arrive, in order, before any space is freed and
    are never written to the file; once space is back none arrives twice and the outbox ends empty."""
    with tmpfs(tmp_path / "state", 1024) as state, MqttRecorder(mqtt_broker.url, [f"{BASE}/events"]) as recorder:
        path = state / "outbox.sqlite"
        with Outbox(path) as outbox:
            sink = make_sink(mqtt_broker.url, outbox)
            try:
                submitted = [make_event(frame_id=i) for i in range(3)]
                for event in submitted:
                    sink.submit_event(event)
                wait_until(lambda: len(event_ids(recorder.messages)) == 3 and outbox.depth() == 0, what="3 delivered")
                with pin_wal(path):
                    filler = fill(state)
                    submitted += submit_until_held(sink, outbox)
                    held = [make_event(frame_id=100 + i) for i in range(20)]
                    most_held = outbox.memory_depth
                    for event in held:
                        sink.submit_event(event)
                        most_held = max(most_held, outbox.memory_depth)
                        time.sleep(0.02)
                    submitted += held
                    recorder.wait_for(lambda ms: len(event_ids(ms)) == len(submitted), 15)
                    wait_until(lambda: outbox.depth() == 0, 10, "an empty outbox with the disk still full")
                    full = sink.stats()
                    received_while_full = len(event_ids(recorder.messages)) - 3
                    assert filler.exists() and outbox.state == "disk_full"
                    assert not ids_in_file(path) & {e.event_id for e in held}, "delivered from memory"
                    filler.unlink()
                wait_until(lambda: sink.stats().outbox_state == "ok", 10, "the outbox writable again")
                time.sleep(2.5)  # two write retries: an acked event written to the file would go out again now
                assert not ids_in_file(path) & {e.event_id for e in held}, "acked in memory, never written"
                after = [make_event(frame_id=200 + i) for i in range(3)]
                for event in after:
                    sink.submit_event(event)
                submitted += after
                recorder.wait_for(lambda ms: len(event_ids(ms)) == len(submitted), 15)
                wait_until(lambda: outbox.depth() == 0, what="an empty outbox")
            finally:
                sink.stop(flush_timeout_s=2.0)
            reconnects = sink.stats().reconnects
        with Outbox(path) as reopened:
            left = reopened.depth()
    copies = len(recorder.messages)
    print(
        f"full disk: {len(submitted) - 6} accepted while full ({len(submitted) - 6 - len(held)} still fitted the WAL), "
        f"{received_while_full} received before space was freed, up to {most_held} in memory at once; "
        f"{copies - len(submitted)} duplicates, {len(submitted) - len(event_ids(recorder.messages))} lost, "
        f"{left} left in the outbox, {reconnects} reconnects"
    )
    assert (full.outbox_state, full.outbox_memory_depth, full.published_total) == (
        "disk_full",
        0,
        3 + received_while_full,
    )
    assert event_ids(recorder.messages) == [e.event_id for e in submitted]
    assert copies == len(submitted), "no event delivered twice"
    assert left == 0 and reconnects == 0


def test_events_refused_while_held_in_memory_are_kept_and_retried(tmp_path: Path) -> None:
    """With the disk full, memory-held events the ACL denies are kept, retried oldest first, and delivered once it
    allows them, all before any space is freed."""
    denied = "topic read #\n\nuser car-1\ntopic readwrite cabin/car-2/#\n"
    allowed = "topic read #\n\nuser car-1\ntopic readwrite cabin/car-1/#\n"
    logger, capture = capturing_logger()
    with (
        tmpfs(tmp_path / "state", 1024) as state,
        MosquittoBroker(tmp_path / "acl-mosquitto", passwords={"car-1": "s3cret"}, acl=allowed) as broker,
        MqttRecorder(broker.url, [f"{BASE}/events"]) as recorder,
        Outbox(state / "outbox.sqlite") as outbox,
        pin_wal(state / "outbox.sqlite"),
    ):
        filler = fill(state)
        sink = make_sink(broker.url, outbox, username="car-1", password=SecretStr("s3cret"), logger=logger)
        try:
            events = submit_until_held(sink, outbox)
            recorder.wait_for(lambda ms: len(event_ids(ms)) == len(events), 15)
            wait_until(lambda: outbox.depth() == 0, 10, "an empty outbox")
            broker.set_acl(denied)
            reloads = broker.log_text().count("Reloading config.")
            broker.reload()
            # Mosquitto applies the ACL right after logging the reload, before it reads another packet.
            wait_until(lambda: broker.log_text().count("Reloading config.") > reloads, 10, "the ACL reloaded")
            held = [make_event(frame_id=100 + i) for i in range(6)]
            for event in held:
                sink.submit_event(event)
            events += held
            assert outbox.memory_depth == 6
            wait_until(lambda: sink.stats().refused_total >= 6 + 3, 30, "three refused probes")
            refused = [e["event_id"] for e in capture.entries if e["event"] == REFUSED]
            assert set(refused) <= {e.event_id for e in held[: int(FAST["max_inflight"])]}
            assert refused[-3:] == [held[0].event_id] * 3, "a retry is the oldest pending event alone"
            assert outbox.memory_event_ids == [e.event_id for e in held] and sink.stats().refusing
            broker.set_acl(allowed)
            broker.reload()
            recorder.wait_for(lambda ms: len(event_ids(ms)) == len(events), 30)
            wait_until(lambda: outbox.memory_depth == 0, 10, "memory emptied by PUBACKs")
            assert filler.exists() and outbox.state == "disk_full"
        finally:
            sink.stop(flush_timeout_s=2.0)
    assert event_ids(recorder.messages) == [e.event_id for e in events]
    assert len(recorder.messages) == len(events)


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


def test_mqtt_3_1_1_says_refusals_cannot_be_seen(tmp_path: Path, outbox: Outbox) -> None:
    """On 3.1.1 an ACL-denied event is lost unseen: the sink warns at start-up and health says it cannot tell."""
    acl = f"topic read {BASE}/#\n"  # anonymous clients may read, not write: every event is denied
    with MosquittoBroker(tmp_path / "broker", acl=acl) as broker:
        logger, logs = capturing_logger()
        sink = make_sink(broker.url, outbox, protocol="3.1.1", logger=logger)
        sink.submit_event(make_event())
        wait_until(lambda: sink.stats().outbox_depth == 0, what="the denied event acknowledged")
        sink.stop(flush_timeout_s=1.0)
    (warning,) = [e for e in logs.entries if e["event"].startswith("mqtt 3.1.1: a PUBACK cannot refuse an event")]
    assert warning["log_level"] == "warning"
    stats = sink.stats()
    assert not stats.refusals_detectable and stats.refused_total == 0
    assert health_payload(make_health(sink=stats), "car-1").mqtt.refusals_detectable is False
    assert MqttSink(MqttConfig(url=broker.url), "car-1", outbox).stats().refusals_detectable


def test_a_health_payload_over_the_brokers_packet_size_is_named_and_events_still_flow(
    tmp_path: Path, outbox: Outbox
) -> None:
    """A broker whose Maximum Packet Size is below the health payload: health is not sent (logged once, with sizes),
    the connection stays up and events are delivered; an event over the limit stays in the outbox, holding
    back none after it."""
    events = [make_event(frame_id=i) for i in range(3)]
    too_large_event = make_event(frame_id=9, occupant_id="o" * 700)
    broker = MosquittoBroker(tmp_path / "broker", max_packet_bytes=600)
    with broker, MqttRecorder(broker.url, [f"{BASE}/events"]) as recorder:
        logger, logs = capturing_logger()
        sink = make_sink(broker.url, outbox, logger=logger)
        wait_until(lambda: sink.stats().connected, what="connected")
        for n, event in enumerate(events):
            sink.publish_health(make_health(frames_processed=n))
            sink.submit_event(event)
            if n == 0:
                sink.submit_event(too_large_event)
        recorder.wait_for(lambda ms: len(event_ids(ms)) == len(events))
        time.sleep(1.0)  # a dropped connection would show by now
        sink.stop(flush_timeout_s=1.0)
    assert event_ids(recorder.messages) == [e.event_id for e in events]
    assert [item.event_id for item in outbox.pending(10)] == [too_large_event.event_id]
    (too_large,) = [e for e in logs.entries if e["event"].startswith("message larger than the broker's Maximum")]
    assert too_large["topic"] == f"{BASE}/health" and too_large["broker_max_packet_bytes"] == 600
    assert too_large["size_bytes"] > 600 and sink.stats().reconnects == 0
    assert not [e for e in logs.entries if e["event"] == "mqtt connection lost"]


def test_mqtt_5_is_the_default(mqtt_broker: MosquittoBroker, outbox: Outbox) -> None:
    """Without a protocol setting the sink speaks MQTT 5, as the broker's log shows."""
    with MqttRecorder(mqtt_broker.url, [f"{BASE}/status"]) as recorder:
        sink = make_sink(mqtt_broker.url, outbox)
        recorder.wait_for(lambda ms: any(m.payload == b"online" for m in ms))
        sink.stop(flush_timeout_s=5)
    assert "as cabin-monitor-car-1 (p5," in mqtt_broker.log_text()


def test_shadow_events_go_to_their_own_topic_and_never_through_the_outbox(
    mqtt_broker: MosquittoBroker, outbox: Outbox, tmp_path: Path
) -> None:
    """A shadow event is published on shadow/events only, never written to the outbox; offline it is dropped
    and counted."""
    sink = make_sink(mqtt_broker.url, outbox)
    wait_until(lambda: sink.stats().connected, what="connected")
    shadow, live = make_event(frame_id=1), make_event(frame_id=2)
    with MqttRecorder(mqtt_broker.url, [f"{BASE}/events", f"{BASE}/shadow/events"]) as recorder:
        sink.submit_shadow_event(shadow)
        assert outbox.depth() == 0 and ids_in_file(tmp_path / "outbox.sqlite") == set()
        sink.submit_event(live)
        recorder.wait_for(lambda ms: len(ms) == 2)
    by_topic = {m.topic: m for m in recorder.messages}
    assert by_topic[f"{BASE}/shadow/events"].payload == expected_bytes(shadow)
    assert not by_topic[f"{BASE}/shadow/events"].retain
    assert event_ids([by_topic[f"{BASE}/events"]]) == [live.event_id]
    # The subscriber may see the event before the sink has its PUBACK.
    wait_until(lambda: sink.stats().published_total == 1, what="the live event acknowledged")
    assert sink.shadow_dropped_total == 0
    sink.stop(flush_timeout_s=1.0)

    with Outbox(tmp_path / "offline.sqlite") as offline_outbox:
        offline = make_sink(f"mqtt://127.0.0.1:{free_port()}", offline_outbox)
        offline.submit_shadow_event(make_event())
        assert offline.shadow_dropped_total == 1 and offline_outbox.depth() == 0
        offline.stop(flush_timeout_s=0.1)


def test_shadow_rules_over_the_broker_set_shown_kept_across_a_restart_and_reset(
    mqtt_broker: MosquittoBroker, outbox: Outbox, tmp_path: Path
) -> None:
    """config/set with shadow: rules/state shows the set, a restart keeps it, config/reset with shadow drops it."""

    def rules_state() -> dict[str, Any]:
        state: dict[str, Any] = json.loads(retained_payload(mqtt_broker, f"{BASE}/rules/state"))
        return state

    sink, remote, rules = remote_stack(mqtt_broker.url, outbox, tmp_path)
    wait_until(lambda: sink.stats().connected, what="connected")
    assert "shadow" not in rules_state()
    with MqttRecorder(mqtt_broker.url, [f"{BASE}/config/result"], clean_session=True) as recorder:
        body = {"request_id": "s", "shadow": True, "rules": {"stress": {"enter_score": 0.9}}}
        publish(mqtt_broker, f"{BASE}/config/set", json.dumps(body))
        recorder.wait_for(lambda ms: len(results(ms)) == 1)
    (answer,) = results(recorder.messages)
    assert (answer["ok"], answer["shadow"], answer["rules"]["stress"]["enter_score"]) == (True, True, 0.9)
    wait_until(lambda: "shadow" in rules_state(), what="rules/state with the shadow set")
    state = rules_state()
    assert (state["cause"], state["request_id"], state["rules"]["stress"]["enter_score"]) == ("config/set", "s", 0.6)
    assert state["shadow"]["rules"]["stress"]["enter_score"] == 0.9
    assert state["shadow"]["sources"]["stress.enter_score"] == "remote"
    assert rules.effective.stress.enter_score == 0.6
    remote.stop()
    sink.stop(flush_timeout_s=1.0)

    sink, remote, rules = remote_stack(mqtt_broker.url, outbox, tmp_path)  # a restart over the same state folder
    wait_until(lambda: rules_state()["cause"] == "start", what="rules/state of the restart")
    assert rules_state()["shadow"] == state["shadow"]
    with MqttRecorder(mqtt_broker.url, [f"{BASE}/config/result"], clean_session=True) as recorder:
        publish(mqtt_broker, f"{BASE}/config/reset", json.dumps({"request_id": "r", "shadow": True}))
        recorder.wait_for(lambda ms: len(results(ms)) == 1)
    (reset,) = results(recorder.messages)
    assert (reset["ok"], reset["shadow"], reset["rules"]) == (True, True, None)
    wait_until(lambda: rules_state()["cause"] == "config/reset", what="rules/state after the reset")
    assert "shadow" not in rules_state() and not (tmp_path / "rules_shadow_override.json").exists()
    remote.stop()
    sink.stop(flush_timeout_s=1.0)


def test_an_outage_that_fills_the_outbox_delivers_no_end_without_its_start(tmp_path: Path) -> None:
    """Broker down, outbox full (6 events) while 12 rounds of overlapping stress and occupant_lost pairs come: what
    arrives afterwards pairs up, and the drops are counted per type."""
    broker = MosquittoBroker(tmp_path / "broker", persistence=True)
    # The subscriber's persistent session first, so that the broker queues what the sink sends on reconnecting
    # even before the subscriber is back.
    with broker, MqttRecorder(broker.url, [f"{BASE}/events"]):
        pass
    with Outbox(tmp_path / "outbox.sqlite", max_events=6) as box:
        sink = make_sink(broker.url, box)
        for _ in range(12):
            stress, lost = make_event(Phase.START), make_event(Phase.START, type="occupant_lost")
            sink.submit_event(stress)
            sink.submit_event(lost)
            sink.submit_event(make_event(Phase.END, start_event_id=stress.event_id))
            sink.submit_event(make_event(Phase.END, type="occupant_lost", start_event_id=lost.event_id))
        with broker, MqttRecorder(broker.url, [f"{BASE}/events"]) as recorder:
            wait_until(lambda: sink.stats().outbox_depth == 0, 20, "the outbox drained")
            # Acknowledged by the broker is not yet delivered to the subscriber: wait for every kept event.
            recorder.wait_for(lambda ms: len(ms) + sum(box.dropped_by_reason.values()) == 48)
            sink.stop(flush_timeout_s=1.0)
        received = [json.loads(m.payload) for m in recorder.messages]
        starts = {e["event_id"] for e in received if e["phase"] == "start"}
        orphans = [e for e in received if e["phase"] == "end" and e["start_event_id"] not in starts]
        assert not orphans, f"{len(orphans)} ends without their start, of {len(received)} received"
        print(f"\noutage: 48 events, outbox of 6: {len(received)} received, dropped {box.dropped_by_type}")
        assert len(received) + sum(box.dropped_by_reason.values()) == 48
        assert set(box.dropped_by_type) == {"stress", "occupant_lost"}
