"""The systemd unit and the daemon's side of the systemd contract: sd_notify, watchdog, SIGTERM and SIGHUP."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import pytest
import yaml

from cabin_monitor.assets import sample_path
from cabin_monitor.bus.payloads import health_payload
from cabin_monitor.bus.sinks import StdoutSink
from cabin_monitor.config import CameraConfig, Config, PipelineConfig
from cabin_monitor.messages import CameraState, Face, Frame
from cabin_monitor.rules.in_force import RulesInForce
from cabin_monitor.runtime.pipeline import Pipeline
from cabin_monitor.runtime.processor import FrameProcessor
from cabin_monitor.runtime.sdnotify import SystemdNotifier
from cabin_monitor.vision.capture import Capture, FrameSource, SourceSpec
from cabin_monitor.vision.detect import FaceDetector
from tests.support.broker import MosquittoBroker, MqttRecorder
from tests.support.camera import ScriptedCamera
from tests.support.daemon import DaemonProcess
from tests.support.helpers import wait_until

UNIT_FILE = Path(__file__).resolve().parent.parent / "systemd" / "cabin-monitor.service"
# What the daemon inherits from systemd; cleared so a test run under systemd is not confused by its own.
SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "STATE_DIRECTORY", "LISTEN_FDS", "LISTEN_PID")
START_TIMEOUT_S = 120.0  # model load and warm-up on a busy 2-core machine
EXIT_TIMEOUT_S = 60.0
# Rules the SIGHUP test starts from; valid and unremarkable.
RULES = {"stress": {"enter_score": 0.6, "exit_score": 0.4, "sustain_s": 3.0}}

Unit = dict[str, dict[str, list[str]]]


# -- the unit file -----------------------------------------------------------------------------


def parse_unit(text: str) -> Unit:
    """Section -> key -> every value in file order (systemd allows a key more than once)."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):  # continuation line
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and section is not None, f"not a unit-file line: {raw!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


TIMESPAN_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def timespan_s(text: str) -> float:
    """A systemd time span (``45s``, ``30min``, ``1min 30s``, bare seconds) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text.strip())
    assert parts, f"not a time span: {text!r}"
    return sum(float(number) * TIMESPAN_UNITS_S[unit or "s"] for number, unit in parts)


@pytest.fixture(scope="module")
def unit() -> Unit:
    """The parsed systemd/cabin-monitor.service."""
    return parse_unit(UNIT_FILE.read_text(encoding="utf-8"))


def only(unit: Unit, section: str, key: str) -> str:
    """The single value of ``key``; fails when it is missing or given more than once."""
    values = unit.get(section, {}).get(key, [])
    assert len(values) == 1, f"[{section}] {key}= should be set exactly once, found {values}"
    return values[0]


def test_unit_is_a_notify_service_with_watchdog_and_bounded_restarts(unit: Unit) -> None:
    """Type=notify from the main process, a watchdog, restart on failure without a crash loop, sane timeouts."""
    assert only(unit, "Service", "Type") == "notify"
    assert only(unit, "Service", "NotifyAccess") == "main"
    assert 2.0 <= timespan_s(only(unit, "Service", "WatchdogSec")) <= 60.0
    assert only(unit, "Service", "Restart") == "on-failure"
    assert only(unit, "Service", "RestartPreventExitStatus") == "2"  # a config error is not fixed by a restart
    assert timespan_s(only(unit, "Service", "RestartSec")) >= 5.0
    assert timespan_s(only(unit, "Unit", "StartLimitIntervalSec")) > 0  # 0 would disable the limit
    assert 1 <= int(only(unit, "Unit", "StartLimitBurst")) <= 10
    assert timespan_s(only(unit, "Service", "TimeoutStartSec")) >= 15 * 60  # first TensorRT engine build
    # Shutdown flushes the outbox for up to 10 s and joins two threads for up to 5 s each.
    assert timespan_s(only(unit, "Service", "TimeoutStopSec")) >= 25.0
    assert only(unit, "Install", "WantedBy") == "multi-user.target"


def test_unit_runs_the_daemon_with_its_config_and_reloads_with_sighup(unit: Unit) -> None:
    """ExecStart runs the venv's cabin-monitor on the /etc config; reload sends SIGHUP; logs are JSON."""
    assert only(unit, "Service", "ExecStart") == (
        "/opt/cabin-monitor/venv/bin/cabin-monitor run --config /etc/cabin-monitor/cabin-monitor.yaml"
    )
    assert only(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    environment = unit["Service"]["Environment"]
    assert "CABIN_MONITOR__LOGGING__FORMAT=json" in environment
    assert "PYTHONUNBUFFERED=1" in environment


def test_unit_runs_unprivileged_with_persistent_state(unit: Unit) -> None:
    """A dedicated user in the video group, and a StateDirectory for the outbox and rule overrides."""
    assert only(unit, "Service", "User") not in ("", "root", "0")
    assert only(unit, "Service", "Group") not in ("", "root", "0")
    assert "video" in " ".join(unit["Service"]["SupplementaryGroups"]).split()
    assert only(unit, "Service", "StateDirectory") == "cabin-monitor"
    assert "DynamicUser" not in unit["Service"]


def test_unit_keeps_a_runtime_folder_for_the_outbox_fallback_across_restarts(unit: Unit) -> None:
    """RuntimeDirectory (the default outbox.fallback_path's folder) is owner-only and kept when the service stops."""
    assert only(unit, "Service", "RuntimeDirectory") == "cabin-monitor"
    assert only(unit, "Service", "RuntimeDirectoryMode") == "0700"
    assert only(unit, "Service", "RuntimeDirectoryPreserve") == "yes"


def test_unit_is_sandboxed(unit: Unit) -> None:
    """The process sees a read-only system, no capabilities, and only the camera and GPU devices."""
    expected = {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "DevicePolicy": "closed",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "SystemCallArchitectures": "native",
    }
    assert {key: only(unit, "Service", key) for key in expected} == expected
    assert set(only(unit, "Service", "RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    device_allow = unit["Service"]["DeviceAllow"]
    for device in ("char-video4linux", "/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm"):
        assert f"{device} rw" in device_allow
    read_only = " ".join(unit["Service"]["ReadOnlyPaths"]).split()
    assert "/etc/cabin-monitor" in read_only
    # onnxruntime/MediaPipe JIT and libffi need writable+executable pages.
    assert "MemoryDenyWriteExecute" not in unit["Service"]
    assert "PrivateDevices" not in unit["Service"]  # would hide the camera and the GPU


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed on this machine (apt-get install systemd)"
)


def runnable_unit_copy(directory: Path) -> Path:
    """The unit with ExecStart pointed at a binary that exists here (verify checks that it does)."""
    text = UNIT_FILE.read_text(encoding="utf-8")
    text, count = re.subn(r"(?m)^ExecStart=.*$", f"ExecStart={sys.executable} -c pass", text)
    assert count == 1
    path = directory / "cabin-monitor.service"
    path.write_text(text, encoding="utf-8")
    return path


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    """``systemd-analyze verify`` passes without a single warning (an unknown key is only a warning)."""
    assert SYSTEMD_ANALYZE is not None
    copy = runnable_unit_copy(tmp_path)
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(copy)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    problems = [line for line in output.splitlines() if copy.name in line or "ignoring" in line.lower()]
    assert problems == [], output


@needs_systemd_analyze
def test_systemd_analyze_security_rates_the_sandbox_well(tmp_path: Path) -> None:
    """``systemd-analyze security --offline`` rates the unit's exposure at 2.5 or better (0 best, 10 worst)."""
    assert SYSTEMD_ANALYZE is not None
    copy = runnable_unit_copy(tmp_path)
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    if "--offline" in proc.stderr and proc.returncode != 0:
        pytest.skip(f"this systemd-analyze has no --offline (systemd < 250): {proc.stderr.strip()}")
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    assert float(found.group(1)) <= 2.5, proc.stdout


# -- the daemon under a fake systemd ---------------------------------------------------------------


@dataclass(frozen=True)
class Datagram:
    """One notification: who sent it and its ``KEY=value`` fields."""

    pid: int
    fields: tuple[str, ...]


class NotifyListener:
    """An AF_UNIX datagram socket standing in for systemd's notification socket, with sender credentials."""

    def __init__(self, address: str) -> None:
        # ``address``: a file-system path, or ``@name`` for the abstract namespace (as systemd writes it).
        self.address = address
        self.received: list[Datagram] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # as systemd does, for NotifyAccess=
        self._sock.bind("\0" + address[1:] if address.startswith("@") else address)

    def _receive(self, timeout_s: float) -> Datagram | None:
        self._sock.settimeout(max(timeout_s, 0.001))
        try:
            data, ancillary, _flags, _addr = self._sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        except TimeoutError:
            return None
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = struct.unpack("3i", payload[: struct.calcsize("3i")])
        datagram = Datagram(pid, tuple(data.decode().split("\n")))
        self.received.append(datagram)
        return datagram

    def wait_for(self, field: str, timeout_s: float, count: int = 1) -> None:
        """Receive until ``count`` datagrams carry ``field`` in all; ``TimeoutError`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.count(field) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{count} x {field} not received within {timeout_s} s; got {self.received}")
            self._receive(min(left, 0.5))

    def listen(self, duration_s: float) -> None:
        """Receive whatever comes for ``duration_s``."""
        deadline = time.monotonic() + duration_s
        while (left := deadline - time.monotonic()) > 0:
            self._receive(left)

    def receive_until(self, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Receive while waiting for ``condition()`` (a full queue would make the sender drop datagrams)."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{what}: not within {timeout_s} s; got {self.received}")
            self._receive(min(left, 0.2))

    def count(self, field: str) -> int:
        """How many datagrams so far carry ``field``."""
        return sum(field in d.fields for d in self.received)

    def index(self, field: str) -> int:
        """Position of the first datagram carrying ``field``."""
        return next(i for i, d in enumerate(self.received) if field in d.fields)

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path: AF_UNIX socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="cm-sd-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, short_dir: Path) -> Iterator[NotifyListener]:
    """A notification socket on a file-system path or in the abstract namespace."""
    address = str(short_dir / "notify") if request.param == "path" else f"@cabin-monitor-test-{uuid.uuid4().hex}"
    sd = NotifyListener(address)
    yield sd
    sd.close()


@pytest.fixture
def path_listener(short_dir: Path) -> Iterator[NotifyListener]:
    """A notification socket on a file-system path."""
    sd = NotifyListener(str(short_dir / "notify"))
    yield sd
    sd.close()


class Daemon(DaemonProcess):
    """``python -m cabin_monitor run`` started the way systemd starts it: NOTIFY_SOCKET, WATCHDOG_USEC/_PID set."""

    def __init__(
        self,
        directory: Path,
        config: Path,
        notify: NotifyListener,
        *args: str,
        watchdog_pid: Literal["main", "other"] = "main",
    ) -> None:
        env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_ENV and not k.startswith("CABIN_MONITOR__")}
        env |= {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "1000000"}
        prefix: list[str] = []
        if watchdog_pid == "main":
            # systemd sets WATCHDOG_PID to the main PID: the shell's $$, which the daemon keeps through exec.
            prefix = ["/bin/sh", "-c", 'export WATCHDOG_PID=$$; exec "$@"', "sh"]
        else:
            env["WATCHDOG_PID"] = str(os.getpid())  # the watchdog is meant for another process
        super().__init__(directory, ["--config", str(config), *args], env=env, command_prefix=prefix)

    def wait(self, timeout_s: float = EXIT_TIMEOUT_S) -> int:
        """Exit code, waiting at most ``timeout_s``."""
        return super().wait(timeout_s)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons started by a test; any still running at the end are killed."""
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)


def write_config(directory: Path, rules: object = RULES, stats_interval_s: float = 60.0) -> Path:
    """A daemon config with its own state folder and JSON logs."""
    cfg = {
        "vehicle_id": "test-car",
        "state_dir": str(directory / "state"),
        "rules": rules,
        "logging": {"format": "json", "stats_interval_s": stats_interval_s},
    }
    path = directory / "cabin-monitor.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_ready_then_watchdog_then_stopping_and_exit_zero(
    listener: NotifyListener, tmp_path: Path, daemons: list[Daemon]
) -> None:
    """On a looping clip: READY=1, then WATCHDOG=1 pings, all from the main PID; SIGTERM -> STOPPING=1, exit 0."""
    daemon = Daemon(
        tmp_path, write_config(tmp_path), listener, "--source", str(sample_path("single_face.mp4")), "--loop"
    )
    daemons.append(daemon)
    listener.wait_for("READY=1", START_TIMEOUT_S)
    listener.wait_for("WATCHDOG=1", 60.0, count=3)
    assert listener.index("READY=1") < listener.index("WATCHDOG=1")
    ready = listener.received[listener.index("READY=1")]
    assert any(f.startswith("STATUS=") for f in ready.fields)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0, daemon.logs()[-3000:]
    listener.wait_for("STOPPING=1", 5.0)  # sent before the exit, so already queued
    assert {d.pid for d in listener.received} == {daemon.proc.pid}  # NotifyAccess=main accepts them all


def test_no_watchdog_when_watchdog_pid_names_another_process(
    path_listener: NotifyListener, tmp_path: Path, daemons: list[Daemon]
) -> None:
    """WATCHDOG_PID of another process (an inherited environment): frames flow, but the daemon never pings."""
    config = write_config(tmp_path, stats_interval_s=0.5)
    clip = str(sample_path("single_face.mp4"))
    daemon = Daemon(tmp_path, config, path_listener, "--source", clip, "--loop", watchdog_pid="other")
    daemons.append(daemon)
    path_listener.wait_for("READY=1", START_TIMEOUT_S)

    def frames_processed() -> int:
        return max([int(str(r["frames"])) for r in daemon.logged("stats")] or [0])

    wait_until(lambda: frames_processed() >= 30, 60.0, "30 frames processed")
    path_listener.listen(2.0)  # a pinging daemon would send WATCHDOG=1 every 0.5 s
    assert path_listener.count("WATCHDOG=1") == 0, path_listener.received
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0, daemon.logs()[-3000:]


def test_watchdog_is_fed_while_the_camera_never_opens(
    path_listener: NotifyListener, tmp_path: Path, daemons: list[Daemon], mqtt_broker: MosquittoBroker
) -> None:
    """No camera at all: the daemon is alive, so WATCHDOG=1 goes on, and health and STATUS say ``reopening``."""
    missing = "/dev/video99"
    if os.path.exists(missing):
        pytest.skip(f"{missing} exists on this machine; the test needs a camera device that does not")
    config = write_config(tmp_path)
    with MqttRecorder(mqtt_broker.url, ["cabin/test-car/health"]) as health:
        daemon = Daemon(tmp_path, config, path_listener, "--source", missing, "--mqtt-url", mqtt_broker.url)
        daemons.append(daemon)
        path_listener.wait_for("READY=1", START_TIMEOUT_S)
        # The capture thread retries with a growing wait (about 0.25-0.5 s, 0.5-1 s, 1-2 s, 2-4 s, ...) ...
        path_listener.receive_until(
            lambda: len(daemon.logged("source unavailable, retrying")) >= 4, 60.0, "four reopen attempts"
        )
        # ... and pings go on through the longer waits (WATCHDOG_USEC=1 s: one every 0.5 s).
        pings = path_listener.count("WATCHDOG=1")
        path_listener.wait_for("WATCHDOG=1", 30.0, count=pings + 6)
        assert len(daemon.logged("source unavailable, retrying")) >= 4 and not daemon.logged("source opened")
        health.wait_for(lambda ms: any(json.loads(m.payload)["camera"]["state"] == "reopening" for m in ms), 30.0)
    assert any(f"STATUS=camera reopening: {missing}" in d.fields for d in path_listener.received)
    assert daemon.proc.poll() is None
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0, daemon.logs()[-3000:]
    path_listener.wait_for("STOPPING=1", 5.0)


def test_a_full_notification_queue_drops_datagrams_instead_of_blocking(path_listener: NotifyListener) -> None:
    """With nobody reading the socket, notifications fail fast once its queue is full: the sender never hangs."""
    notifier = SystemdNotifier(path_listener.address)
    results: list[bool] = []
    sender = threading.Thread(target=lambda: results.extend(notifier.watchdog() for _ in range(5000)), daemon=True)
    sender.start()
    sender.join(30.0)
    assert not sender.is_alive(), "sendto blocked on a full queue"
    assert results[0] and not all(results)
    path_listener.listen(0.5)
    assert 0 < path_listener.count("WATCHDOG=1") < 5000
    notifier.close()


# -- the watchdog in-process: a camera that comes late, an inference stage that hangs ----------------


@pytest.fixture
def watchdog_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """WATCHDOG_USEC=1 s for this process (a ping every 0.5 s), meant for this process."""
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)


def in_process_pipeline(
    cfg: Config,
    notify: NotifyListener,
    opener: Callable[[SourceSpec, CameraConfig], Capture],
    detector: FaceDetector | None = None,
) -> Pipeline:
    """The real pipeline on ``cfg`` with a scripted camera, events on a throw-away stream, notifying ``notify``."""
    stop = threading.Event()
    processor = FrameProcessor(cfg, detector=detector)
    source = FrameSource(cfg.camera, stop, opener=opener)
    control = RulesInForce(cfg.rules, processor.model.class_names, None)
    sink = StdoutSink(cfg.vehicle_id, io.StringIO())
    return Pipeline(cfg, processor, source, sink, control, SystemdNotifier(notify.address), stop_event=stop)


def test_watchdog_is_fed_while_the_camera_is_absent_and_frames_flow_once_it_appears(
    path_listener: NotifyListener, watchdog_env: None
) -> None:
    """A camera plugged in late: pings through the reopen waits, health ``reopening``, then frames and ``streaming``."""
    plugged = threading.Event()
    attempts: list[float] = []

    def opener(spec: SourceSpec, cfg: CameraConfig) -> Capture:
        attempts.append(time.monotonic())
        if not plugged.is_set():
            raise cv2.error("no such device")
        return ScriptedCamera(sample_path("single_face.mp4"), frame_period_s=1 / 30)

    cfg = Config(
        camera=CameraConfig(source="/dev/video99", reopen_initial_s=0.5, reopen_max_s=4.0),
        pipeline=PipelineConfig(watchdog_stall_s=2.0),
    )
    pipeline = in_process_pipeline(cfg, path_listener, opener)
    runner = threading.Thread(target=lambda: exit_codes.append(pipeline.run()))
    exit_codes: list[int] = []
    runner.start()
    try:
        path_listener.wait_for("READY=1", START_TIMEOUT_S)
        # Waits of 1-2 s and 2-4 s between attempts are longer than watchdog_stall_s: pings go on through them.
        path_listener.receive_until(lambda: len(attempts) >= 5, 60.0, "five open attempts")
        pings = path_listener.count("WATCHDOG=1")
        path_listener.wait_for("WATCHDOG=1", 30.0, count=pings + 6)
        assert not plugged.is_set() and pipeline.health().frames_processed == 0
        health = health_payload(pipeline.health(), cfg.vehicle_id)
        assert (health.camera.state, health.status) == ("reopening", "degraded")

        plugged.set()
        path_listener.receive_until(lambda: pipeline.health().frames_processed >= 20, 60.0, "frames from the camera")
        assert pipeline.health().camera.state == CameraState.STREAMING
        pings = path_listener.count("WATCHDOG=1")
        path_listener.wait_for("WATCHDOG=1", 30.0, count=pings + 2)
    finally:
        plugged.set()
        pipeline.request_stop("test")
        runner.join(60)
    assert exit_codes == [0]
    path_listener.wait_for("STOPPING=1", 5.0)  # sent last, so everything before it has arrived
    states = [f for d in path_listener.received for f in d.fields if f.startswith("STATUS=camera")]
    assert states[:2] == ["STATUS=camera reopening: /dev/video99", "STATUS=camera streaming: /dev/video99"]


class HangingDetector:
    """A detector that, once ``hang`` is set, blocks inside ``detect`` until ``release`` is set: a stuck stage."""

    def __init__(self) -> None:
        self.hang = threading.Event()
        self.hung = threading.Event()
        self.release = threading.Event()

    def detect(self, frame: Frame) -> list[Face]:
        """No faces; blocks while hung."""
        if self.hang.is_set():
            self.hung.set()
            self.release.wait()
        return []

    def close(self) -> None:
        """Nothing to release."""


def test_a_hung_inference_stage_stops_the_watchdog_pings(path_listener: NotifyListener, watchdog_env: None) -> None:
    """Frames keep coming but the inference thread hangs in a stage: the pings stop, so systemd would restart it."""
    detector = HangingDetector()
    cfg = Config(camera=CameraConfig(source="0"), pipeline=PipelineConfig(watchdog_stall_s=1.0))
    camera = ScriptedCamera(sample_path("single_face.mp4"), frame_period_s=1 / 30)
    pipeline = in_process_pipeline(cfg, path_listener, lambda spec, c: camera, detector)
    exit_codes: list[int] = []
    runner = threading.Thread(target=lambda: exit_codes.append(pipeline.run()))
    runner.start()
    try:
        path_listener.wait_for("READY=1", START_TIMEOUT_S)
        path_listener.wait_for("WATCHDOG=1", 30.0, count=2)
        detector.hang.set()
        path_listener.receive_until(detector.hung.is_set, 30.0, "the detector hanging")
        path_listener.listen(cfg.pipeline.watchdog_stall_s + 2.0)  # pings decided before the hang was visible
        pings, reads = path_listener.count("WATCHDOG=1"), camera.reads
        path_listener.listen(3.0)  # a live pipeline would ping 6 times meanwhile
        assert path_listener.count("WATCHDOG=1") == pings, path_listener.received
        assert camera.reads > reads  # the camera is fine and still read: only inference is stuck
        assert not pipeline.alive(time.monotonic())
    finally:
        detector.release.set()
        pipeline.request_stop("test")
        runner.join(60)
    assert exit_codes == [0]


class HangingCamera(ScriptedCamera):
    """The sample clip as a camera whose ``read`` blocks, once ``hang`` is set, until ``release`` is set."""

    def __init__(self, video: Path) -> None:
        super().__init__(video, frame_period_s=1 / 30)
        self.hang = threading.Event()
        self.hung = threading.Event()
        self.release_read = threading.Event()

    def read(self) -> tuple[bool, Any]:
        """A frame; blocks while hung."""
        if self.hang.is_set():
            self.hung.set()
            self.release_read.wait()
        return super().read()


def test_a_hung_camera_read_stops_the_watchdog_pings(path_listener: NotifyListener, watchdog_env: None) -> None:
    """A camera call that never comes back is a hung capture thread: health says ``stalled`` and the pings stop."""
    camera = HangingCamera(sample_path("single_face.mp4"))
    cfg = Config(camera=CameraConfig(source="0", read_timeout_s=1.0), pipeline=PipelineConfig(watchdog_stall_s=1.0))
    pipeline = in_process_pipeline(cfg, path_listener, lambda spec, c: camera)
    exit_codes: list[int] = []
    runner = threading.Thread(target=lambda: exit_codes.append(pipeline.run()))
    runner.start()
    try:
        path_listener.wait_for("WATCHDOG=1", START_TIMEOUT_S, count=2)
        camera.hang.set()
        path_listener.receive_until(camera.hung.is_set, 30.0, "the camera read hanging")
        path_listener.listen(cfg.pipeline.watchdog_stall_s + 2.0)  # pings decided before the hang was visible
        pings = path_listener.count("WATCHDOG=1")
        path_listener.listen(3.0)  # a live pipeline would ping 6 times meanwhile
        assert path_listener.count("WATCHDOG=1") == pings, path_listener.received
        assert pipeline.health().camera.state == CameraState.STALLED
    finally:
        camera.release_read.set()
        pipeline.request_stop("test")
        runner.join(60)
    assert exit_codes == [0]


def test_sighup_reloads_rules_and_refuses_an_invalid_file(
    path_listener: NotifyListener, tmp_path: Path, daemons: list[Daemon]
) -> None:
    """SIGHUP applies a changed rules section; an invalid one is refused, logged, and the daemon runs on."""
    config = write_config(tmp_path)
    daemon = Daemon(tmp_path, config, path_listener, "--source", str(sample_path("single_face.mp4")), "--loop")
    daemons.append(daemon)
    path_listener.wait_for("READY=1", START_TIMEOUT_S)

    write_config(tmp_path, {"stress": {"enter_score": 0.7, "exit_score": 0.4, "sustain_s": 1.0}})
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: bool(daemon.logged("rules reloaded from the configuration file")), 30.0, "the reload log")
    wait_until(lambda: bool(daemon.logged("rules reconfigured")), 30.0, "the inference thread applying the rules")
    (reloaded,) = daemon.logged("rules reloaded from the configuration file")
    assert reloaded["level"] == "info" and reloaded["path"] == str(config)

    write_config(tmp_path, {"stress": {"enter_score": 0.5, "exit_score": 0.9}})  # exit must be below enter
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: bool(daemon.logged("SIGHUP reload refused; rules unchanged")), 30.0, "the refusal log")
    (refused,) = daemon.logged("SIGHUP reload refused; rules unchanged")
    assert refused["level"] == "error"
    assert "rules.stress" in str(refused["error"]) and "exit_score" in str(refused["error"])
    assert len(daemon.logged("rules reconfigured")) == 1  # nothing new was applied

    # Still alive and still processing frames: a fresh watchdog ping after the refusal.
    pings = path_listener.count("WATCHDOG=1")
    path_listener.wait_for("WATCHDOG=1", 30.0, count=pings + 1)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0, daemon.logs()[-3000:]
