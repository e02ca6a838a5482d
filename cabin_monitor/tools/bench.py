"""The ``bench`` command: the real threaded pipeline on a video file, measured two ways.

* Throughput: every frame, as fast as the pipeline takes them (``fps``, per-stage latency).
* Camera pace: the file played at its own frame rate like a live camera, with the
  latest-frame mailbox dropping what inference cannot take; ``e2e_ms`` is
  frame-to-reading latency, from the moment a frame is captured to the moment
  its emotion readings and events exist.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Sequence
from typing import Any, Literal

import cv2
import numpy as np

from cabin_monitor.assets import sample_path
from cabin_monitor.config import CameraConfig, Config
from cabin_monitor.daemon import build_pipeline
from cabin_monitor.messages import Frame, FrameResult
from cabin_monitor.metrics import percentiles
from cabin_monitor.runtime import cpu
from cabin_monitor.runtime.pipeline import Pipeline
from cabin_monitor.runtime.processor import STAGES
from cabin_monitor.tools.progress import Progress
from cabin_monitor.vision.align import FaceAligner
from cabin_monitor.vision.capture import FrameSource, SourceEnded, parse_source
from cabin_monitor.vision.detect import create_detector
from cabin_monitor.vision.emotion import EmotionModel
from cabin_monitor.vision.reader import crop_image


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


def _frame_count(source: str, max_frames: int | None) -> int | None:
    """Frames the pass will read, for the progress bar: the file's count, or the limit if smaller."""
    spec = parse_source(source)
    if spec.kind != "file":
        return max_frames
    cap = cv2.VideoCapture(str(spec.target))
    try:
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        cap.release()
    if count <= 0:
        return max_frames
    return min(count, max_frames) if max_frames else count


class _PassRecord:
    """What one bench pass saw, frame by frame: times, faces, readings, stage latencies, CPU samples."""

    def __init__(self, pacing: Literal["fast", "realtime"], bar: Progress) -> None:
        self.pacing = pacing
        self.bar = bar
        self.stages: dict[str, list[float]] = {name: [] for name in STAGES}
        self.e2e: list[float] = []
        self.done_at: list[float] = []
        self.faces: list[int] = []
        self.readings: list[int] = []
        self.detected: list[bool] = []
        self.read_at: dict[str, list[float]] = {}
        self.cpu_samples: list[cpu.CpuSample] = []  # the first frame done, then about once a second

    def record(self, result: FrameResult) -> None:
        """Note one processed frame (called on the inference thread)."""
        self.bar.advance()
        now = time.monotonic()
        if not self.cpu_samples or now - self.cpu_samples[-1].wall_s >= 1.0:
            # Sampled while the pipeline's threads are alive, so each is named; the last sample ends the span.
            self.cpu_samples.append(cpu.sample())
        self.done_at.append(now)
        self.faces.append(result.faces_in_view)
        self.readings.append(len(result.readings))
        self.detected.append(result.detected)
        for reading in result.readings:
            self.read_at.setdefault(reading.occupant_id, []).append(reading.capture_s)
        for name, ms in result.stage_ms.items():
            self.stages[name].append(ms)
        if self.pacing == "realtime":
            self.e2e.append((now - result.frame.capture_s) * 1000.0)

    def report(self, pipeline: Pipeline, frames_read: int, started: float) -> dict[str, Any]:
        """The pass's figures, from the first frame done to the last (warm-up and model load excluded)."""
        frames = len(self.done_at)
        elapsed = self.done_at[-1] - self.done_at[0] if frames > 1 else time.monotonic() - started
        samples = self.cpu_samples
        return {
            "frames": frames,
            "frames_read": frames_read,
            "fps": round((frames - 1) / elapsed, 2) if frames > 1 and elapsed > 0 else 0.0,
            "dropped_frames": pipeline.mailbox.dropped,
            "stale_frames": pipeline.health().stale_frames,
            "faces_per_frame": _mean(self.faces, 2),
            "readings_per_frame": _mean(self.readings, 2),
            "detector_frames": _mean(self.detected, 3),
            "occupant_read_hz": occupant_rates(self.read_at),
            **({"cpu": cpu.share(samples[0], samples[-1]).as_dict()} if len(samples) > 1 else {}),
            # Frame-to-reading latency means something only at camera pace; the fast pass has none.
            **({"e2e_ms": percentiles(self.e2e)} if self.e2e else {}),
            "stages": {name: percentiles(v) for name, v in self.stages.items()},
        }


def _mean(values: Sequence[float], digits: int) -> float:
    return round(float(np.mean(values)), digits) if values else 0.0


def _run_pass(
    cfg: Config, pacing: Literal["fast", "realtime"], max_frames: int | None
) -> tuple[dict[str, Any], Pipeline]:
    camera = cfg.camera.model_copy(update={"file_pacing": pacing, "loop": False})
    cfg = cfg.model_copy(update={"camera": camera})
    sources: list[_LimitedSource] = []

    def limited_source(camera: CameraConfig, stop: threading.Event) -> FrameSource:
        sources.append(_LimitedSource(camera, stop, max_frames))
        return sources[-1]

    bar = Progress(f"bench {pacing}", _frame_count(cfg.camera.source, max_frames))
    seen = _PassRecord(pacing, bar)
    pipeline = build_pipeline(cfg, on_result=seen.record, events_stream=io.StringIO(), source_factory=limited_source)
    started = time.monotonic()
    with bar:
        pipeline.run()
    return seen.report(pipeline, sources[0].read_count, started), pipeline


def occupant_rates(read_at: dict[str, list[float]]) -> dict[str, float]:
    """Readings per second of each occupant, over the span in which it was read (occupants read twice or more)."""
    rates = {}
    for occupant_id, times in sorted(read_at.items()):
        span_s = times[-1] - times[0]
        if len(times) >= 2 and span_s > 0:
            rates[occupant_id] = round((len(times) - 1) / span_s, 1)
    return rates


def run_model_bench(cfg: Config, batches: tuple[int, ...] = (1, 2, 4), runs: int = 200) -> dict[str, Any]:
    """The emotion model alone: latency per call and per face at several batch sizes, on real crops."""
    model = EmotionModel(cfg.emotion)
    image = cv2.imread(str(sample_path("multi_face.jpg")))
    detector = create_detector(cfg.detector.model_copy(update={"type": "yunet", "min_face_px": 16}))
    try:
        crops = np.stack([c.crop for c in crop_image(image, FaceAligner(model.input_size, model.detail_px), detector)])
    finally:
        detector.close()
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
        per_call = percentiles(times)
        report["batches"][str(batch)] = {
            "call_ms": per_call,
            "per_face_ms": {k: round(v / batch, 2) for k, v in per_call.items()},
        }
    return report


def run_bench(cfg: Config, max_frames: int | None = None) -> dict[str, Any]:
    """Both passes on ``cfg.camera.source``; the top-level keys summarise them."""
    cfg = cfg.model_copy(update={"mqtt": cfg.mqtt.model_copy(update={"url": None})})
    throughput, pipeline = _run_pass(cfg, "fast", max_frames)
    camera, _ = _run_pass(cfg, "realtime", max_frames)
    model = pipeline.processor.model
    return {
        "frames": throughput["frames"],
        "fps": throughput["fps"],
        "e2e_ms": camera["e2e_ms"],
        "stages": throughput["stages"],
        "provider": model.provider_in_use,
        "model": str(model.info.path),
        "detector": f"{cfg.detector.type}-{cfg.detector.range}" if cfg.detector.type == "blazeface" else "yunet",
        "faces_per_frame": throughput["faces_per_frame"],
        # At camera pace: what a car sees (each occupant's reading rate, the share of the machine taken).
        "occupant_read_hz": camera["occupant_read_hz"],
        "cpu": camera.get("cpu"),
        "throughput": throughput,
        "camera_pace": camera,
    }


def bench_command(cfg: Config, *, model_only: bool, runs: int, max_frames: int | None, as_json: bool) -> int:
    """The ``bench`` command: one JSON object, or a few lines of text."""
    if model_only:
        model_report = run_model_bench(cfg, runs=runs)
        if as_json:
            print(json.dumps(model_report))
        else:
            print(f"{model_report['model']} on {model_report['provider']}")
            for batch, r in model_report["batches"].items():
                print(
                    f"  batch {batch}: {r['call_ms']['p50']:.2f} ms per call (p95 {r['call_ms']['p95']:.2f}), "
                    f"{r['per_face_ms']['p50']:.2f} ms per face"
                )
        return 0
    report = run_bench(cfg, max_frames=max_frames)
    if as_json:
        print(json.dumps(report))
    else:
        cam = report["camera_pace"]
        print(f"{report['model']} on {report['provider']}, detector {report['detector']}")
        print(f"throughput: {report['frames']} frames at {report['fps']:.1f} fps")
        print(
            f"camera pace: {cam['frames']}/{cam['frames_read']} frames processed, frame-to-reading "
            f"p50 {report['e2e_ms']['p50']:.1f} ms, p95 {report['e2e_ms']['p95']:.1f} ms, "
            f"{cam['dropped_frames']} dropped"
        )
        rates = report["occupant_read_hz"]
        print(
            f"faces per frame: {report['faces_per_frame']:.2f} found, {cam['readings_per_frame']:.2f} read, "
            f"detector on {100 * cam['detector_frames']:.0f} % of frames; occupants read at "
            + (", ".join(f"{k} {v:.1f} Hz" for k, v in rates.items()) or "-")
        )
        if report["cpu"]:
            threads = ", ".join(f"{k} {v:.2f}" for k, v in list(report["cpu"]["by_thread"].items())[:6])
            print(
                f"CPU at camera pace: {report['cpu']['cores_used']:.2f} cores "
                f"({100 * report['cpu']['share_of_machine']:.0f} % of the machine): {threads}"
            )
        for name, p in report["stages"].items():
            print(f"  {name:8s} p50 {p['p50']:6.2f} ms  p95 {p['p95']:6.2f} ms")
    return 0
