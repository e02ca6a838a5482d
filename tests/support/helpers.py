"""Small helpers for tests: polling with a deadline, captured logs, plausible messages."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable
from typing import Any

import structlog
from structlog.testing import LogCapture
from structlog.typing import FilteringBoundLogger

from cabin_monitor.messages import CameraState, CaptureStats, Event, HealthSnapshot, Phase, SinkStats


def capturing_logger() -> tuple[FilteringBoundLogger, LogCapture]:
    """A structlog logger whose entries (dicts with ``event`` and ``log_level``) land in ``capture.entries``."""
    capture = LogCapture()
    logger: FilteringBoundLogger = structlog.wrap_logger(
        None, processors=[capture], wrapper_class=structlog.make_filtering_bound_logger(0)
    )
    return logger, capture


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll ``condition`` every 20 ms; ``TimeoutError`` naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout_s} s")
        time.sleep(0.02)


def exit_code(proc: subprocess.Popen[bytes], timeout_s: float, failure: str, output: Callable[[], str]) -> int:
    """``proc``'s exit code; past ``timeout_s`` it is killed and AssertionError raised: ``failure``, the end of
    ``output()``."""
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"{failure}\n{output()[-3000:]}") from None


def make_event(phase: Phase = Phase.START, **changes: Any) -> Event:
    """A plausible stress ``Event`` with a fresh UUID and the current wall time; ``changes`` override fields."""
    now = time.time()
    fields: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "type": "stress",
        "phase": phase,
        "rule": "stress",
        "occupant_id": "occupant-1",
        "seat": "driver",
        "capture_s": time.monotonic(),
        "wall_time_s": now,
        "score": 0.8,
        "emotions": {"neutral": 0.2, "anger": 0.5, "fear": 0.3},
        "severity": "warning",
        "frame_id": 1,
    }
    if phase is Phase.END:
        fields |= {"started_wall_time_s": now - 5.0, "start_event_id": str(uuid.uuid4())}
    return Event(**(fields | changes))


def make_health(**changes: Any) -> HealthSnapshot:
    """A plausible healthy ``HealthSnapshot`` taken now; ``changes`` override fields."""
    fields: dict[str, Any] = {
        "wall_time_s": time.time(),
        "camera": CaptureStats(
            state=CameraState.STREAMING, frames=900, corrupt_frames=0, reopen_count=0, last_error=None, source="sample"
        ),
        "camera_fps": 30.0,
        "processed_fps": 29.5,
        "frames_processed": 880,
        "dropped_frames": 20,
        "stale_frames": 0,
        "model_path": "emotionaldan-7.onnx",
        "providers_requested": ("cuda", "cpu"),
        "provider_in_use": "cpu",
        "sink": SinkStats(
            connected=True,
            reconnects=0,
            outbox_depth=0,
            dropped_total=0,
            dropped_by_reason={"full": 0, "expired": 0, "memory_full": 0},
            published_total=0,
        ),
        "broker_required": True,
    }
    return HealthSnapshot(**(fields | changes))
