"""The ``bench`` command: the real threaded pipeline on a video file, measured two ways.

* Throughput: every frame, as fast as the pipeline takes them (``fps``, per-stage latency).
* Camera pace: the file played at its own frame rate like a live camera, with the
  latest-frame mailbox dropping what inference cannot take; ``e2e_ms`` is
  frame-to-reading latency, from the moment a frame is captured to the moment
  its emotion readings and events exist.
"""

from __future__ import annotations

import io
import threading
import time
from typing import Any, Literal

import numpy as np

from cabin_monitor.bus.mqtt import StdoutSink
from cabin_monitor.bus.remote import RulesControl
from cabin_monitor.config import CameraConfig, Config
from cabin_monitor.messages import Frame, FrameResult
from cabin_monitor.runtime.pipeline import Pipeline
from cabin_monitor.runtime.processor import STAGES, FrameProcessor
from cabin_monitor.vision.capture import FrameSource, SourceEnded


class _LimitedSource(FrameSource):
    """A file source that ends after ``max_frames`` frames."""

    def __init__(self, cfg: CameraConfig, stop: threading.Event, max_frames: int | None) -> None:
        super().__init__(cfg, stop)
        self._max = max_frames
        self.read_count = 0

    def read(self) -> Frame:
        if self._max is not None and self.read_count >= self._max:
            raise SourceEnded("frame limit reached")
        frame = super().read()
        self.read_count += 1
        return frame


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p95": 0.0}
    arr = np.asarray(values)
    return {"p50": round(float(np.percentile(arr, 50)), 2), "p95": round(float(np.percentile(arr, 95)), 2)}


def _run_pass(
    cfg: Config, processor: FrameProcessor, pacing: Literal["fast", "realtime"], max_frames: int | None
) -> dict[str, Any]:
    camera = cfg.camera.model_copy(update={"file_pacing": pacing, "loop": False})
    cfg = cfg.model_copy(update={"camera": camera})
    stop = threading.Event()
    source = _LimitedSource(cfg.camera, stop, max_frames)
    stages: dict[str, list[float]] = {name: [] for name in STAGES}
    e2e: list[float] = []
    done_at: list[float] = []
    faces: list[int] = []

    def record(result: FrameResult) -> None:
        now = time.monotonic()
        done_at.append(now)
        faces.append(len(result.readings))
        for name, ms in result.stage_ms.items():
            stages[name].append(ms)
        if pacing == "realtime":
            e2e.append((now - result.frame.capture_s) * 1000.0)

    control = RulesControl(cfg.rules, processor.model.class_names, None)
    sink = StdoutSink(cfg.vehicle_id, io.StringIO())
    pipeline = Pipeline(cfg, processor, source, sink, control, on_result=record, stop_event=stop)
    started = time.monotonic()
    pipeline.run()
    frames = len(done_at)
    # Warm-up (inside run) is excluded: the clock starts with the first frame done.
    elapsed = done_at[-1] - done_at[0] if frames > 1 else time.monotonic() - started
    return {
        "frames": frames,
        "frames_read": source.read_count,
        "fps": round((frames - 1) / elapsed, 2) if frames > 1 and elapsed > 0 else 0.0,
        "dropped_frames": pipeline.mailbox.dropped,
        "stale_frames": pipeline.health().pipeline.stale_frames,
        "faces_per_frame": round(float(np.mean(faces)), 2) if faces else 0.0,
        "e2e_ms": _percentiles(e2e),
        "stages": {name: _percentiles(v) for name, v in stages.items()},
    }


def run_model_bench(cfg: Config, batches: tuple[int, ...] = (1, 2, 4), runs: int = 200) -> dict[str, Any]:
    """The emotion model alone: latency per call and per face at several batch sizes, on real crops."""
    import cv2

    from cabin_monitor.assets import sample_path
    from cabin_monitor.messages import TrackedFace
    from cabin_monitor.vision.align import FaceAligner, grey
    from cabin_monitor.vision.detect import create_detector
    from cabin_monitor.vision.emotion import EmotionModel

    model = EmotionModel(cfg.emotion)
    image = cv2.imread(str(sample_path("multi_face.jpg")))
    detector = create_detector(cfg.detector.model_copy(update={"type": "yunet", "min_face_px": 16}))
    faces = detector.detect(Frame(0, 0.0, 0.0, image))
    detector.close()
    aligner = FaceAligner(model.input_size)
    crops = np.stack([aligner.align(grey(image), TrackedFace(f, "o", None)).crop for f in faces])
    report: dict[str, Any] = {"model": str(model.info.path), "provider": model.provider_in_use, "batches": {}}
    for batch in batches:
        x = np.resize(crops, (batch, *crops.shape[1:]))
        for _ in range(10):
            model.infer(x)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            model.infer(x)
            times.append((time.perf_counter() - t) * 1000.0)
        per_call = _percentiles(times)
        report["batches"][str(batch)] = {
            "call_ms": per_call,
            "per_face_ms": {k: round(v / batch, 2) for k, v in per_call.items()},
        }
    return report


def run_bench(cfg: Config, max_frames: int | None = None) -> dict[str, Any]:
    """Both passes on ``cfg.camera.source``; the top-level keys summarise them."""
    cfg = cfg.model_copy(update={"mqtt": cfg.mqtt.model_copy(update={"url": None})})
    processor = FrameProcessor(cfg)
    provider, model = processor.model.provider_in_use, str(processor.model.info.path)
    throughput = _run_pass(cfg, processor, "fast", max_frames)
    camera = _run_pass(cfg, FrameProcessor(cfg), "realtime", max_frames)
    return {
        "frames": throughput["frames"],
        "fps": throughput["fps"],
        "e2e_ms": camera["e2e_ms"],
        "stages": throughput["stages"],
        "provider": provider,
        "model": model,
        "detector": f"{cfg.detector.type}-{cfg.detector.range}" if cfg.detector.type == "blazeface" else "yunet",
        "faces_per_frame": throughput["faces_per_frame"],
        "throughput": throughput,
        "camera_pace": camera,
    }
