"""The daemon: its composition root in-process, and end to end the real process on real video, talking to a real
Mosquitto."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import cv2
import pytest
import yaml

from cabin_monitor.assets import sample_path
from cabin_monitor.bus.ledger import OpenEventLedger
from cabin_monitor.bus.mqtt import MqttSink
from cabin_monitor.bus.outbox import Outbox
from cabin_monitor.bus.payloads import utc_epoch_s
from cabin_monitor.bus.sinks import StdoutSink
from cabin_monitor.config import paths_set
from cabin_monitor.daemon import Overrides, build_pipeline, load
from cabin_monitor.errors import ConfigurationError
from cabin_monitor.messages import Event, Phase, end_event_id
from tests.support.broker import MosquittoBroker, MqttRecorder, RecordedMessage
from tests.support.daemon import DaemonProcess, clean_environment
from tests.support.helpers import wait_until
from tests.support.mounts import fill, pin_wal, remount, tmpfs

VEHICLE = "test-car"
PREFIX = f"cabin/{VEHICLE}"

# Rules that make the stream of events depend on faces coming and going, not on
# what the model reads: "stress" sums every class (always 1.0), so it opens
# whenever a face has been seen for 0.5 s and closes when the face is lost.
RULES = {
    "smoothing_s": 0.0,
    "stress": {
        "classes": ["neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger"],
        "enter_score": 0.6,
        "sustain_s": 0.5,
        "exit_score": 0.4,
        "release_s": 0.2,
        "cooldown_s": 0.0,
    },
    "unexpected_expression": {"enabled": False},
    "occupant_lost": {"lost_after_s": 1.0},
}
# One pass of the face/gap clip: stress opens, the face goes (stress ends, lost
# starts), the face returns (lost ends), stress opens again, the clip ends.
ONE_PASS = [
    ("stress", "start"),
    ("stress", "end"),
    ("occupant_lost", "start"),
    ("occupant_lost", "end"),
    ("stress", "start"),
    ("stress", "end"),
]


@pytest.fixture(scope="session")
def face_gap_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real clip: 2.4 s of a face, 3.3 s of an empty room, the face again (30 fps, 640x360)."""
    path = tmp_path_factory.mktemp("video") / "face_gap.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (640, 360))

    def copy(name: str) -> None:
        cap = cv2.VideoCapture(str(sample_path(name)))
        while True:
            ok, image = cap.read()
            if not ok:
                break
            writer.write(cv2.resize(image, (640, 360), interpolation=cv2.INTER_AREA))
        cap.release()

    copy("single_face.mp4")
    copy("no_face.mp4")
    copy("single_face.mp4")
    writer.release()
    return path


def write_config(directory: Path, **extra: object) -> Path:
    """A daemon config for the tests, with its own state folder."""
    cfg = {
        "vehicle_id": VEHICLE,
        "state_dir": str(directory / "state"),
        "rules": RULES,
        "mqtt": {"reconnect_min_s": 0.1, "reconnect_max_s": 0.5, "state_interval_s": 0.5, "health_interval_s": 1.0},
        "logging": {"format": "json", "stats_interval_s": 2.0},
        **extra,
    }
    path = directory / "cabin-monitor.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Daemon(DaemonProcess):
    """``cabin-monitor run --config CONFIG ARGS`` for these tests."""

    def __init__(self, directory: Path, config: Path, *args: str, env: Mapping[str, str] | None = None) -> None:
        super().__init__(directory, ["--config", str(config), *args], env=env)


DaemonStarter = Callable[..., Daemon]


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[DaemonStarter]:
    """Starts ``cabin-monitor run --config CONFIG ARGS``; daemons still running at the end are killed."""
    started: list[Daemon] = []

    def start(config: Path, *args: str, env: Mapping[str, str] | None = None) -> Daemon:
        daemon = Daemon(tmp_path, config, *args, env=env)
        started.append(daemon)
        return daemon

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.kill()


def events(messages: list[RecordedMessage]) -> list[dict[str, Any]]:
    """Event payloads in arrival order, de-duplicated on event_id."""
    seen: set[object] = set()
    out = []
    for m in messages:
        if m.topic == f"{PREFIX}/events":
            payload = json.loads(m.payload)
            if payload["event_id"] not in seen:
                seen.add(payload["event_id"])
                out.append(payload)
    return out


def more_events_than(n: int) -> Callable[[list[RecordedMessage]], bool]:
    """A recorder predicate: more than n distinct events have arrived."""
    return lambda messages: len(events(messages)) > n


def retained(url: str, topic: str, timeout_s: float = 10.0) -> bytes:
    """The retained message on ``topic``, read by a fresh clean-session subscriber."""
    with MqttRecorder(url, [topic], client_id=f"probe-{time.monotonic_ns()}", clean_session=True) as probe:
        msgs = probe.wait_for(lambda ms: any(m.retain for m in ms), timeout_s)
    return next(m.payload for m in msgs if m.retain)


def test_command_line_overrides_win_over_the_file_and_are_validated_like_it(tmp_path: Path) -> None:
    """Each override replaces the file's value; an invalid one is a configuration error (exit code 2)."""
    config = write_config(tmp_path)
    model = tmp_path / "other.onnx"
    overrides = Overrides(
        source="0",
        loop=True,
        fast=True,
        mqtt_url="mqtt://bus:1884",
        vehicle_id="car-9",
        model_path=model,
        providers=("cuda", "cpu"),
    )
    cfg = load(config, overrides)
    assert (cfg.camera.source, cfg.camera.loop, cfg.camera.file_pacing) == ("0", True, "fast")
    assert (cfg.mqtt.url, cfg.vehicle_id) == ("mqtt://bus:1884", "car-9")
    assert (cfg.emotion.model_path, cfg.emotion.providers) == (model, ("cuda", "cpu"))
    assert cfg.rules.stress.sustain_s == 0.5 and cfg.mqtt.state_interval_s == 0.5  # from the file
    for bad in (Overrides(mqtt_url="http://bus"), Overrides(vehicle_id="car 9"), Overrides(providers=("npu",))):
        with pytest.raises(ConfigurationError) as err:
            load(config, bad)
        assert err.value.exit_code == 2


def test_command_line_overrides_keep_the_files_values_apart_from_the_defaults(tmp_path: Path) -> None:
    """After the command line's overrides the configuration still tells what the file set from its defaults."""
    cfg = load(write_config(tmp_path), Overrides(source="0", loop=True, mqtt_url="mqtt://bus:1884"))
    assert paths_set(cfg.rules) == {".".join(p) for p in leaf_paths(RULES)}
    assert {"camera.source", "camera.loop", "mqtt.url", "mqtt.state_interval_s"} <= paths_set(cfg)
    assert not {"camera.fps", "rules.stress.severity", "mqtt.keepalive_s"} & paths_set(cfg)


def leaf_paths(mapping: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The path of every leaf of a nested mapping."""
    out: list[tuple[str, ...]] = []
    for key, value in mapping.items():
        out += leaf_paths(value, (*prefix, key)) if isinstance(value, dict) else [(*prefix, key)]
    return out


def test_the_broker_sink_and_remote_rules_exist_only_with_a_broker(tmp_path: Path) -> None:
    """With mqtt.url: an MQTT sink, its outbox and the persisted rule overrides; without: stdout, file rules."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "rules_override.json").write_text(json.dumps({"stress": {"sustain_s": 7}}))
    video = Overrides(source=str(sample_path("single_face.mp4")))
    with_broker = build_pipeline(load(write_config(tmp_path), replace(video, mqtt_url="mqtt://127.0.0.1:1")))
    with_broker.processor.close()
    assert isinstance(with_broker.sink, MqttSink)
    assert (state / "outbox.sqlite").is_file()
    assert with_broker.processor.rules.config.stress.sustain_s == 7
    without = build_pipeline(load(write_config(tmp_path), video))
    without.processor.close()
    assert isinstance(without.sink, StdoutSink)
    assert without.processor.rules.config.stress.sustain_s == 0.5


def test_daemon_publishes_events_status_health_and_state(
    mqtt_broker: MosquittoBroker, tmp_path: Path, face_gap_video: Path, start_daemon: DaemonStarter
) -> None:
    """On a real clip the daemon publishes the expected events in order, state, health and online/offline status."""
    config = write_config(tmp_path)
    with MqttRecorder(mqtt_broker.url, [f"{PREFIX}/#"]) as recorder:
        daemon = start_daemon(config, "--source", str(face_gap_video), "--fast", "--mqtt-url", mqtt_broker.url)
        assert daemon.wait() == 0, daemon.logs()[-3000:]
        msgs = recorder.wait_for(lambda ms: len(events(ms)) >= len(ONE_PASS), 10)
    got = events(msgs)
    assert [(e["type"], e["phase"]) for e in got] == ONE_PASS
    starts = {e["event_id"]: e for e in got if e["phase"] == "start"}
    for end in (e for e in got if e["phase"] == "end"):
        assert end["start_event_id"] in starts
    assert all(e["schema_version"] == 1 and e["vehicle_id"] == VEHICLE for e in got)
    assert got[0]["emotions"] and abs(sum(got[0]["emotions"].values()) - 1.0) < 0.01
    statuses = [m.payload for m in msgs if m.topic == f"{PREFIX}/status"]
    assert statuses[0] == b"online" and statuses[-1] == b"offline"
    assert any(m.topic.startswith(f"{PREFIX}/occupants/") and m.topic.endswith("/state") for m in msgs)
    health = json.loads(retained(mqtt_broker.url, f"{PREFIX}/health"))
    assert health["camera"]["state"] == "ended"
    assert health["pipeline"]["frames_processed"] > 200
    assert health["model"]["provider_in_use"] == "CPUExecutionProvider"
    assert retained(mqtt_broker.url, f"{PREFIX}/status") == b"offline"


def test_sigkill_leaves_the_last_will(
    mqtt_broker: MosquittoBroker, tmp_path: Path, face_gap_video: Path, start_daemon: DaemonStarter
) -> None:
    """After SIGKILL the broker publishes the retained 'offline' last will."""
    config = write_config(tmp_path)
    daemon = start_daemon(config, "--source", str(face_gap_video), "--loop", "--mqtt-url", mqtt_broker.url)
    with MqttRecorder(mqtt_broker.url, [f"{PREFIX}/#"]) as recorder:
        recorder.wait_for(lambda ms: any(m.topic == f"{PREFIX}/status" and m.payload == b"online" for m in ms), 30)
        assert retained(mqtt_broker.url, f"{PREFIX}/status") == b"online"
        daemon.kill()
        recorder.wait_for(lambda ms: ms[-1].topic == f"{PREFIX}/status" and ms[-1].payload == b"offline", 10)
    assert retained(mqtt_broker.url, f"{PREFIX}/status") == b"offline"


def test_sigterm_drains_closes_open_events_and_exits_zero(
    mqtt_broker: MosquittoBroker, tmp_path: Path, face_gap_video: Path, start_daemon: DaemonStarter
) -> None:
    """SIGTERM while an event is open: the daemon ends it, delivers it and exits 0."""
    config = write_config(tmp_path)
    daemon = start_daemon(config, "--source", str(face_gap_video), "--loop", "--mqtt-url", mqtt_broker.url)
    with MqttRecorder(mqtt_broker.url, [f"{PREFIX}/#"]) as recorder:
        recorder.wait_for(lambda ms: len(events(ms)) >= 1, 30)
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0, daemon.logs()[-3000:]
        msgs = recorder.wait_for(lambda ms: ms[-1].payload == b"offline", 10)
    got = events(msgs)
    opened = {e["event_id"] for e in got if e["phase"] == "start"}
    closed = {e["start_event_id"] for e in got if e["phase"] == "end"}
    assert opened and opened == closed


def outbox_depth(state_dir: Path) -> int:
    """Rows still pending in a daemon's outbox file."""
    with sqlite3.connect(state_dir / "outbox.sqlite") as db:
        return int(db.execute("select count(*) from outbox").fetchone()[0])


def outbox_payloads(state_dir: Path) -> list[dict[str, Any]]:
    """The events still pending in a daemon's outbox file, oldest first."""
    with sqlite3.connect(state_dir / "outbox.sqlite") as db:
        return [json.loads(row[0]) for row in db.execute("select payload from outbox order by row_id")]


def reopen_in_ledger(state_dir: Path, start: Mapping[str, Any]) -> None:
    """Note a start as open in the daemon's ledger, as a daemon killed after writing its end to the outbox and
    before updating the ledger leaves it."""
    ledger = OpenEventLedger(state_dir / "open_events.json")
    ledger.load()
    fields = {key: start[key] for key in ("event_id", "type", "rule", "occupant_id", "seat", "score", "severity")}
    ledger.record(Event(**fields, phase=Phase.START, capture_s=0.0, wall_time_s=utc_epoch_s(start["ts"]), emotions={}))


def test_events_survive_a_daemon_kill_while_the_broker_is_down(
    tmp_path: Path, face_gap_video: Path, start_daemon: DaemonStarter
) -> None:
    """Events queued while the broker is unreachable are sent by the next daemon after a SIGKILL, and the last
    stress is ended exactly once, whether the kill came before its end reached the outbox or after."""
    broker = MosquittoBroker(tmp_path / "broker", persistence=True)
    config = write_config(tmp_path)
    state_dir = tmp_path / "state"
    first = start_daemon(config, "--source", str(face_gap_video), "--fast", "--mqtt-url", broker.url)
    wait_until(lambda: any(r.get("event") == "source ended" for r in first.log_records()), 60, "end of the clip")
    first.kill()
    queued = outbox_payloads(state_dir)
    pending = len(queued)
    assert pending >= 5  # every event of the pass but perhaps the closing one
    # The kill may land between the outbox write of the closing end and the ledger update: make it so.
    reopen_in_ledger(state_dir, queued[4])
    with broker, MqttRecorder(broker.url, [f"{PREFIX}/events"]) as recorder:
        second = start_daemon(config, "--source", str(sample_path("no_face.mp4")), "--fast", "--mqtt-url", broker.url)
        assert second.wait() == 0, second.logs()[-3000:]
        recorder.wait_for(lambda ms: len(events(ms)) >= len(ONE_PASS), 15)
        time.sleep(1.0)  # a second end would come right after the first
        got = events(recorder.messages)
    assert [(e["type"], e["phase"]) for e in got] == ONE_PASS
    assert [e["interrupted"] for e in got] == [False] * pending + [True] * (len(ONE_PASS) - pending)
    assert got[-1]["start_event_id"] == got[-2]["event_id"] == queued[4]["event_id"]
    assert got[-1]["event_id"] == end_event_id(queued[4]["event_id"])
    assert outbox_depth(state_dir) == 0


def test_an_event_left_open_by_a_killed_daemon_is_ended_as_interrupted_by_the_next(
    mqtt_broker: MosquittoBroker, tmp_path: Path, face_gap_video: Path, start_daemon: DaemonStarter
) -> None:
    """SIGKILL while stress is open: the next daemon ends it first, naming its start, with interrupted true;
    every start then has exactly one end, and a clean stop leaves nothing for a third run to end."""
    config = write_config(tmp_path)
    with MqttRecorder(mqtt_broker.url, [f"{PREFIX}/events"]) as recorder:
        first = start_daemon(config, "--source", str(face_gap_video), "--loop", "--mqtt-url", mqtt_broker.url)
        recorder.wait_for(lambda ms: any(e["phase"] == "start" for e in events(ms)), 90)
        first.kill()
        no_face = str(sample_path("no_face.mp4"))
        second = start_daemon(config, "--source", no_face, "--fast", "--mqtt-url", mqtt_broker.url)
        assert second.wait() == 0, second.logs()[-3000:]
        got = events(recorder.wait_for(lambda ms: any(e.get("interrupted") for e in events(ms)), 15))
        third = start_daemon(config, "--source", no_face, "--fast", "--mqtt-url", mqtt_broker.url)
        assert third.wait() == 0, third.logs()[-3000:]
    starts = [e for e in got if e["phase"] == "start"]
    ends = [e for e in got if e["phase"] == "end"]
    interrupted = [e for e in ends if e["interrupted"]]
    assert sorted(e["start_event_id"] for e in ends) == sorted(e["event_id"] for e in starts)
    assert interrupted and all(e["score"] == 0.0 and e["emotions"] == {} for e in interrupted)
    assert {e["start_event_id"] for e in interrupted} == {e["event_id"] for e in starts} - {
        e["start_event_id"] for e in ends if not e["interrupted"]
    }
    (logged,) = second.logged("events the previous run left open ended as interrupted")
    assert logged["events"] == len(interrupted)
    assert not third.logged("events the previous run left open ended as interrupted")


def test_broker_outage_loses_no_event(tmp_path: Path, face_gap_video: Path, start_daemon: DaemonStarter) -> None:
    """The broker goes down mid-run (twice, or $CABIN_MONITOR_SOAK_OUTAGES times); no event is lost or reordered."""
    outages = int(os.environ.get("CABIN_MONITOR_SOAK_OUTAGES", "2"))
    broker = MosquittoBroker(tmp_path / "broker", persistence=True)
    config = write_config(tmp_path)
    with broker, MqttRecorder(broker.url, [f"{PREFIX}/events"]) as recorder:
        daemon = start_daemon(config, "--source", str(face_gap_video), "--loop", "--mqtt-url", broker.url)
        delivered = 0
        for _ in range(outages):
            # Each outage starts only once events flow again after the previous one.
            delivered = len(events(recorder.wait_for(more_events_than(delivered), 30)))
            broker.stop()
            time.sleep(4.0)  # an outage long enough for events to happen while it lasts
            broker.restart()
        recorder.wait_for(more_events_than(delivered), 30)
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0, daemon.logs()[-3000:]
        stopped = [r for r in daemon.log_records() if r.get("event") == "stopped"]
        emitted = int(stopped[-1]["events"])  # type: ignore[call-overload]
        got = events(recorder.wait_for(lambda ms: len(events(ms)) >= emitted, 20))
    print(f"\nbroker outages: {outages}, events emitted: {emitted}, received (unique): {len(got)}")
    assert len(got) == emitted
    timestamps = [e["ts"] for e in got]
    assert timestamps == sorted(timestamps)
    assert outbox_depth(tmp_path / "state") == 0


def test_operator_config_set_is_applied_persisted_or_refused(
    mqtt_broker: MosquittoBroker, tmp_path: Path, face_gap_video: Path, start_daemon: DaemonStarter
) -> None:
    """config/set: a valid change is answered ok and persisted; a bad one is answered with the exact error."""
    import paho.mqtt.publish as publish

    config = write_config(tmp_path)
    daemon = start_daemon(config, "--source", str(face_gap_video), "--loop", "--mqtt-url", mqtt_broker.url)
    host, port = "127.0.0.1", int(mqtt_broker.url.rsplit(":", 1)[1])
    with MqttRecorder(mqtt_broker.url, [f"{PREFIX}/#"]) as recorder:
        recorder.wait_for(lambda ms: any(m.payload == b"online" for m in ms), 30)
        time.sleep(0.5)
        good = {"request_id": "r1", "rules": {"stress": {"sustain_s": 2.0}}}
        publish.single(f"{PREFIX}/config/set", json.dumps(good), qos=1, hostname=host, port=port)
        typo = {"request_id": "r2", "rules": {"stress": {"sustian_s": 1}}}
        publish.single(f"{PREFIX}/config/set", json.dumps(typo), qos=1, hostname=host, port=port)
        inverted = {"request_id": "r3", "rules": {"stress": {"enter_score": 0.1}}}
        publish.single(f"{PREFIX}/config/set", json.dumps(inverted), qos=1, hostname=host, port=port)
        publish.single(f"{PREFIX}/config/set", b"\xff not json", qos=1, hostname=host, port=port)
        msgs = recorder.wait_for(lambda ms: sum(m.topic.endswith("/config/result") for m in ms) >= 4, 15)
    results = [json.loads(m.payload) for m in msgs if m.topic.endswith("/config/result")]
    by_id = {r["request_id"]: r for r in results}
    assert by_id["r1"]["ok"] is True and by_id["r1"]["rules"]["stress"]["sustain_s"] == 2.0
    assert [(e["path"], by_id["r2"]["ok"]) for e in by_id["r2"]["errors"]] == [("rules.stress.sustian_s", False)]
    assert by_id["r3"]["errors"][0]["path"] == "rules.stress"
    assert "must be below enter_score" in by_id["r3"]["errors"][0]["message"]
    assert any(r["request_id"] is None and not r["ok"] for r in results)
    override = json.loads((tmp_path / "state" / "rules_override.json").read_text())
    assert override == {"stress": {"sustain_s": 2.0}}
    assert daemon.proc.poll() is None  # bad input never stops the daemon


def config_results(messages: list[RecordedMessage]) -> dict[str, dict[str, Any]]:
    """The config/result answers by request_id."""
    return {
        json.loads(m.payload)["request_id"]: json.loads(m.payload)
        for m in messages
        if m.topic == f"{PREFIX}/config/result"
    }


def test_sighup_keeps_remote_overrides_on_top_and_says_so(
    mqtt_broker: MosquittoBroker, tmp_path: Path, face_gap_video: Path, start_daemon: DaemonStarter
) -> None:
    """After a SIGHUP the override still wins, named in the log and rules/state; config/reset gives the file's
    value; a value set by an environment variable is named as such; a SIGHUP also takes a new rules_shadow."""
    import paho.mqtt.publish as publish

    def request(action: str, body: dict[str, Any]) -> None:
        publish.single(
            f"{PREFIX}/config/{action}", json.dumps(body), qos=1, hostname="127.0.0.1", port=mqtt_broker.port
        )

    def rules_state() -> dict[str, Any]:
        state: dict[str, Any] = json.loads(retained(mqtt_broker.url, f"{PREFIX}/rules/state"))
        return state

    config = write_config(tmp_path)
    env = clean_environment() | {"CABIN_MONITOR__RULES__UNEXPECTED_EXPRESSION__MIN_SCORE": "0.5"}
    daemon = start_daemon(config, "--source", str(face_gap_video), "--loop", "--mqtt-url", mqtt_broker.url, env=env)
    with MqttRecorder(mqtt_broker.url, [f"{PREFIX}/config/result"], clean_session=True) as recorder:
        wait_until(lambda: bool(daemon.logged("mqtt connected")), 60, "connected")
        assert rules_state()["cause"] == "start"
        assert rules_state()["sources"]["unexpected_expression.min_score"] == "environment"
        request("set", {"request_id": "s1", "rules": {"stress": {"sustain_s": 2.0}}})
        recorder.wait_for(lambda ms: "s1" in config_results(ms), 15)
        stress = cast(dict[str, Any], RULES["stress"]) | {"sustain_s": 1.0, "cooldown_s": 5.0}
        write_config(tmp_path, rules=RULES | {"stress": stress})
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: bool(daemon.logged("rules reloaded from the configuration file")), 30, "the reload")
        (reloaded,) = daemon.logged("rules reloaded from the configuration file")
        assert reloaded["remote_overrides_still_win"] == "stress.sustain_s (file 1.0, remote 2.0)"
        assert "also after SIGHUP" in reloaded["precedence"]
        wait_until(lambda: rules_state()["cause"] == "reload", 15, "rules/state after the reload")
        state = rules_state()
        assert (state["rules"]["stress"]["sustain_s"], state["rules"]["stress"]["cooldown_s"]) == (2.0, 5.0)
        assert (state["sources"]["stress.sustain_s"], state["sources"]["stress.cooldown_s"]) == ("remote", "file")
        assert state["sources"]["stress.severity"] == "default"
        assert state["sources"]["unexpected_expression.min_score"] == "environment"
        assert state["overrides"] == [{"path": "stress.sustain_s", "remote": 2.0, "file": 1.0}]
        request("reset", {"request_id": "r1"})
        recorder.wait_for(lambda ms: "r1" in config_results(ms), 15)
        reset = config_results(recorder.messages)["r1"]
        assert reset["ok"] and reset["rules"]["stress"]["sustain_s"] == 1.0 and reset["overrides"] == []
        assert not (tmp_path / "state" / "rules_override.json").exists()
        wait_until(lambda: rules_state()["cause"] == "config/reset", 15, "rules/state after the reset")
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: len(daemon.logged("rules reloaded from the configuration file")) == 2, 30, "the reload")
        assert daemon.logged("rules reloaded from the configuration file")[1]["remote_overrides_still_win"] == "none"
        assert "shadow" not in rules_state()
        write_config(tmp_path, rules=RULES, rules_shadow=RULES | {"stress": stress})  # a shadow set, by SIGHUP
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "shadow" in rules_state(), 30, "rules/state with the file's new shadow rules")
        assert rules_state()["shadow"]["rules"]["stress"]["sustain_s"] == 1.0
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0, daemon.logs()[-3000:]


FLOOD_REQUESTS = int(os.environ.get("CABIN_MONITOR_FLOOD_REQUESTS", "200"))
FLOOD_S = float(os.environ.get("CABIN_MONITOR_FLOOD_S", "4"))


def test_a_config_set_flood_keeps_events_and_frames_flowing(
    mqtt_broker: MosquittoBroker, tmp_path: Path, face_gap_video: Path, start_daemon: DaemonStarter
) -> None:
    """The daemon on a looped clip under a config/set flood: no event lost, every request answered or counted.

    Prints event delivery latency (the event's ts to its arrival) and pipeline fps before and during
    the flood; ``-s`` with CABIN_MONITOR_FLOOD_REQUESTS=2000 CABIN_MONITOR_FLOOD_S=30 gives the README figures.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    mqtt_settings = {"reconnect_min_s": 0.1, "reconnect_max_s": 0.5, "health_interval_s": 0.5}
    config = write_config(tmp_path, mqtt=mqtt_settings)
    daemon = start_daemon(config, "--source", str(face_gap_video), "--loop", "--mqtt-url", mqtt_broker.url)
    arrivals: list[tuple[float, str, dict[str, Any]]] = []  # (wall time, topic, payload)
    subscribed = threading.Event()

    def on_message(client: object, userdata: object, message: Any) -> None:
        arrivals.append((time.time(), message.topic, json.loads(message.payload)))

    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="flood-watcher")
    watcher.on_message = on_message
    watcher.on_subscribe = lambda *_args: subscribed.set()
    watcher.connect("127.0.0.1", mqtt_broker.port)
    watcher.subscribe([(f"{PREFIX}/events", 1), (f"{PREFIX}/health", 1)])
    watcher.loop_start()
    operator = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="flood-operator")
    operator.connect("127.0.0.1", mqtt_broker.port)
    operator.loop_start()
    try:
        assert subscribed.wait(10)
        wait_until(lambda: any(topic.endswith("/health") for _, topic, _ in arrivals), 90, "the first health")
        time.sleep(FLOOD_S)  # the baseline
        flood_start = time.time()
        sent = []
        for n in range(FLOOD_REQUESTS):
            body = {"request_id": f"flood-{n}", "rules": {"occupant_lost": {"lost_after_s": 1.0}}}
            sent.append(operator.publish(f"{PREFIX}/config/set", json.dumps(body), qos=1))
            time.sleep(FLOOD_S / FLOOD_REQUESTS)
        for info in sent:
            info.wait_for_publish(60)
        flood_end = time.time()
        time.sleep(1.0)
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.logs()[-3000:]
    finally:
        for client in (operator, watcher):
            client.disconnect()
            client.loop_stop()
    events = {e["event_id"]: (t, e) for t, topic, e in reversed(arrivals) if topic.endswith("/events")}  # first copy
    health = [(t, h) for t, topic, h in arrivals if topic.endswith("/health")]

    def delivery_s(start: float, end: float) -> list[float]:
        return [t - utc_epoch_s(e["ts"]) for t, e in events.values() if start <= utc_epoch_s(e["ts"]) < end]

    def fps(start: float, end: float) -> list[float]:
        return [h["pipeline"]["fps"] for t, h in health if start + 2.0 < t < end]  # past the fps window's edge

    remote = health[-1][1]["remote"]
    print(
        f"\nconfig/set flood on the daemon: {FLOOD_REQUESTS} requests in {flood_end - flood_start:.1f} s. "
        f"Event delivery ms before: {percentiles(delivery_s(0, flood_start))}; "
        f"during: {percentiles(delivery_s(flood_start, flood_end))}. "
        f"Pipeline fps before: {percentiles(fps(flood_start - FLOOD_S, flood_start), 1.0)}; "
        f"during: {percentiles(fps(flood_start, flood_end), 1.0)}. remote: {remote}"
    )
    accepted = {r["event_id"] for r in daemon.logged("event accepted")}
    assert accepted and accepted <= set(events)  # every accepted event arrived
    assert remote["received"] == FLOOD_REQUESTS and remote["answered"] + remote["dropped"] == FLOOD_REQUESTS
    assert remote["busy"] > 0


def percentiles(values: list[float], scale: float = 1000.0) -> str:
    """``p50 X, p95 Y, max Z (n=N)`` of the values times ``scale`` (seconds to ms by default)."""
    if not values:
        return "no samples"
    ordered = sorted(v * scale for v in values)
    p50, p95 = ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    return f"p50 {p50:.1f}, p95 {p95:.1f}, max {ordered[-1]:.1f} (n={len(ordered)})"


def test_events_print_to_stdout_without_a_broker(
    tmp_path: Path, face_gap_video: Path, start_daemon: DaemonStarter
) -> None:
    """With no broker configured, events are JSON lines on stdout and logs stay on stderr."""
    daemon = start_daemon(write_config(tmp_path), "--source", str(face_gap_video), "--fast")
    assert daemon.wait() == 0, daemon.logs()[-3000:]
    lines = daemon.out_path.read_text().splitlines()
    got = [json.loads(line) for line in lines]
    assert [(e["type"], e["phase"]) for e in got] == ONE_PASS


def test_bad_config_exits_with_a_clear_message(tmp_path: Path) -> None:
    """A broken config file stops start-up with exit code 2 and the problem on stderr."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  stress:\n    sustain_s: -1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "cabin_monitor", "run", "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "rules.stress.sustain_s (line 3)" in proc.stderr


def test_unreachable_model_or_source_exit_with_a_clear_message(tmp_path: Path) -> None:
    """A missing video file or model file is named in the error; exit code 2, which systemd does not restart."""
    proc = subprocess.run(
        [sys.executable, "-m", "cabin_monitor", "run", "--source", str(tmp_path / "none.mp4")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "video file not found" in proc.stderr
    cfg = write_config(tmp_path, emotion={"model_path": str(tmp_path / "none.onnx")})
    proc = subprocess.run(
        [sys.executable, "-m", "cabin_monitor", "run", "--config", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "emotion model not found" in proc.stderr


def test_missing_tls_certificate_refuses_to_start(tmp_path: Path) -> None:
    """A configured CA file that does not exist stops start-up with the file named and exit code 2."""
    missing = tmp_path / "certs" / "ca.crt"
    cfg = write_config(tmp_path, mqtt={"url": "mqtts://127.0.0.1:8883", "tls": {"ca_file": str(missing)}})
    clip = str(sample_path("single_face.mp4"))
    proc = subprocess.run(
        [sys.executable, "-m", "cabin_monitor", "run", "--config", str(cfg), "--source", clip],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "ca_file" in proc.stderr


def test_a_damaged_outbox_is_moved_aside_not_a_crash_loop(
    mqtt_broker: MosquittoBroker, tmp_path: Path, face_gap_video: Path, start_daemon: DaemonStarter
) -> None:
    """A garbage outbox file is set aside with an error logged; the daemon starts and delivers events."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "outbox.sqlite").write_bytes(b"\x00garbage, not SQLite" * 100)
    config = write_config(tmp_path)
    with MqttRecorder(mqtt_broker.url, [f"{PREFIX}/events"]) as recorder:
        daemon = start_daemon(config, "--source", str(face_gap_video), "--fast", "--mqtt-url", mqtt_broker.url)
        assert daemon.wait() == 0, daemon.logs()[-3000:]
        recorder.wait_for(lambda ms: len(events(ms)) >= len(ONE_PASS), 10)
    moved = daemon.logged("outbox file damaged; moved aside, starting with an empty outbox")
    assert moved and "not a database" in moved[0]["reason"]
    assert list(state.glob("outbox.sqlite.unusable-*"))


def test_the_readable_events_of_a_damaged_outbox_are_delivered(
    mqtt_broker: MosquittoBroker, tmp_path: Path, start_daemon: DaemonStarter
) -> None:
    """An outbox with 2 pages overwritten is set aside at start; the events still readable in it are delivered."""
    state = tmp_path / "state"
    state.mkdir()
    path = state / "outbox.sqlite"
    put_events(path, 400)
    data = bytearray(path.read_bytes())
    middle = len(data) // 4096 // 2
    data[4096 * middle : 4096 * (middle + 2)] = b"\xa5" * 8192
    path.write_bytes(bytes(data))
    with MqttRecorder(mqtt_broker.url, [f"{PREFIX}/events"]) as recorder:
        daemon = start_daemon(
            write_config(tmp_path), "--source", str(sample_path("no_face.mp4")), "--fast", "--mqtt-url", mqtt_broker.url
        )
        assert daemon.wait() == 0, daemon.logs()[-3000:]
        (moved,) = daemon.logged("outbox file damaged; moved aside, starting with an empty outbox")
        recorder.wait_for(lambda ms: len(events(ms)) >= moved["salvaged"], 15)
    received = [e["event_id"] for e in events(recorder.messages)]
    print(f"damaged outbox: 400 pending, {moved['salvaged']} salvaged, {len(received)} delivered")
    assert 300 < len(received) == moved["salvaged"] < 400
    assert received == sorted(received, key=lambda event_id: int(event_id.split("-")[1]))
    assert list(state.glob("outbox.sqlite.unusable-*"))


def run_once(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``cabin-monitor run --config CONFIG ARGS`` to the end, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "cabin_monitor", "run", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def plain_lines(stderr: str) -> list[str]:
    """The lines of stderr that are not JSON log records."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]


def put_events(path: Path, count: int) -> None:
    """Leave ``count`` pending events in the outbox at ``path``."""
    with Outbox(path) as outbox:
        for i in range(count):
            outbox.put(
                f"pending-{i}",
                f"{PREFIX}/events",
                json.dumps({"event_id": f"pending-{i}"}).encode(),
                "warning",
                time.time(),
            )


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_full_or_read_only_state_folder_at_start_up_still_monitors_and_delivers(
    fault: str, mqtt_broker: MosquittoBroker, tmp_path: Path, start_daemon: DaemonStarter
) -> None:
    """A state folder full or read-only before start-up: the daemon runs (before: exit 1 or 2), health says so,
    the pending events are delivered and new ones go out from memory; exit 0 at the end of the clip."""
    with tmpfs(tmp_path / "state", 256) as state:
        put_events(state / "outbox.sqlite", 3)
        filler = fill(state) if fault == "full" else None
        if fault == "read-only":
            remount(state, read_only=True)
        config = write_config(tmp_path, outbox={"fallback_path": str(tmp_path / "run" / "held-events.sqlite")})
        try:
            with MqttRecorder(mqtt_broker.url, [f"{PREFIX}/events", f"{PREFIX}/health"]) as recorder:
                daemon = start_daemon(
                    config, "--source", str(sample_path("single_face.mp4")), "--fast", "--mqtt-url", mqtt_broker.url
                )
                assert daemon.wait() == 0, daemon.logs()[-3000:]
                accepted = [r["event_id"] for r in daemon.logged("event accepted")]
                pending = [f"pending-{i}" for i in range(3)]
                recorder.wait_for(lambda ms: {e["event_id"] for e in events(ms)} >= {*pending, *accepted}, 15)
        finally:
            if fault == "read-only":
                remount(state, read_only=False)
        assert filler is None or filler.exists()
    states = {h["outbox"]["state"] for h in health_payloads(recorder.messages)}
    print(f"{fault} state folder at start-up: {len(accepted)} accepted, 3 pending delivered, health {states}")
    assert [e["event_id"] for e in events(recorder.messages)][:3] == pending
    assert accepted and states == {"disk_full" if fault == "full" else "unwritable"}


def test_a_full_state_folder_holds_events_in_memory_and_loses_none(
    mqtt_broker: MosquittoBroker, tmp_path: Path, face_gap_video: Path, start_daemon: DaemonStarter
) -> None:
    """State on a 256 KiB tmpfs filled mid-run: faces still read, events held in memory (health: disk_full) and
    delivered from there while the disk stays full, failed deletes kept off the wire; once space is back every
    accepted event has arrived once, in order, with no reconnect."""
    with tmpfs(tmp_path / "state", 256) as state:
        config = write_config(tmp_path)
        with MqttRecorder(mqtt_broker.url, [f"{PREFIX}/events", f"{PREFIX}/health"]) as recorder:
            daemon = start_daemon(config, "--source", str(face_gap_video), "--loop", "--mqtt-url", mqtt_broker.url)
            recorder.wait_for(more_events_than(1), 90)
            with pin_wal(state / "outbox.sqlite"):
                filler = fill(state)
                wait_until(lambda: bool(daemon.logged(HELD)), 60, "the outbox to report a full disk")
                accepted_at_fault = len(daemon.logged("event accepted"))
                wait_until(lambda: len(daemon.logged("event accepted")) >= accepted_at_fault + 3, 60, "3 more events")
                while_full = [r["event_id"] for r in daemon.logged("event accepted")]
                recorder.wait_for(lambda ms: {e["event_id"] for e in events(ms)} >= set(while_full), 30)
                full = [h for h in health_payloads(recorder.messages) if h["outbox"]["state"] == "disk_full"]
                # Received before the filler goes. (The daemon's other file in the folder, the open-event ledger,
                # shrinks and grows as events open and end, so the outbox may find a page meanwhile.)
                assert filler.exists(), "received while the disk was still full"
                filler.unlink()
            wait_until(lambda: bool(daemon.logged(WRITABLE)), 30, "the outbox to be written again")
            daemon.proc.send_signal(signal.SIGTERM)
            assert daemon.wait() == 0, daemon.logs()[-3000:]
            accepted = [r["event_id"] for r in daemon.logged("event accepted")]
            recorder.wait_for(lambda ms: {e["event_id"] for e in events(ms)} >= set(accepted), 15)
    received = [e["event_id"] for e in events(recorder.messages)]
    copies = sum(1 for m in recorder.messages if m.topic == f"{PREFIX}/events")
    most_held = max(h["outbox"]["memory_depth"] for h in full) if full else 0
    print(
        f"full state folder: {len(accepted)} accepted, {len(received)} received, {copies - len(received)} duplicates, "
        f"up to {most_held} held in memory; {len(while_full) - accepted_at_fault} accepted after the full disk was "
        f"reported, all {len(while_full)} accepted by then received before space was freed"
    )
    assert received == accepted
    assert full and full[0]["status"] == "degraded" and "full" in full[0]["outbox"]["last_error"]
    assert full[-1]["pipeline"]["frames_processed"] > full[0]["pipeline"]["frames_processed"], "reading faces"
    assert not daemon.logged("mqtt connection lost") and not daemon.logged("mqtt sender error; reconnecting")
    assert copies == len(received), "no duplicates without a reconnect"


def test_events_held_in_memory_survive_a_daemon_kill_through_the_fallback_file(
    tmp_path: Path, face_gap_video: Path, start_daemon: DaemonStarter
) -> None:
    """Broker down, state folder full: events held in memory are kept in the fallback file, and after a SIGKILL
    with an event open the next daemon (space freed, broker back) sends every event the first one accepted, in
    order, once, and ends the open one although the full folder kept it out of the ledger."""
    broker = MosquittoBroker(tmp_path / "broker")
    fallback = tmp_path / "run" / "held-events.sqlite"
    with tmpfs(tmp_path / "state", 256) as state:
        config = write_config(tmp_path, outbox={"fallback_path": str(fallback)})
        first = start_daemon(config, "--source", str(face_gap_video), "--loop", "--mqtt-url", broker.url)
        wait_until(lambda: bool(first.logged("event accepted")), 90, "a first event")
        with pin_wal(state / "outbox.sqlite"):
            filler = fill(state)
            wait_until(lambda: bool(first.logged(HELD)), 60, "the outbox to report a full disk")
            at_fault = len(first.logged("event accepted"))
            wait_until(
                lambda: (
                    len(accepted := first.logged("event accepted")) >= at_fault + 3 and accepted[-1]["phase"] == "start"
                ),
                60,
                "3 more events, the last a start",
            )
            first.kill()
            accepted = [r["event_id"] for r in first.logged("event accepted")]
            with sqlite3.connect(fallback) as db:
                kept = db.execute("select count(*) from held").fetchone()[0]
            assert kept >= 3, "events held in memory were kept in the fallback file"
            filler.unlink()
        with broker, MqttRecorder(broker.url, [f"{PREFIX}/events"]) as recorder:
            second = start_daemon(
                config, "--source", str(sample_path("no_face.mp4")), "--fast", "--mqtt-url", broker.url
            )
            assert second.wait() == 0, second.logs()[-3000:]
            recorder.wait_for(lambda ms: {e["event_id"] for e in events(ms)} >= set(accepted), 15)
        (taken_in,) = second.logged(TAKEN_IN)
    received = [e["event_id"] for e in events(recorder.messages)]
    print(f"fallback file: {len(accepted)} accepted before the kill, {kept} kept there, {len(received)} received")
    assert received[: len(accepted)] == accepted and len(set(received)) == len(received)
    assert taken_in["events"] == kept
    got = events(recorder.messages)
    started = sorted(e["event_id"] for e in got if e["phase"] == "start")
    assert sorted(e["start_event_id"] for e in got if e["phase"] == "end") == started
    assert got[-1]["interrupted"] and got[-1]["start_event_id"] == accepted[-1]


def test_a_full_state_folder_leaves_no_start_without_an_end_after_a_kill(
    mqtt_broker: MosquittoBroker, tmp_path: Path, face_gap_video: Path, start_daemon: DaemonStarter
) -> None:
    """State folder full, broker up: a start and an end delivered from memory are noted beside the fallback file, so
    after a SIGKILL the next start ends that start once and sends no end again."""
    fallback = tmp_path / "run" / "held-events.sqlite"
    with tmpfs(tmp_path / "state", 256) as state:
        config = write_config(tmp_path, outbox={"fallback_path": str(fallback)})
        with MqttRecorder(mqtt_broker.url, [f"{PREFIX}/events"]) as recorder:
            first = start_daemon(config, "--source", str(face_gap_video), "--loop", "--mqtt-url", mqtt_broker.url)
            recorder.wait_for(lambda ms: any(e["phase"] == "start" for e in events(ms)), 90)
            with pin_wal(state / "outbox.sqlite"):
                filler = fill(state)
                wait_until(lambda: bool(first.logged(HELD)), 60, "the outbox to report a full disk")
                at_fault = len(first.logged("event accepted"))

                def an_end_then_a_start_delivered() -> bool:
                    accepted = first.logged("event accepted")
                    phases = [r["phase"] for r in accepted[at_fault:]]
                    received = {e["event_id"] for e in events(recorder.messages)}
                    return "end" in phases and phases[-1] == "start" and {r["event_id"] for r in accepted} <= received

                wait_until(an_end_then_a_start_delivered, 60, "an end and a start delivered from memory")
                first.kill()
                filler.unlink()
            second = start_daemon(
                config, "--source", str(sample_path("no_face.mp4")), "--fast", "--mqtt-url", mqtt_broker.url
            )
            assert second.wait() == 0, second.logs()[-3000:]
            time.sleep(1.0)  # an end sent again would come right after the others
    sent = [json.loads(m.payload) for m in recorder.messages if m.topic == f"{PREFIX}/events"]
    starts = [e["event_id"] for e in sent if e["phase"] == "start"]
    ends = [e["start_event_id"] for e in sent if e["phase"] == "end"]
    print(f"full state folder, SIGKILL: {len(starts)} starts, {len(ends)} ends received")
    assert sorted(ends) == sorted(starts), "every start exactly one end"
    assert any(e["interrupted"] and e["start_event_id"] == starts[-1] for e in sent), "the last start, interrupted"
    assert first.logged("open-event ledger cannot be written in the state folder; kept beside the outbox fallback file")


TAKEN_IN = "events an earlier run kept in the outbox fallback file taken in"
HELD = "outbox file cannot be written; events are held in memory until it can"
WRITABLE = "outbox file writable again; events held in memory are written"


def health_payloads(messages: list[RecordedMessage]) -> list[dict[str, Any]]:
    """The health payloads received, in order."""
    return [json.loads(m.payload) for m in messages if m.topic == f"{PREFIX}/health"]


def test_run_with_a_broker_needs_a_source_and_a_vehicle_id(tmp_path: Path) -> None:
    """`run --mqtt-url` on the bundled sample with the demo vehicle id is refused (exit 2); demo is for that."""
    proc = subprocess.run(
        [sys.executable, "-m", "cabin_monitor", "run", "--mqtt-url", "mqtt://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "camera.source (--source) and vehicle_id (--vehicle-id)" in proc.stderr and "demo" in proc.stderr


# Live stress that the clip never holds long enough (600 s), beside the shadow rules that open it after 0.5 s.
SLOW_STRESS = cast(dict[str, Any], RULES["stress"]) | {"sustain_s": 600.0}


def shadow_events(messages: list[RecordedMessage]) -> list[dict[str, Any]]:
    """The shadow rules' event payloads in arrival order (QoS 0: at most once each)."""
    return [json.loads(m.payload) for m in messages if m.topic == f"{PREFIX}/shadow/events"]


def request_until_answered(
    broker: MosquittoBroker, recorder: MqttRecorder, action: str, body: dict[str, Any], timeout_s: float = 20.0
) -> dict[str, Any]:
    """Publish a request every second until its first answer arrives: a daemon that has just connected may not
    have subscribed yet, and a change is applied at most once per request_id."""
    import paho.mqtt.publish as publish

    def first_answer(messages: list[RecordedMessage]) -> dict[str, Any] | None:
        answers = (json.loads(m.payload) for m in messages if m.topic == f"{PREFIX}/config/result")
        return next((a for a in answers if a["request_id"] == body["request_id"]), None)

    deadline = time.monotonic() + timeout_s
    while True:
        publish.single(f"{PREFIX}/config/{action}", json.dumps(body), qos=1, hostname="127.0.0.1", port=broker.port)
        try:
            answer = first_answer(recorder.wait_for(lambda ms: first_answer(ms) is not None, 1.0))
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
            continue
        assert answer is not None
        return answer


def test_only_the_shadow_rules_raise_the_event_their_threshold_allows(
    mqtt_broker: MosquittoBroker, tmp_path: Path, face_gap_video: Path, start_daemon: DaemonStarter
) -> None:
    """Live stress needs 600 s, the file's rules_shadow 0.5 s: on one pass of the clip only the shadow rules open
    stress (0.5 s of the face after it is confirmed, both times), on shadow/events alone."""
    config = write_config(tmp_path, rules=RULES | {"stress": SLOW_STRESS}, rules_shadow=RULES)
    with MqttRecorder(mqtt_broker.url, [f"{PREFIX}/#"]) as recorder:
        daemon = start_daemon(config, "--source", str(face_gap_video), "--fast", "--mqtt-url", mqtt_broker.url)
        assert daemon.wait() == 0, daemon.logs()[-3000:]
        msgs = recorder.wait_for(lambda ms: len(shadow_events(ms)) >= len(ONE_PASS), 10)
    live, shadow = events(msgs), shadow_events(msgs)
    assert [(e["type"], e["phase"]) for e in live] == [("occupant_lost", "start"), ("occupant_lost", "end")]
    assert [(e["type"], e["phase"]) for e in shadow] == ONE_PASS
    assert not {e["event_id"] for e in shadow} & {e["event_id"] for e in live}
    # Timed on the clip's frames (30 fps): 0.5 s of a face after it is confirmed, each time the face is there.
    first_start, back = shadow[0]["frame_id"], shadow[3]["frame_id"]
    assert 15 <= first_start <= 25 and 15 <= shadow[4]["frame_id"] - back <= 20, [e["frame_id"] for e in shadow]
    assert json.loads(retained(mqtt_broker.url, f"{PREFIX}/rules/state"))["shadow"]["sources"]["stress.sustain_s"] == (
        "file"
    )


def test_shadow_rules_set_at_run_time_run_at_once_and_again_after_a_restart(
    mqtt_broker: MosquittoBroker, tmp_path: Path, face_gap_video: Path, start_daemon: DaemonStarter
) -> None:
    """config/set with shadow makes the shadow set from the live rules: its events start at once; after a restart
    (a kill) the persisted set is in rules/state and runs again, until config/reset with shadow stops it; live
    events never include them."""
    config = write_config(tmp_path, rules=RULES | {"stress": SLOW_STRESS})
    args = ("--source", str(face_gap_video), "--loop", "--mqtt-url", mqtt_broker.url)
    body = {"request_id": "s1", "shadow": True, "rules": {"stress": {"sustain_s": 0.5}}}
    with MqttRecorder(mqtt_broker.url, [f"{PREFIX}/#"]) as recorder:
        daemon = start_daemon(config, *args)
        recorder.wait_for(lambda ms: any(m.payload == b"online" for m in ms), 30)
        assert request_until_answered(mqtt_broker, recorder, "set", body)["ok"]
        recorder.wait_for(lambda ms: any(e["type"] == "stress" for e in shadow_events(ms)), 15)
        daemon.kill()  # the change was persisted before it was answered
        first_run = len(recorder.messages)
        saved = json.loads((tmp_path / "state" / "rules_shadow_override.json").read_text())
        assert saved["patch"] == {"stress": {"sustain_s": 0.5}} and saved["live"]["stress"]["sustain_s"] == 600.0

        daemon = start_daemon(config, *args)
        wait_until(lambda: bool(daemon.logged("shadow rules overrides loaded")), 30, "the shadow set loaded")
        recorder.wait_for(lambda ms: any(e["type"] == "stress" for e in shadow_events(ms[first_run:])), 15)
        daemon.kill()
    state = json.loads(retained(mqtt_broker.url, f"{PREFIX}/rules/state"))
    assert (state["cause"], state["rules"]["stress"]["sustain_s"]) == ("start", 600.0)
    assert state["shadow"]["rules"]["stress"]["sustain_s"] == 0.5
    assert state["shadow"]["sources"]["stress.sustain_s"] == "remote"
    assert state["shadow"]["sources"]["stress.enter_score"] == "live"
    assert all(e["type"] != "stress" for e in events(recorder.messages))


def test_config_reset_with_shadow_stops_the_shadow_engine_and_ends_its_events(
    mqtt_broker: MosquittoBroker, tmp_path: Path, face_gap_video: Path, start_daemon: DaemonStarter
) -> None:
    """config/reset with shadow and no rules_shadow in the file: the shadow engine stops, its open events are
    ended on shadow/events, and rules/state has no shadow block."""
    config = write_config(tmp_path, rules=RULES | {"stress": SLOW_STRESS})
    daemon = start_daemon(config, "--source", str(face_gap_video), "--loop", "--mqtt-url", mqtt_broker.url)
    with MqttRecorder(mqtt_broker.url, [f"{PREFIX}/#"]) as recorder:
        recorder.wait_for(lambda ms: any(m.payload == b"online" for m in ms), 30)
        change = {"request_id": "s1", "shadow": True, "rules": {"stress": {"sustain_s": 0.5}}}
        assert request_until_answered(mqtt_broker, recorder, "set", change)["ok"]
        recorder.wait_for(lambda ms: any(e["type"] == "stress" for e in shadow_events(ms)), 15)
        answer = request_until_answered(mqtt_broker, recorder, "reset", {"request_id": "r1", "shadow": True})
        assert (answer["ok"], answer["shadow"], answer["rules"]) == (True, True, None)
        wait_until(lambda: len(daemon.logged("shadow rules reconfigured")) == 2, 15, "the shadow engine stopped")
        assert [r["running"] for r in daemon.logged("shadow rules reconfigured")] == [True, False]
        starts = {e["event_id"] for e in shadow_events(recorder.messages) if e["phase"] == "start"}
        recorder.wait_for(  # every shadow start ended, the open one by the reset at the latest
            lambda ms: starts <= {e["start_event_id"] for e in shadow_events(ms) if e["phase"] == "end"}, 10
        )
    daemon.kill()
    assert "shadow" not in json.loads(retained(mqtt_broker.url, f"{PREFIX}/rules/state"))
    assert not (tmp_path / "state" / "rules_shadow_override.json").exists()
