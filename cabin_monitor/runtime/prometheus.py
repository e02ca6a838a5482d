"""The daemon's health as Prometheus metrics, served on a local HTTP port.

The supervising loop hands each health snapshot (and the pipeline's latency
histograms and event counts) to ``PrometheusExporter.update``; a scrape turns
the latest one into metric families. Nothing is computed on the scrape thread
but that conversion and one ``statvfs`` of the state folder. The client
library's process and platform collectors (``process_*``, ``python_info``)
share the registry.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from cabin_monitor.errors import RuntimeFault
from cabin_monitor.messages import (
    CameraState,
    HealthSnapshot,
    Histogram,
    OutboxState,
    PipelineMetrics,
    RemoteStats,
)

PREFIX = "cabin_monitor"
STATUSES = ("ok", "degraded", "error")


class MetricsError(RuntimeFault):
    """The metrics endpoint cannot listen where it is configured to."""


def metric_families(health: HealthSnapshot, pipeline: PipelineMetrics, version: str) -> list[Metric]:
    """The Prometheus metric families of one health snapshot and what the pipeline counted with it."""
    return [
        *_state_families(health),
        *_frame_families(health),
        *_latency_families(pipeline),
        _events_family(pipeline),
        *_sink_families(health),
        *_remote_families(health.remote),
        _model_family(health),
        _build_family(health, version),
    ]


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _one_of(name: str, doc: str, label: str, choices: Iterable[str], current: str) -> GaugeMetricFamily:
    """A gauge per choice, 1 for the current one and 0 for the others."""
    family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=[label])
    for choice in choices:
        family.add_metric([choice], 1.0 if current == choice else 0.0)
    return family


def _state_families(health: HealthSnapshot) -> list[Metric]:
    return [
        _one_of("status", "1 for the daemon's current status", "status", STATUSES, health.status),
        _one_of(
            "camera_state",
            "1 for the camera's current state",
            "state",
            [state.value for state in CameraState],
            health.camera.state.value,
        ),
    ]


def _frame_families(health: HealthSnapshot) -> list[Metric]:
    return [
        _gauge("camera_fps", "Frames delivered by the camera per second", health.camera_fps),
        _gauge("pipeline_fps", "Frames through the stages per second", health.processed_fps),
        _counter("frames_processed", "Frames through the stages", health.frames_processed),
        _counter("frames_dropped", "Frames replaced in the mailbox before inference took them", health.dropped_frames),
        _counter("frames_stale", "Frames skipped as older than max_frame_age_ms", health.stale_frames),
        _counter("frames_corrupt", "Corrupt frames from the camera", health.camera.corrupt_frames),
        _counter("camera_reopens", "Times the camera was reopened", health.camera.reopen_count),
    ]


def _add_histogram(family: HistogramMetricFamily, labels: list[str], histogram: Histogram) -> None:
    bounds = [str(bound) for bound in histogram.bounds_s] + ["+Inf"]
    family.add_metric(labels, buckets=list(zip(bounds, histogram.cumulative, strict=True)), sum_value=histogram.sum_s)


def _latency_families(pipeline: PipelineMetrics) -> list[Metric]:
    stages = HistogramMetricFamily(
        f"{PREFIX}_stage_latency_seconds", "Time each stage took per frame, seconds", labels=["stage"]
    )
    for stage, histogram in pipeline.stage_latency.items():
        _add_histogram(stages, [stage], histogram)
    frame_to_reading = HistogramMetricFamily(
        f"{PREFIX}_frame_to_reading_seconds",
        "From a frame's capture to its readings and events, seconds (at camera pace; a file read as fast as it "
        "goes has none)",
    )
    _add_histogram(frame_to_reading, [], pipeline.frame_to_reading)
    return [stages, frame_to_reading]


def _events_family(pipeline: PipelineMetrics) -> Metric:
    events = CounterMetricFamily(
        f"{PREFIX}_events", "Events handed to the sink, by type and phase", labels=["type", "phase"]
    )
    for (kind, phase), count in sorted(pipeline.events.items()):
        events.add_metric([kind, phase], float(count))
    return events


def _sink_families(health: HealthSnapshot) -> list[Metric]:
    sink = health.sink
    dropped = CounterMetricFamily(
        f"{PREFIX}_events_dropped", "Events dropped from the outbox, by reason", labels=["reason"]
    )
    for reason, count in sorted(sink.dropped_by_reason.items()):
        dropped.add_metric([reason], float(count))
    return [
        _gauge("outbox_depth", "Events in the outbox waiting for the broker", sink.outbox_depth),
        _one_of(
            "outbox_state",
            "1 for the outbox's current state (not ok: new events wait in memory)",
            "state",
            [state.value for state in OutboxState],
            sink.outbox_state.value,
        ),
        _gauge(
            "outbox_memory_depth",
            "Of those, events held in memory while the outbox file cannot be written",
            sink.outbox_memory_depth,
        ),
        _gauge(
            "outbox_memory_unkept",
            "Of those, events no fallback file keeps: lost if the daemon ends before they are delivered or written",
            sink.outbox_memory_unkept,
        ),
        _counter("events_published", "Events delivered (acknowledged by the broker, or printed)", sink.published_total),
        dropped,
        _gauge("mqtt_connected", "1 while connected to the broker", 1.0 if sink.connected else 0.0),
        _counter("mqtt_reconnects", "Broker connections re-established after the first", sink.reconnects),
        _counter(
            "mqtt_refused_events", "Events the broker refused in a PUBACK, each kept and retried", sink.refused_total
        ),
    ]


def _remote_families(requests: RemoteStats | None) -> list[Metric]:
    if requests is None:  # only with a broker
        return []
    return [
        _counter("remote_requests_received", "Operators' requests handed over by the broker", requests.received),
        _counter("remote_requests_answered", "Answers published on config/result", requests.answered),
        _counter("remote_requests_busy", "Requests answered busy (over the rate limit), not applied", requests.busy),
        _counter("remote_requests_dropped", "Requests dropped unanswered: the queue was full", requests.dropped),
        _gauge("remote_requests_queued", "Requests waiting for the worker", requests.queued),
    ]


def _model_family(health: HealthSnapshot) -> Metric:
    model = GaugeMetricFamily(f"{PREFIX}_model_info", "The emotion model and its provider", labels=["path", "provider"])
    model.add_metric([health.model_path, health.provider_in_use], 1.0)
    return model


def _build_family(health: HealthSnapshot, version: str) -> Metric:
    build = GaugeMetricFamily(
        f"{PREFIX}_build_info",
        "1, labelled with the daemon's version, the model's version and the provider in use",
        labels=["version", "model_version", "provider"],
    )
    build.add_metric([version, health.model_version, health.provider_in_use], 1.0)
    return build


def _disk_family(folder: Path) -> Metric | None:
    """Free bytes (for an unprivileged user) on the file system of the state folder, or of the nearest folder
    above it while it does not exist yet (where it will be made); None when none can be read."""
    for candidate in (folder, *folder.parents):
        try:
            stat = os.statvfs(candidate)
        except FileNotFoundError:
            continue
        except OSError:
            return None
        return _gauge(
            "state_disk_free_bytes", "Free bytes on the file system of the state folder", stat.f_bavail * stat.f_frsize
        )
    return None


class PrometheusExporter(Collector):
    """Holds the latest health snapshot and serves it at ``http://HOST:PORT/metrics``.

    ``version`` is the daemon's, for ``build_info``; ``state_dir`` the folder whose free space is reported.
    """

    def __init__(self, version: str, state_dir: Path) -> None:
        self.version = version
        self.state_dir = state_dir
        self.start_time_s = time.time()
        self._lock = threading.Lock()
        self._latest: tuple[HealthSnapshot, PipelineMetrics] | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._server: Any = None

    def update(self, health: HealthSnapshot, pipeline: PipelineMetrics) -> None:
        """Make ``health`` and ``pipeline`` what the next scrape reports."""
        with self._lock:
            self._latest = (health, pipeline)

    def collect(self) -> Iterator[Metric]:
        """The start time and state disk always; the families of the latest snapshot once there is one."""
        yield _gauge("start_time_seconds", "When the daemon started, UTC epoch seconds", self.start_time_s)
        disk = _disk_family(self.state_dir)
        if disk is not None:
            yield disk
        with self._lock:
            latest = self._latest
        if latest is not None:
            yield from metric_families(*latest, self.version)

    def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` in a background thread; raises ``MetricsError`` when the port is taken."""
        try:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise MetricsError(f"metrics: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc

    def stop(self) -> None:
        """Close the endpoint."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
