"""The daemon's health as Prometheus metrics, served on a local HTTP port.

The supervising loop hands each health snapshot (and the stage latencies) to
``PrometheusExporter.update``; a scrape turns the latest one into metric
families. Nothing is computed on the scrape thread but that conversion.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cabin_monitor.errors import RuntimeFault
from cabin_monitor.messages import CameraState, HealthSnapshot, OutboxState

PREFIX = "cabin_monitor"
STATUSES = ("ok", "degraded", "error")


class MetricsError(RuntimeFault):
    """The metrics endpoint cannot listen where it is configured to."""


def metric_families(health: HealthSnapshot, latency_ms: Mapping[str, Mapping[str, float]]) -> list[Metric]:
    """The Prometheus metric families of one health snapshot and its stage latencies (p50/p95, ms)."""

    def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)

    def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
        return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)

    status = GaugeMetricFamily(f"{PREFIX}_status", "1 for the daemon's current status", labels=["status"])
    for name in STATUSES:
        status.add_metric([name], 1.0 if health.status == name else 0.0)
    camera = GaugeMetricFamily(f"{PREFIX}_camera_state", "1 for the camera's current state", labels=["state"])
    for state in CameraState:
        camera.add_metric([state.value], 1.0 if health.camera.state == state else 0.0)
    latency = GaugeMetricFamily(
        f"{PREFIX}_stage_latency_ms", "Recent per-stage latency, milliseconds", labels=["stage", "quantile"]
    )
    for stage, quantiles in latency_ms.items():
        for key, quantile in (("p50", "0.5"), ("p95", "0.95")):
            if key in quantiles:
                latency.add_metric([stage, quantile], quantiles[key])
    dropped = CounterMetricFamily(
        f"{PREFIX}_events_dropped", "Events dropped from the outbox, by reason", labels=["reason"]
    )
    for reason, count in sorted(health.sink.dropped_by_reason.items()):
        dropped.add_metric([reason], float(count))
    outbox_state = GaugeMetricFamily(
        f"{PREFIX}_outbox_state",
        "1 for the outbox's current state (not ok: new events wait in memory)",
        labels=["state"],
    )
    for kind in OutboxState:
        outbox_state.add_metric([kind.value], 1.0 if health.sink.outbox_state == kind else 0.0)
    model = GaugeMetricFamily(f"{PREFIX}_model_info", "The emotion model and its provider", labels=["path", "provider"])
    model.add_metric([health.model_path, health.provider_in_use], 1.0)
    remote: list[Metric] = []
    if health.remote is not None:  # only with a broker
        requests = health.remote
        remote = [
            counter("remote_requests_received", "Operators' requests handed over by the broker", requests.received),
            counter("remote_requests_answered", "Answers published on config/result", requests.answered),
            counter("remote_requests_busy", "Requests answered busy (over the rate limit), not applied", requests.busy),
            counter("remote_requests_dropped", "Requests dropped unanswered: the queue was full", requests.dropped),
            gauge("remote_requests_queued", "Requests waiting for the worker", requests.queued),
        ]
    return [
        status,
        camera,
        gauge("camera_fps", "Frames delivered by the camera per second", health.camera_fps),
        gauge("pipeline_fps", "Frames through the stages per second", health.processed_fps),
        counter("frames_processed", "Frames through the stages", health.frames_processed),
        counter("frames_dropped", "Frames replaced in the mailbox before inference took them", health.dropped_frames),
        counter("frames_stale", "Frames skipped as older than max_frame_age_ms", health.stale_frames),
        counter("frames_corrupt", "Corrupt frames from the camera", health.camera.corrupt_frames),
        counter("camera_reopens", "Times the camera was reopened", health.camera.reopen_count),
        latency,
        gauge("outbox_depth", "Events in the outbox waiting for the broker", health.sink.outbox_depth),
        outbox_state,
        gauge(
            "outbox_memory_depth",
            "Of those, events held in memory while the outbox file cannot be written",
            health.sink.outbox_memory_depth,
        ),
        gauge(
            "outbox_memory_unkept",
            "Of those, events no fallback file keeps: lost if the daemon ends before they are delivered or written",
            health.sink.outbox_memory_unkept,
        ),
        counter(
            "events_published", "Events delivered (acknowledged by the broker, or printed)", health.sink.published_total
        ),
        dropped,
        gauge("mqtt_connected", "1 while connected to the broker", 1.0 if health.sink.connected else 0.0),
        counter("mqtt_reconnects", "Broker connections re-established after the first", health.sink.reconnects),
        counter(
            "mqtt_refused_events",
            "Events the broker refused in a PUBACK, each kept and retried",
            health.sink.refused_total,
        ),
        *remote,
        model,
    ]


class PrometheusExporter(Collector):
    """Holds the latest health snapshot and serves it at ``http://HOST:PORT/metrics``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: tuple[HealthSnapshot, dict[str, dict[str, float]]] | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._server: Any = None

    def update(self, health: HealthSnapshot, latency_ms: Mapping[str, Mapping[str, float]]) -> None:
        """Make ``health`` what the next scrape reports."""
        with self._lock:
            self._latest = (health, {k: dict(v) for k, v in latency_ms.items()})

    def collect(self) -> Iterator[Metric]:
        """The metric families of the latest snapshot (none before the first)."""
        with self._lock:
            latest = self._latest
        if latest is not None:
            yield from metric_families(*latest)

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
