"""Tests of the threaded pipeline in-process: camera faults, health, stage failures and frame dropping."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from cabin_monitor.assets import sample_path
from cabin_monitor.bus.mqtt import MqttSink
from cabin_monitor.bus.outbox import Outbox
from cabin_monitor.bus.sinks import StdoutSink
from cabin_monitor.config import CameraConfig, Config, MqttConfig, TrackerConfig
from cabin_monitor.messages import Face, Frame, FrameResult
from cabin_monitor.rules.in_force import RulesInForce
from cabin_monitor.runtime.pipeline import EXIT_OK, EXIT_STAGE_FAILED, Pipeline
from cabin_monitor.runtime.ports import EventSink
from cabin_monitor.runtime.processor import FrameProcessor
from cabin_monitor.vision.capture import FrameSource, SourceSpec
from tests.support.broker import MosquittoBroker, MqttRecorder
from tests.support.camera import ScriptedCamera
from tests.support.helpers import wait_until

VIDEO = sample_path("single_face.mp4")


def make_pipeline(cfg: Config, sink: EventSink, opener: object = None, **kwargs: object) -> Pipeline:
    """A pipeline on the given config, sink and (optionally) fake camera opener."""
    stop = threading.Event()
    processor = FrameProcessor(cfg)
    source = FrameSource(cfg.camera, stop, opener=opener) if opener else FrameSource(cfg.camera, stop)  # type: ignore[arg-type]
    control = RulesInForce(cfg.rules, processor.model.class_names, None)
    return Pipeline(cfg, processor, source, sink, control, stop_event=stop, **kwargs)  # type: ignore[arg-type]


def test_camera_failure_is_recovered_and_reported_in_health(mqtt_broker: MosquittoBroker, tmp_path: Path) -> None:
    """A camera that stops mid-stream is reopened without a restart; the retained health tells the story."""
    opened: list[ScriptedCamera] = []

    def opener(spec: SourceSpec, cfg: CameraConfig) -> ScriptedCamera:
        cam = ScriptedCamera(VIDEO, fail_after=20 if not opened else None, frame_period_s=1 / 30)
        opened.append(cam)
        return cam

    cfg = Config(
        vehicle_id="car-9",
        camera=CameraConfig(source="0", reopen_initial_s=1.5, reopen_max_s=2.0),
        mqtt=MqttConfig(url=mqtt_broker.url, health_interval_s=0.5),
    )
    sink = MqttSink(cfg.mqtt, cfg.vehicle_id, Outbox(tmp_path / "outbox.sqlite"))
    pipeline = make_pipeline(cfg, sink, opener)
    runner = threading.Thread(target=pipeline.run)
    with MqttRecorder(mqtt_broker.url, ["cabin/car-9/health"]) as recorder:
        runner.start()
        wait_until(lambda: len(opened) == 2 and pipeline.health().frames_processed > 40, 30, "recovery")
        healths = [
            json.loads(m.payload)
            for m in recorder.wait_for(
                lambda ms: any(
                    json.loads(m.payload)["camera"]["reopen_count"] == 1
                    and json.loads(m.payload)["camera"]["state"] == "streaming"
                    for m in ms
                ),
                10,
            )
        ]
        pipeline.request_stop("test")
        runner.join(30)
    states = [h["camera"]["state"] for h in healths]
    outage = states.index("reopening")
    assert "streaming" in states[:outage] and "streaming" in states[outage:]
    assert healths[outage]["status"] == "degraded"
    recovered = healths[-1]
    assert recovered["camera"]["reopen_count"] == 1 and recovered["status"] == "ok"
    assert "read failed" in (recovered["camera"]["last_error"] or "")
    assert not runner.is_alive()


class ExplodingDetector:
    """A detector that fails on its fifth frame."""

    def __init__(self) -> None:
        self.calls = 0

    def detect(self, frame: Frame) -> list[Face]:
        self.calls += 1
        if self.calls == 5:
            raise RuntimeError("detector backend crashed")
        return []

    def close(self) -> None:
        pass


def test_a_crashed_stage_stops_the_daemon_with_a_failure_code(tmp_path: Path) -> None:
    """An exception inside a stage ends run() with exit code 1 (so systemd restarts it), not a hang."""
    cfg = Config(camera=CameraConfig(source=str(VIDEO), file_pacing="fast"))
    stop = threading.Event()
    processor = FrameProcessor(cfg, detector=ExplodingDetector())
    source = FrameSource(cfg.camera, stop)
    with (tmp_path / "events.jsonl").open("w") as events:
        sink = StdoutSink(cfg.vehicle_id, events)
        control = RulesInForce(cfg.rules, processor.model.class_names, None)
        pipeline = Pipeline(cfg, processor, source, sink, control, stop_event=stop)
        assert pipeline.run() == EXIT_STAGE_FAILED
    assert "detector backend crashed" in (pipeline.failure or "")


def test_a_slow_consumer_gets_the_newest_frames_and_drops_are_counted(tmp_path: Path) -> None:
    """At camera pace with slow inference, old frames are dropped (and counted), never processed late."""
    cfg = Config(camera=CameraConfig(source=str(VIDEO), file_pacing="realtime"), tracker=TrackerConfig())
    seen: list[int] = []

    def slow(result: FrameResult) -> None:
        seen.append(result.frame.frame_id)
        time.sleep(0.12)

    with (tmp_path / "events.jsonl").open("w") as events:
        pipeline = make_pipeline(cfg, StdoutSink(cfg.vehicle_id, events), on_result=slow)
        assert pipeline.run() == EXIT_OK
    assert pipeline.mailbox.dropped > 0
    assert seen == sorted(seen)
    assert len(seen) + pipeline.mailbox.dropped + pipeline.health().stale_frames >= 70


def test_latency_histograms_and_event_counts_cover_every_frame_and_event(tmp_path: Path) -> None:
    """Each stage's histogram counts every processed frame; events are counted once each by type and phase."""
    rules = {
        "smoothing_s": 0.0,
        "stress": {
            "classes": ["neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger"],
            "enter_score": 0.6,
            "sustain_s": 0.5,
            "exit_score": 0.4,
        },
        "unexpected_expression": {"enabled": False},
    }
    cfg = Config.model_validate({"camera": {"source": str(VIDEO), "file_pacing": "fast"}, "rules": rules})
    with (tmp_path / "events.jsonl").open("w") as events:
        pipeline = make_pipeline(cfg, StdoutSink(cfg.vehicle_id, events))
        assert pipeline.run() == EXIT_OK
    printed = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    metrics = pipeline.metrics()
    frames = pipeline.health().frames_processed
    assert frames > 0 and {h.count for h in metrics.stage_latency.values()} == {frames}
    for histogram in metrics.stage_latency.values():
        assert list(histogram.cumulative) == sorted(histogram.cumulative) and histogram.sum_s > 0
    assert metrics.frame_to_reading.count == 0  # a file read as fast as it goes has no capture-to-reading time
    kinds = [(e["type"], e["phase"]) for e in printed]
    assert ("stress", "start") in kinds and ("stress", "end") in kinds
    assert metrics.events == {kind: kinds.count(kind) for kind in set(kinds)}
