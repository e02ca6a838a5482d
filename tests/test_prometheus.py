"""Tests of the Prometheus endpoint: the metric families of a health snapshot, and a daemon scraped live."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cabin_monitor.assets import sample_path
from cabin_monitor.messages import CameraState, CaptureStats, OutboxState, PipelineMetrics, RemoteStats
from cabin_monitor.metrics import LatencyHistogram
from cabin_monitor.runtime.pipeline import FRAME_TO_READING_BUCKETS_S, STAGE_BUCKETS_S
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


README = Path(__file__).resolve().parents[1] / "README.md"
Sample = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def pipeline_metrics(
    stage_ms: dict[str, list[float]] | None = None,
    frame_to_reading_ms: Sequence[float] = (),
    events: dict[tuple[str, str], int] | None = None,
) -> PipelineMetrics:
    """What a pipeline would have counted after observing these latencies (ms) and events."""
    stages = {name: LatencyHistogram(STAGE_BUCKETS_S) for name in (stage_ms or {})}
    for name, values in (stage_ms or {}).items():
        for ms in values:
            stages[name].observe(ms / 1000.0)
    e2e = LatencyHistogram(FRAME_TO_READING_BUCKETS_S)
    for ms in frame_to_reading_ms:
        e2e.observe(ms / 1000.0)
    return PipelineMetrics(
        stage_latency={name: h.snapshot() for name, h in stages.items()},
        frame_to_reading=e2e.snapshot(),
        events=events or {},
    )


@pytest.fixture
def exporter(tmp_path: Path) -> Iterator[tuple[PrometheusExporter, str]]:
    """An exporter listening on a free port, its state folder in tmp_path, and its URL."""
    port = free_port()
    exporter = PrometheusExporter(version="1.2.3", state_dir=tmp_path)
    exporter.start("127.0.0.1", port)
    yield exporter, f"http://127.0.0.1:{port}/metrics"
    exporter.stop()


def fetch(url: str) -> str:
    """The text of one scrape over HTTP."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text: str = response.read().decode()
    return text


def buckets(got: Sample, name: str, labels: tuple[tuple[str, str], ...] = ()) -> list[tuple[float, float]]:
    """A histogram's (upper bound, cumulative count) pairs, by bound."""
    rows = [
        (float(dict(key)["le"]), value)
        for (sample, key), value in got.items()
        if sample == f"{name}_bucket" and tuple(kv for kv in key if kv[0] != "le") == labels
    ]
    return sorted(rows)


def test_latency_histograms_events_and_build_info_over_http(exporter: tuple[PrometheusExporter, str]) -> None:
    """Latencies are histograms in seconds, events count by type and phase, build_info and process metrics show."""
    server, url = exporter
    emotion_ms = [0.7, 3.0, 3.5, 12.0, 40.0, 99.0, 400.0]
    server.update(
        make_health(model_version="0.9.0"),
        pipeline_metrics(
            {"emotion": emotion_ms, "detect": [8.0]},
            [30.0, 60.0],
            {("stress", "start"): 3, ("stress", "end"): 2},
        ),
    )
    scrape = fetch(url)
    got = samples(scrape)
    kinds = {f.name: f.type for f in text_string_to_metric_families(scrape)}
    assert (
        kinds["cabin_monitor_stage_latency_seconds"] == kinds["cabin_monitor_frame_to_reading_seconds"] == "histogram"
    )
    assert kinds["cabin_monitor_events"] == "counter" and kinds["cabin_monitor_build_info"] == "gauge"
    emotion = buckets(got, "cabin_monitor_stage_latency_seconds", (("stage", "emotion"),))
    assert [bound for bound, _ in emotion] == [*STAGE_BUCKETS_S, float("inf")]
    counts = [count for _, count in emotion]
    assert counts == sorted(counts) and counts[-1] == len(emotion_ms)
    assert dict(emotion)[0.001] == 1 and dict(emotion)[0.005] == 3 and dict(emotion)[0.1] == 6
    assert got[("cabin_monitor_stage_latency_seconds_count", (("stage", "emotion"),))] == len(emotion_ms)
    assert got[("cabin_monitor_stage_latency_seconds_sum", (("stage", "emotion"),))] == pytest.approx(
        sum(emotion_ms) / 1000.0
    )
    assert got[("cabin_monitor_stage_latency_seconds_count", (("stage", "detect"),))] == 1
    assert got[("cabin_monitor_frame_to_reading_seconds_count", ())] == 2
    assert dict(buckets(got, "cabin_monitor_frame_to_reading_seconds"))[0.05] == 1
    assert got[("cabin_monitor_events_total", (("phase", "start"), ("type", "stress")))] == 3
    assert got[("cabin_monitor_events_total", (("phase", "end"), ("type", "stress")))] == 2
    build = (("model_version", "0.9.0"), ("provider", "cpu"), ("version", "1.2.3"))
    assert got[("cabin_monitor_build_info", build)] == 1
    assert abs(got[("cabin_monitor_start_time_seconds", ())] - time.time()) < 60
    assert got[("process_start_time_seconds", ())] > 0 and got[("process_resident_memory_bytes", ())] > 0
    assert any(name == "python_info" for name, _ in got)


def test_state_disk_free_bytes_is_read_at_scrape_time(exporter: tuple[PrometheusExporter, str]) -> None:
    """The free bytes of the state folder's file system come from statvfs at each scrape, before any snapshot."""
    server, url = exporter
    got = samples(fetch(url))
    stat = os.statvfs(server.state_dir)
    # Other writers on the machine move it a little between the two reads.
    assert got[("cabin_monitor_state_disk_free_bytes", ())] == pytest.approx(stat.f_bavail * stat.f_frsize, rel=0.01)
    assert not [name for name, _ in got if name.startswith("cabin_monitor_frames")]  # no snapshot yet
    server.state_dir = server.state_dir / "not" / "made" / "yet"  # reported for the file system it will be on
    later = samples(fetch(url))[("cabin_monitor_state_disk_free_bytes", ())]
    assert later == pytest.approx(stat.f_bavail * stat.f_frsize, rel=0.01)


def readme_metric_names() -> set[str]:
    """The metric names the README's Metrics bullet lists."""
    text = README.read_text()
    bullet = text[text.index("- **Metrics**") :]
    bullet = bullet[: bullet.index("\n- **", 1)]
    return set(re.findall(r"`(cabin_monitor_[a-z_]+)", bullet))


def test_the_readme_lists_every_exported_name(exporter: tuple[PrometheusExporter, str]) -> None:
    """Every cabin_monitor_ name a full scrape exports is in the README's list, and every listed name is exported."""
    server, url = exporter
    remote = RemoteStats(received=1, answered=1, busy=0, dropped=0, queued=0)
    server.update(
        make_health(remote=remote),
        pipeline_metrics({"emotion": [3.0]}, [30.0], {("stress", "start"): 1}),
    )
    exported = {
        f"{f.name}_total" if f.type == "counter" else f.name
        for f in text_string_to_metric_families(fetch(url))
        if f.name.startswith("cabin_monitor_")
    }
    assert exported == readme_metric_names()
    assert "`process_*`" in README.read_text() and "`python_info`" in README.read_text()


def test_a_snapshot_becomes_metrics(tmp_path: Path) -> None:
    """fps, counters, stage latency, outbox, camera state and status come out with their values."""
    exporter = PrometheusExporter(version="1.2.3", state_dir=tmp_path)
    before = samples(generate_latest(exporter.registry).decode())
    assert not [name for name, _ in before if name.startswith("cabin_monitor_status")]  # none before the first
    health = make_health(camera=CaptureStats(state=CameraState.REOPENING, corrupt_frames=3, reopen_count=2))
    exporter.update(health, pipeline_metrics({"emotion": [3.5, 5.0]}))
    got = samples(generate_latest(exporter.registry).decode())
    assert got[("cabin_monitor_pipeline_fps", ())] == 29.5
    assert got[("cabin_monitor_frames_processed_total", ())] == 880
    assert got[("cabin_monitor_frames_dropped_total", ())] == 20
    assert got[("cabin_monitor_frames_corrupt_total", ())] == 3
    assert got[("cabin_monitor_camera_reopens_total", ())] == 2
    assert got[("cabin_monitor_stage_latency_seconds_count", (("stage", "emotion"),))] == 2
    assert got[("cabin_monitor_outbox_depth", ())] == 0
    assert got[("cabin_monitor_camera_state", (("state", "reopening"),))] == 1
    assert got[("cabin_monitor_camera_state", (("state", "streaming"),))] == 0
    assert got[("cabin_monitor_status", (("status", "degraded"),))] == 1
    assert got[("cabin_monitor_events_dropped_total", (("reason", "full"),))] == 0


def test_refusals_remote_requests_and_the_outbox_state_become_metrics(tmp_path: Path) -> None:
    """Refused events and operators' requests are counters; the outbox state and its memory depth are gauges."""
    healthy = make_health()
    full_disk = replace(
        healthy.sink,
        outbox_state=OutboxState.DISK_FULL,
        outbox_depth=5,
        outbox_memory_depth=4,
        outbox_memory_unkept=1,
        refused_total=7,
    )
    remote = RemoteStats(received=40, answered=37, busy=12, dropped=2, queued=1)
    exporter = PrometheusExporter(version="1.2.3", state_dir=tmp_path)
    exporter.update(replace(healthy, sink=full_disk, remote=remote), pipeline_metrics())
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
    exporter.update(healthy, pipeline_metrics())  # no broker: no operators' requests to count
    without = samples(generate_latest(exporter.registry).decode())
    assert not [name for name, _ in without if name.startswith("cabin_monitor_remote_")]
    assert without[("cabin_monitor_outbox_state", (("state", "ok"),))] == 1


def test_a_taken_port_is_a_clear_error() -> None:
    """Starting on a port something else listens on raises MetricsError naming the address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(MetricsError, match=f"cannot listen on 127.0.0.1:{port}"):
            PrometheusExporter(version="1.2.3", state_dir=Path(".")).start("127.0.0.1", port)


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
    assert got[("cabin_monitor_stage_latency_seconds_count", (("stage", "emotion"),))] > 10
    assert got[("cabin_monitor_frame_to_reading_seconds_count", ())] > 10  # a looped clip plays at camera pace
    assert got[("cabin_monitor_state_disk_free_bytes", ())] > 0
    assert any(name == "cabin_monitor_model_info" for name, _ in got)
    builds = [dict(labels) for name, labels in got if name == "cabin_monitor_build_info"]
    assert len(builds) == 1 and builds[0]["model_version"] not in ("", "unknown") and builds[0]["version"]
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0
