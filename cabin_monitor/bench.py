"""The ``bench`` command: the real threaded pipeline on a video, as fast as it goes."""

from __future__ import annotations

import io
import threading
import time
from typing import Any

import numpy as np

from cabin_monitor.capture import FrameSource
from cabin_monitor.config import Config
from cabin_monitor.messages import Frame, FrameResult
from cabin_monitor.pipeline import Pipeline
from cabin_monitor.processor import STAGES, FrameProcessor
from cabin_monitor.publish import StdoutSink
from cabin_monitor.remote import RulesControl


class _TimedSource(FrameSource):
    """A file source that notes when each frame left the decoder and can stop after N frames."""

    def __init__(self, cfg: Any, stop: threading.Event, max_frames: int | None) -> None:
        super().__init__(cfg, stop)
        self.read_at: dict[int, float] = {}
        self._max = max_frames

    def read(self) -> Frame:
        if self._max is not None and len(self.read_at) >= self._max:
            from cabin_monitor.capture import SourceEnded

            raise SourceEnded("frame limit reached")
        frame = super().read()
        self.read_at[frame.frame_id] = time.perf_counter()
        return frame


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p95": 0.0}
    arr = np.asarray(values)
    return {"p50": round(float(np.percentile(arr, 50)), 2), "p95": round(float(np.percentile(arr, 95)), 2)}


def run_bench(cfg: Config, max_frames: int | None = None) -> dict[str, Any]:
    """Run every frame of ``cfg.camera.source`` through the pipeline; fps and p50/p95 latencies.

    ``e2e_ms`` is frame-to-reading latency: from the moment the decoder hands
    a frame over to the moment its emotion readings and events exist.
    """
    camera = cfg.camera.model_copy(update={"file_pacing": "fast", "loop": False})
    cfg = cfg.model_copy(update={"camera": camera, "mqtt": cfg.mqtt.model_copy(update={"url": None})})
    processor = FrameProcessor(cfg)
    stop = threading.Event()
    source = _TimedSource(cfg.camera, stop, max_frames)
    e2e: list[float] = []
    stages: dict[str, list[float]] = {name: [] for name in STAGES}
    done_at: list[float] = []
    faces: list[int] = []

    def record(result: FrameResult) -> None:
        now = time.perf_counter()
        e2e.append((now - source.read_at[result.frame.frame_id]) * 1000.0)
        for name, ms in result.stage_ms.items():
            stages[name].append(ms)
        done_at.append(now)
        faces.append(len(result.readings))

    control = RulesControl(cfg.rules, processor.model.class_names, None)
    sink = StdoutSink(cfg.vehicle_id, io.StringIO())
    pipeline = Pipeline(cfg, processor, source, sink, control, on_result=record, stop_event=stop)
    pipeline.run()
    frames = len(done_at)
    # Sustained rate: from the first decoded frame to the last reading (warm-up excluded).
    elapsed = (done_at[-1] - min(source.read_at.values())) if frames else 0.0
    return {
        "frames": frames,
        "fps": round(frames / elapsed, 2) if elapsed > 0 else 0.0,
        "e2e_ms": _percentiles(e2e),
        "stages": {name: _percentiles(v) for name, v in stages.items()},
        "provider": processor.model.provider_in_use,
        "model": str(processor.model.info.path),
        "detector": cfg.detector.type,
        "faces_per_frame": round(float(np.mean(faces)), 2) if faces else 0.0,
    }
