"""Tests of the threaded pipeline in-process: camera faults, health, stage failures and frame dropping."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from cabin_monitor.assets import sample_path
from cabin_monitor.capture import FrameSource, SourceSpec
from cabin_monitor.config import CameraConfig, Config, MqttConfig, TrackerConfig
from cabin_monitor.messages import Face, Frame, FrameResult
from cabin_monitor.outbox import Outbox
from cabin_monitor.pipeline import EXIT_OK, EXIT_STAGE_FAILED, Pipeline
from cabin_monitor.processor import FrameProcessor
from cabin_monitor.publish import EventSink, MqttSink, StdoutSink
from cabin_monitor.remote import RulesControl
from cabin_monitor.testing import MosquittoBroker, MqttRecorder, wait_until

VIDEO = sample_path("single_face.mp4")


class FlakyCamera:
    """A real capture of the sample clip posing as a camera; it stops delivering after ``fail_after`` reads."""

    def __init__(self, fail_after: int | None) -> None:
        self.cap = cv2.VideoCapture(str(VIDEO))
        self.reads = 0
        self.fail_after = fail_after

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return bool(self.cap.isOpened())

    def read(self) -> tuple[bool, np.ndarray | None]:
        self.reads += 1
        if self.fail_after is not None and self.reads > self.fail_after:
            return False, None
        ok, image = self.cap.read()
        if not ok:  # a camera never ends: rewind
            self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, image = self.cap.read()
        time.sleep(1 / 30)
        return ok, image

    def get(self, prop: int) -> float:
        return 30.0 if prop == cv2.CAP_PROP_FPS else float(self.cap.get(prop))

    def set(self, prop: int, value: float) -> bool:
        return True

    def release(self) -> None:
        self.cap.release()


def make_pipeline(cfg: Config, sink: EventSink, opener: object = None, **kwargs: object) -> Pipeline:
    """A pipeline on the given config, sink and (optionally) fake camera opener."""
    stop = threading.Event()
    processor = FrameProcessor(cfg)
    source = FrameSource(cfg.camera, stop, opener=opener) if opener else FrameSource(cfg.camera, stop)  # type: ignore[arg-type]
    control = RulesControl(cfg.rules, processor.model.class_names, None)
    return Pipeline(cfg, processor, source, sink, control, stop_event=stop, **kwargs)  # type: ignore[arg-type]


def test_camera_failure_is_recovered_and_reported_in_health(mqtt_broker: MosquittoBroker, tmp_path: Path) -> None:
    """A camera that stops mid-stream is reopened without a restart; the retained health tells the story."""
    opened: list[FlakyCamera] = []

    def opener(spec: SourceSpec, cfg: CameraConfig) -> FlakyCamera:
        cam = FlakyCamera(fail_after=20 if not opened else None)
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
        wait_until(lambda: len(opened) == 2 and pipeline.health().pipeline.frames_processed > 40, 30, "recovery")
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
        control = RulesControl(cfg.rules, processor.model.class_names, None)
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
    assert len(seen) + pipeline.mailbox.dropped + pipeline.health().pipeline.stale_frames >= 70
