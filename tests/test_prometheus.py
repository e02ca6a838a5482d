"""Tests of the Prometheus endpoint: the metric families of a health snapshot, and a daemon scraped live."""

from __future__ import annotations

import signal
import socket
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import get_args

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cabin_monitor import messages
from cabin_monitor.assets import sample_path
from cabin_monitor.bus import outbox
from cabin_monitor.messages import CameraState, CaptureStats, RemoteStats
from cabin_monitor.runtime.prometheus import MetricsError, PrometheusExporter
from tests.support.broker import free_port
from tests.support.daemon import DaemonProcess
from tests.support.helpers import make_health, wait_until


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, keyed by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_snapshot_becomes_metrics() -> None:
    """fps, counters, stage latency, outbox, camera state and status come out with their values."""
    exporter = PrometheusExporter()
    assert generate_latest(exporter.registry) == b""  # nothing before the first snapshot
    health = make_health(camera=CaptureStats(state=CameraState.REOPENING, corrupt_frames=3, reopen_count=2))
    exporter.update(health, {"emotion": {"p50": 3.5, "p95": 5.0}})
    got = samples(generate_latest(exporter.registry).decode())
    assert got[("cabin_monitor_pipeline_fps", ())] == 29.5
    assert got[("cabin_monitor_frames_processed_total", ())] == 880
    assert got[("cabin_monitor_frames_dropped_total", ())] == 20
    assert got[("cabin_monitor_frames_corrupt_total", ())] == 3
    assert got[("cabin_monitor_camera_reopens_total", ())] == 2
    assert got[("cabin_monitor_stage_latency_ms", (("quantile", "0.95"), ("stage", "emotion")))] == 5.0
    assert got[("cabin_monitor_outbox_depth", ())] == 0
    assert got[("cabin_monitor_camera_state", (("state", "reopening"),))] == 1
    assert got[("cabin_monitor_camera_state", (("state", "streaming"),))] == 0
    assert got[("cabin_monitor_status", (("status", "degraded"),))] == 1
    assert got[("cabin_monitor_events_dropped_total", (("reason", "full"),))] == 0


def test_refusals_remote_requests_and_the_outbox_state_become_metrics() -> None:
    """Refused events and operators' requests are counters; the outbox state and its memory depth are gauges."""
    healthy = make_health()
    full_disk = replace(
        healthy.sink,
        outbox_state="disk_full",
        outbox_depth=5,
        outbox_memory_depth=4,
        outbox_memory_unkept=1,
        refused_total=7,
    )
    remote = RemoteStats(received=40, answered=37, busy=12, dropped=2, queued=1)
    exporter = PrometheusExporter()
    exporter.update(replace(healthy, sink=full_disk, remote=remote), {})
    scrape = generate_latest(exporter.registry).decode()
    got = samples(scrape)
    assert got[("cabin_monitor_mqtt_refused_events_total", ())] == 7
    assert got[("cabin_monitor_outbox_memory_depth", ())] == 4
    assert got[("cabin_monitor_outbox_memory_unkept", ())] == 1
    states = {state: got[("cabin_monitor_outbox_state", (("state", state),))] for state in ("ok", "disk_full")}
    assert states == {"ok": 0, "disk_full": 1} and got[("cabin_monitor_outbox_state", (("state", "unwritable"),))] == 0
    requests = {n: got[(f"cabin_monitor_remote_requests_{n}_total", ())] for n in ("received", "answered", "busy")}
    assert requests == {"received": 40, "answered": 37, "busy": 12}
    assert got[("cabin_monitor_remote_requests_dropped_total", ())] == 2
    assert got[("cabin_monitor_remote_requests_queued", ())] == 1
    kinds = {f.name: f.type for f in text_string_to_metric_families(scrape)}
    assert kinds["cabin_monitor_mqtt_refused_events"] == kinds["cabin_monitor_remote_requests_busy"] == "counter"
    assert kinds["cabin_monitor_outbox_state"] == kinds["cabin_monitor_remote_requests_queued"] == "gauge"
    exporter.update(healthy, {})  # no broker: no operators' requests to count
    without = samples(generate_latest(exporter.registry).decode())
    assert not [name for name, _ in without if name.startswith("cabin_monitor_remote_")]
    assert without[("cabin_monitor_outbox_state", (("state", "ok"),))] == 1


def test_every_state_the_outbox_reports_has_its_gauge() -> None:
    """The outbox states the metrics know (from messages) are the ones the outbox can be in."""
    assert get_args(messages.OutboxState) == get_args(outbox.OutboxState)


def test_a_taken_port_is_a_clear_error() -> None:
    """Starting on a port something else listens on raises MetricsError naming the address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(MetricsError, match=f"cannot listen on 127.0.0.1:{port}"):
            PrometheusExporter().start("127.0.0.1", port)


@pytest.fixture
def metrics_daemon(tmp_path: Path) -> Iterator[tuple[DaemonProcess, int]]:
    """A daemon looping the one-face clip without a broker, with /metrics on a free port."""
    port = free_port()
    config = tmp_path / "cabin-monitor.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "vehicle_id": "car-1",
                "state_dir": str(tmp_path / "state"),
                "logging": {"format": "json"},
                "metrics": {"enabled": True, "port": port},
            }
        )
    )
    daemon = DaemonProcess(
        tmp_path, ["--config", str(config), "--source", str(sample_path("single_face.mp4")), "--loop"]
    )
    yield daemon, port
    if daemon.proc.poll() is None:
        daemon.kill()


def test_the_running_daemon_serves_its_health(metrics_daemon: tuple[DaemonProcess, int]) -> None:
    """A scrape of the live daemon shows frames flowing, per-stage latency and the model in use."""
    daemon, port = metrics_daemon

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                return samples(response.read().decode())
        except OSError:
            return {}

    wait_until(lambda: scrape().get(("cabin_monitor_frames_processed_total", ()), 0) > 10, 60, "frames in /metrics")
    got = scrape()
    assert got[("cabin_monitor_pipeline_fps", ())] > 0
    assert got[("cabin_monitor_stage_latency_ms", (("quantile", "0.5"), ("stage", "emotion")))] > 0
    assert any(name == "cabin_monitor_model_info" for name, _ in got)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0
