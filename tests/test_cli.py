"""Tests of the command line: analyze, schema, demo and bench, run as the user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from cabin_monitor.assets import sample_path
from cabin_monitor.cli import SUBCOMMANDS, main
from cabin_monitor.config import DetectorConfig
from cabin_monitor.messages import Frame
from cabin_monitor.vision.align import keypoints_to_crop
from cabin_monitor.vision.capture import gstreamer_support
from cabin_monitor.vision.detect import create_detector
from cabin_monitor.vision.framing import invert_affine
from tests.support.cli import run_cli


def cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m cabin_monitor ARGS``."""
    return subprocess.run(
        [sys.executable, "-m", "cabin_monitor", *args], capture_output=True, text=True, timeout=timeout_s
    )


def analyze(*args: str) -> list[dict[str, Any]]:
    """The JSON lines of ``analyze --json``."""
    proc = cli("analyze", "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_analyze_finds_the_faces_in_the_bundled_photos() -> None:
    """One face in single_face.jpg, five in multi_face.jpg, each with emotions and 68 landmarks in its box."""
    single, multi = analyze(str(sample_path("single_face.jpg")), str(sample_path("multi_face.jpg")))
    assert len(single["faces"]) == 1 and len(multi["faces"]) == 5
    for face in single["faces"] + multi["faces"]:
        assert set(face) == {"box", "score", "emotions", "landmarks"}
        assert abs(sum(face["emotions"].values()) - 1.0) < 1e-3
        assert next(iter(face["emotions"])) == "neutral"
        x, y, w, h = face["box"]
        pts = np.array(face["landmarks"])
        assert pts.shape == (68, 2)
        centre = pts.mean(0)
        assert x < centre[0] < x + w and y < centre[1] < y + h


def test_analyze_reports_unreadable_images_and_fails() -> None:
    """A file that is not an image is reported in the JSON and the exit code is 1."""
    proc = cli("analyze", "--json", __file__)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"] == "not a readable image"


def test_tight_crop_with_assume_face_agrees_with_the_face_in_the_photo(tmp_path: Path) -> None:
    """A square crop around the face read with --assume-face agrees with analyze on the whole photo."""
    photo = cv2.imread(str(sample_path("single_face.jpg")))
    det = create_detector(DetectorConfig(type="yunet", min_score=0.5))
    face = det.detect(Frame(0, 0.0, 0.0, photo))[0]
    # The axis-aligned square a user would cut to frame the face like the canonical crop.
    corners = np.array([[0, 0], [112, 0], [0, 112], [112, 112]], np.float32)
    inv = invert_affine(keypoints_to_crop(face.keypoints, 112))
    mapped = corners @ inv[:, :2].T + inv[:, 2]
    cx, cy = mapped.mean(0)
    side = np.linalg.norm(mapped[1] - mapped[0])
    x0, y0 = round(cx - side / 2), round(cy - side / 2)
    crop = photo[max(0, y0) : y0 + round(side), max(0, x0) : x0 + round(side)]
    crop_path = tmp_path / "tight.png"
    cv2.imwrite(str(crop_path), crop)
    whole = analyze(str(sample_path("single_face.jpg")))[0]["faces"][0]["emotions"]
    tight = analyze("--assume-face", str(crop_path))[0]["faces"][0]["emotions"]
    distance = 0.5 * sum(abs(whole[k] - tight[k]) for k in whole)
    assert distance < 0.15, (whole, tight)
    assert max(whole, key=whole.__getitem__) == max(tight, key=tight.__getitem__)


def test_schema_command_prints_every_payload_schema(tmp_path: Path) -> None:
    """schema prints the JSON schemas, and --out writes one file per payload."""
    proc = cli("schema")
    assert proc.returncode == 0
    schemas = json.loads(proc.stdout)
    assert {"event", "occupant_state", "health", "config_set", "config_result"} <= set(schemas)
    assert "event_id" in schemas["event"]["required"]
    assert cli("schema", "--out", str(tmp_path)).returncode == 0
    assert (tmp_path / "event.schema.json").is_file()


def test_demo_prints_events_and_writes_an_annotated_video(tmp_path: Path) -> None:
    """demo on a real clip exits 0, prints only JSON event lines on stdout, and writes every frame as VP9 WebM."""
    out = tmp_path / "demo.webm"
    proc = cli("demo", "--source", str(sample_path("single_face.mp4")), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in proc.stdout.splitlines():
        assert json.loads(line)["schema_version"] == 1
    stats = [json.loads(line) for line in proc.stderr.splitlines() if '"event": "stats"' in line]
    # Read as fast as it goes, a file has no frame-to-reading latency: none is reported.
    assert stats and all("e2e" not in s["latency_ms"] and "emotion" in s["latency_ms"] for s in stats)
    cap = cv2.VideoCapture(str(out))
    fps = cap.get(cv2.CAP_PROP_FPS)
    images = []  # WebM declares no frame count: read them all
    while (frame := cap.read())[0]:
        images.append(frame[1])
    cap.release()
    assert images and images[0].shape == (360, 640, 3)
    assert len(images) >= 70
    source = cv2.VideoCapture(str(sample_path("single_face.mp4")))
    assert abs(fps - source.get(cv2.CAP_PROP_FPS)) < 0.01  # the source's frame rate, not a fixed one
    source.release()
    assert f"annotated video: {out} ({len(images)} frames, VP9," in proc.stderr


def test_bench_reports_fps_and_stage_latencies() -> None:
    """bench --json prints frames, fps, p50/p95 per stage, faces found, each occupant's reading rate and CPU share."""
    proc = cli("bench", "--source", str(sample_path("single_face.mp4")), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["frames"] >= 70 and report["fps"] > 0
    assert set(report["e2e_ms"]) == {"p50", "p95"} and report["e2e_ms"]["p50"] > 0
    assert "e2e_ms" not in report["throughput"] and report["camera_pace"]["e2e_ms"] == report["e2e_ms"]
    assert {"detect", "align", "emotion", "rules"} <= set(report["stages"])
    assert report["provider"] == "CPUExecutionProvider"
    assert report["faces_per_frame"] > 0.9
    assert list(report["occupant_read_hz"]) == ["occupant-1"] and report["occupant_read_hz"]["occupant-1"] > 0
    cpu = report["cpu"]
    assert 0 < cpu["cores_used"] <= 2.5 and 0 < cpu["share_of_machine"] <= 1.25
    assert "inference" in cpu["by_thread"]  # the pipeline's own threads are named


def test_bench_model_only_times_the_model_per_batch() -> None:
    """bench --model-only reports per-call and per-face latency at batch 1, 2 and 4."""
    proc = cli("bench", "--model-only", "--runs", "20", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert set(report["batches"]) == {"1", "2", "4"}
    assert report["batches"]["4"]["per_face_ms"]["p50"] > 0


def test_errors_are_one_line_with_their_exit_code(tmp_path: Path) -> None:
    """A missing model and an invalid override (both exit 2) end with one message line, no traceback."""
    missing = tmp_path / "none.onnx"
    proc = cli("demo", "--model", str(missing), "--out", str(tmp_path / "demo.mp4"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == f"cabin-monitor: emotion model not found: {missing}"
    proc = cli("run", "--mqtt-url", "http://bus")
    assert proc.returncode == 2
    assert (
        proc.stderr
        == "cabin-monitor: MQTT URL must look like mqtt://host:port or mqtts://host:port, got 'http://bus'\n"
    )


def test_version_names_the_package_model_and_onnxruntime() -> None:
    """`--version` prints the package version, the bundled model's version and onnxruntime's providers."""
    import onnxruntime as ort

    proc = cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("cabin-monitor ")
    assert "model emotionaldan-7.onnx" in proc.stdout
    assert f"onnxruntime {ort.__version__}" in proc.stdout and "CPUExecutionProvider" in proc.stdout


def test_a_missing_onnxruntime_is_one_line_naming_the_extras(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without onnxruntime, commands that run a model say which extra to install, in one line, exit 1."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["demo"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cabin-monitor[cpu]" in err and "cabin-monitor[gpu]" in err


def test_start_up_errors_are_one_line_without_tracebacks(tmp_path: Path) -> None:
    """A missing video for demo or bench, or an unwritable schema folder, is one line, no traceback."""
    for args, code in (
        (("demo", "--source", str(tmp_path / "nope.mp4"), "--out", str(tmp_path / "d.mp4")), 2),
        (("bench", "--source", str(tmp_path / "nope.mp4")), 2),
        (("schema", "--out", "/proc/nope"), 2),
    ):
        proc = cli(*args)
        assert proc.returncode == code, (args, proc.stderr[-1500:])
        lines = [line for line in proc.stderr.splitlines() if line.startswith("cabin-monitor:")]
        assert len(lines) == 1 and "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, args


def problem_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The problems a failed check-config or run named: check-config's indented lines, run's one line."""
    lines = proc.stderr.splitlines()
    return [line.strip() for line in lines if line.startswith("  ")] or [
        line.removeprefix("cabin-monitor: ") for line in lines if line.startswith("cabin-monitor: ")
    ]


@pytest.mark.parametrize(
    ("text", "missing", "expected"),
    [
        ("metrics:\n  enabled: true\n", "prometheus_client", "metrics.enabled needs prometheus-client"),
        ("record:\n  dir: rec\n", "pyarrow", "record.dir needs pyarrow"),
    ],
)
def test_check_config_and_run_refuse_a_missing_extra_alike(
    tmp_path: Path, text: str, missing: str, expected: str
) -> None:
    """Where the configuration needs an extra that is not installed, check-config and run both refuse it
    with the same line naming the extra and the install.sh option, and exit 2."""
    path = tmp_path / "cabin-monitor.yaml"
    path.write_text("vehicle_id: car-1\n" + text)
    check = run_cli("check-config", str(path), without=[missing])
    run = run_cli("run", "--config", str(path), without=[missing])
    assert (check.returncode, run.returncode) == (2, 2), check.stderr + run.stderr
    assert problem_lines(check) == problem_lines(run), check.stderr + run.stderr
    (line,) = problem_lines(check)
    extra = expected.split(".")[0]
    assert line.startswith(expected) and f"--extras {extra}" in line, line
    assert not (tmp_path / "rec").exists()


def test_gstreamer_support_is_read_from_the_build_information() -> None:
    """`GStreamer: YES (1.20.3)` means support; `NO`, or no such line, means none."""
    assert gstreamer_support("  Video I/O:\n    GStreamer:                   YES (1.20.3)\n")
    assert not gstreamer_support("  Video I/O:\n    GStreamer:                   NO\n")
    assert not gstreamer_support("  Video I/O:\n    FFMPEG:                      YES\n")


@pytest.mark.skipif(gstreamer_support(), reason="this OpenCV has GStreamer: gst: sources can work here")
def test_a_gstreamer_source_without_gstreamer_is_refused_at_once(tmp_path: Path) -> None:
    """Without GStreamer in OpenCV, check-config and run refuse a gst: source at once (exit 2, naming what
    to install) instead of run retrying for ever."""
    path = tmp_path / "cabin-monitor.yaml"
    path.write_text('vehicle_id: car-1\ncamera:\n  source: "gst:videotestsrc ! videoconvert ! appsink"\n')
    check = run_cli("check-config", str(path))
    run = run_cli("run", "--config", str(path), timeout_s=60)
    assert (check.returncode, run.returncode) == (2, 2), check.stderr + run.stderr
    assert problem_lines(check) == problem_lines(run)
    (line,) = problem_lines(check)
    assert "needs OpenCV built with GStreamer" in line and "deploy/jetson.md" in line, line


def test_every_sub_command_help_has_a_description_an_example_and_its_exit_codes() -> None:
    """`cabin-monitor X --help` says what X does, shows an example command and lists its exit codes."""
    for command in SUBCOMMANDS:
        proc = cli(command.name, "--help")
        assert proc.returncode == 0, proc.stderr
        text = proc.stdout
        assert command.description.split()[0] in text.split("\n\n")[1], (command.name, text)
        assert f"example:\n  cabin-monitor {command.name} " in text, (command.name, text)
        exit_codes = text.split("exit codes:\n")[1]
        assert exit_codes.startswith("  0 ") and "\n  1" in exit_codes and "2 " in exit_codes, (command.name, text)


def test_an_invalid_vehicle_id_from_the_command_line_is_one_line() -> None:
    """`run --vehicle-id 'car 17/x'` ends with one line naming the setting, exit code 2, no pydantic dump."""
    proc = cli("run", "--vehicle-id", "car 17/x")
    assert proc.returncode == 2
    assert proc.stderr.startswith("cabin-monitor: command line: vehicle_id: String should match pattern")
    assert proc.stderr.count("\n") == 1 and "errors.pydantic.dev" not in proc.stderr, proc.stderr
