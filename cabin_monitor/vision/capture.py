"""Frame capture from a camera, a video file or a network stream, through OpenCV.

``FrameSource.read`` returns the next valid frame. It skips and counts
corrupt frames, reopens a failed or vanished camera with exponential backoff,
paces video files at their own frame rate (``realtime``) or times them by the
file's clock (``fast``), and raises ``SourceEnded`` when a file is done. OpenCV
answers a frame of a file that it cannot decode with a failed read, as it answers
the end of the file, and goes on to the next frame: a failed read followed by a
frame is counted as a corrupt frame, and ``max_corrupt_frames`` failed reads in a
row are the end of the file; while a pass has given no frame yet, the file's packets
(read without decoding) tell each undecodable frame from the end. A video file that gives no frame at all (empty,
truncated, header only, or every frame corrupt) is a setup error, also when looped:
a pass without a frame waits (with the reopen backoff) and reopens the file, and
``MAX_EMPTY_PASSES`` of them in a row end the source.
While it waits or reopens, the source shows a sign of life at least every
``WAIT_SLICE_S`` (``last_alive_s``): the watchdog's proof that the capture side
is alive, with or without a camera.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NoReturn, Protocol, cast

import cv2
import numpy as np
import structlog

from cabin_monitor.assets import SAMPLE_VIDEO
from cabin_monitor.config import CameraConfig, redacted
from cabin_monitor.config.camera import SourceKind, source_kind
from cabin_monitor.errors import ConfigurationError, RuntimeFault
from cabin_monitor.messages import CameraState, CaptureStats, Frame, ImageArray
from cabin_monitor.metrics import RateWindow

log = structlog.get_logger("cabin_monitor.vision.capture")
# A looped file whose passes give no frame this many times in a row holds nothing to play.
MAX_EMPTY_PASSES = 3
# Waits (reopen backoff, file pacing) wake this often to show that the capture thread is alive.
WAIT_SLICE_S = 0.5


class SourceEnded(Exception):
    """The source has no more frames (end of file, or the daemon is stopping)."""


class SourceError(RuntimeFault):
    """The source cannot be used at all (e.g. a video file that does not exist)."""


class SourceSetupError(SourceError):
    """The configured source cannot be right (empty, a video file that does not exist, cannot be opened
    or holds no frame): restarting cannot fix it, so it exits like a configuration error."""

    exit_code = ConfigurationError.exit_code


@dataclass(frozen=True)
class SourceSpec:
    """A parsed ``camera.source`` value."""

    kind: SourceKind
    target: str | int


class Capture(Protocol):
    """The part of ``cv2.VideoCapture`` the source uses."""

    def isOpened(self) -> bool: ...  # noqa: N802 - OpenCV's name
    def read(self) -> tuple[bool, np.ndarray | None]: ...
    def get(self, prop: int) -> float: ...
    def set(self, prop: int, value: float) -> bool: ...
    def release(self) -> None: ...


def parse_source(text: str) -> SourceSpec:
    """Classify a source string: camera index or device, URL, GStreamer pipeline, or file."""
    value = text.strip()
    kind = source_kind(value)
    if kind is None:
        raise SourceSetupError("camera.source is empty")
    if value == "sample":
        return SourceSpec("file", str(SAMPLE_VIDEO))
    if kind == "camera" and value.isdigit():
        return SourceSpec("camera", int(value))
    if kind == "gstreamer":
        return SourceSpec("gstreamer", value[4:].strip())
    return SourceSpec(kind, value)


def gstreamer_support(build_information: str | None = None) -> bool:
    """Whether this OpenCV can open GStreamer pipelines (its build information says ``GStreamer: YES``);
    the pip wheels of OpenCV are built without GStreamer."""
    text = cv2.getBuildInformation() if build_information is None else build_information
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "GStreamer":
            return value.strip().upper().startswith("YES")
    return False


def check_source(source: str) -> SourceSpec:
    """The parsed source, or ``SourceSetupError`` where it cannot work whatever happens later: a
    GStreamer pipeline without GStreamer in OpenCV, a video file that is missing or is no regular file."""
    spec = parse_source(source)
    if spec.kind == "gstreamer" and not gstreamer_support():
        raise SourceSetupError(
            "camera.source gst:... needs OpenCV built with GStreamer, and this one is not (the pip wheels never "
            "are): use the system's OpenCV (python3-opencv; on a Jetson, JetPack's), see deploy/jetson.md"
        )
    if spec.kind == "file":
        path = Path(str(spec.target))
        if not path.exists():
            raise SourceSetupError(f"video file not found: {path}")
        if not path.is_file():
            raise SourceSetupError(f"camera.source {path} is {_what_it_is(path)}, not a video file")
    return spec


def _what_it_is(path: Path) -> str:
    if path.is_fifo():
        return "a named pipe (FIFO), which blocks until a writer opens it"
    if path.is_dir():
        return "a folder"
    if path.is_socket():
        return "a socket"
    if path.is_char_device() or path.is_block_device():
        return "a device (give /dev/videoN for a V4L2 camera)"
    return "not a regular file"


def open_capture(spec: SourceSpec, cfg: CameraConfig) -> Capture:
    """Open ``spec`` with the OpenCV backend that suits it."""
    if spec.kind == "camera":
        cap = (
            cv2.VideoCapture(spec.target, cv2.CAP_V4L2)
            if isinstance(spec.target, str)
            else cv2.VideoCapture(spec.target)
        )
        if cfg.width_px:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, cfg.width_px)
        if cfg.height_px:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, cfg.height_px)
        if cfg.fps:
            cap.set(cv2.CAP_PROP_FPS, cfg.fps)
        # Keep the driver's queue short: we want the newest frame, not a backlog.
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        return cast(Capture, cap)
    if spec.kind == "gstreamer":
        return cast(Capture, cv2.VideoCapture(str(spec.target), cv2.CAP_GSTREAMER))
    timeout_ms = int(cfg.read_timeout_s * 1000)
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
    return cast(Capture, cv2.VideoCapture(str(spec.target), cv2.CAP_FFMPEG, params))


def validate_image(image: object) -> ImageArray | None:
    """The frame as HxWx3 uint8 BGR, or None when it is not a usable image."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.size == 0:
        return None
    arr: ImageArray = np.asarray(image, dtype=np.uint8)
    if arr.ndim == 2:
        arr = cv2.cvtColor(arr, cv2.COLOR_GRAY2BGR)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2BGR)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 16 or arr.shape[1] < 16:
        return None
    return np.ascontiguousarray(arr)


def count_packets(path: str, limit: int) -> int | None:
    """How many video packets (frames, decodable or not) the file holds, up to ``limit``, read without
    decoding; None when the file cannot be read that way."""
    try:
        cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_FORMAT, -1])
    except cv2.error:
        return None
    try:
        if not cap.isOpened() or cap.get(cv2.CAP_PROP_FORMAT) != -1:
            return None
        packets = 0
        while packets < limit and cap.grab():
            packets += 1
        return packets
    except cv2.error:
        return None
    finally:
        cap.release()


def ended_early(frames_read: int, frames_declared: int) -> bool:
    """Whether a file that gave ``frames_read`` frames stopped short of the ``frames_declared`` of its header
    (0: not declared), beyond the 2 % or two frames by which a header's count may be an estimate."""
    return frames_declared > 0 and frames_read + max(2, frames_declared // 50) < frames_declared


class FrameSource:
    """Reads frames from one configured source and survives its faults."""

    def __init__(
        self,
        cfg: CameraConfig,
        stop: threading.Event,
        opener: Callable[[SourceSpec, CameraConfig], Capture] = open_capture,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.spec = check_source(cfg.source)
        self._stop = stop
        self._opener = opener
        self._clock = clock
        self._wall = wall_clock
        self._cap: Capture | None = None
        self._next_id = 0
        self.shown_source = redacted(cfg.source)  # for logs and health: never a password from an rtsp:// URL
        self._stats = CaptureStats(source=self.shown_source)
        self._backoff_s = cfg.reopen_initial_s
        self._lock = threading.Lock()
        # File timing: media time is mapped onto the monotonic clock from the first frame.
        self._file_fps = 0.0
        self._file_t0: float | None = None
        self._file_offset_s = 0.0
        self._last_media_s = 0.0
        self._next_due: float | None = None
        self._delivered = RateWindow()
        self._pass_frames = 0  # frames delivered since the file was opened or rewound
        self._pass_corrupt = 0  # corrupt frames counted since then
        self._pass_packets_known = 0  # packets the file is known to hold, while the pass has no frame
        self._empty_passes = 0  # passes in a row that delivered none
        self._empty_corrupt = 0  # corrupt frames counted in those passes
        self._short_file_noted = False  # the file was said to end before its declared length
        self._alive_s = clock()

    @property
    def is_file(self) -> bool:
        """Whether the source is a video file."""
        return self.spec.kind == "file"

    @property
    def paced_realtime(self) -> bool:
        """True for live sources and for files played at their own rate (frames may be dropped)."""
        return not self.is_file or self.cfg.file_pacing == "realtime"

    def stats(self) -> CaptureStats:
        """A snapshot of the counters."""
        with self._lock:
            return self._stats

    def delivered_fps(self) -> float:
        """Frames delivered per second over the last few seconds (wall pace, not the file's clock)."""
        return self._delivered.per_s()

    def _update(self, **changes: object) -> None:
        with self._lock:
            self._stats = replace(self._stats, **changes)  # type: ignore[arg-type]

    @property
    def last_alive_s(self) -> float:
        """When (on ``clock``) the capture side last showed it is working: a read came back, an open attempt
        ended, or a wait between attempts ticked. Frozen only while a call into the backend hangs."""
        return self._alive_s

    def _beat(self) -> None:
        self._alive_s = self._clock()

    def _wait(self, seconds: float) -> None:
        """Wait ``seconds`` (or until stop), with a sign of life at least every ``WAIT_SLICE_S``."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            self._beat()
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._stop.wait(min(left, WAIT_SLICE_S))
        self._beat()

    def mark_stalled(self, reason: str) -> None:
        """Called by the pipeline when no frame has come for ``read_timeout_s``."""
        self._update(state=CameraState.STALLED, last_error=reason)

    def _open(self) -> None:
        """Open (or reopen) the source, waiting with backoff until it works or the daemon stops."""
        attempt = 0
        while not self._stop.is_set():
            attempt += 1
            self._beat()
            try:
                cap = self._opener(self.spec, self.cfg)
                opened = cap.isOpened()
            except Exception as exc:  # OpenCV backends raise cv2.error and others
                cap, opened = None, False
                error = f"open failed: {exc}"
            else:
                error = "open failed: the backend could not open the source"
            self._beat()
            if opened and cap is not None:
                self._cap = cap
                self._pass_frames = self._pass_corrupt = self._pass_packets_known = 0
                if not self.is_file:
                    self._backoff_s = self.cfg.reopen_initial_s
                fps = cap.get(cv2.CAP_PROP_FPS)
                self._file_fps = fps if self.is_file and 1.0 <= fps <= 240.0 else (30.0 if self.is_file else 0.0)
                log.info("source opened", source=self.shown_source, kind=self.spec.kind, attempt=attempt)
                return
            if cap is not None:
                cap.release()
            if self.is_file:
                self._update(state=CameraState.FAILED, last_error=error)
                raise SourceSetupError(f"video file {self.spec.target}: {error}")
            wait = self._next_wait_s()
            self._update(state=CameraState.REOPENING, last_error=error)
            log.warning(
                "source unavailable, retrying", source=self.shown_source, error=error, retry_in_s=round(wait, 2)
            )
            self._wait(wait)
        raise SourceEnded("stopping")

    def _reopen(self, reason: str) -> None:
        log.warning("reopening source", source=self.shown_source, reason=reason)
        self.release()
        with self._lock:
            self._stats = replace(
                self._stats, state=CameraState.REOPENING, reopen_count=self._stats.reopen_count + 1, last_error=reason
            )
        self._wait(self._next_wait_s())
        self._open()

    def _next_wait_s(self) -> float:
        """A wait between half the backoff and all of it (jitter), then the backoff doubles up to the maximum."""
        wait = self._backoff_s * (0.5 + random.random() / 2)
        self._backoff_s = min(self.cfg.reopen_max_s, self._backoff_s * 2)
        return wait

    def read(self) -> Frame:
        """The next valid frame; raises ``SourceEnded`` at end of file or on stop."""
        if self._cap is None:
            self._open()
        corrupt_run = 0
        failed_reads = 0  # file reads in a row that gave nothing: each an undecodable frame, or the end
        while not self._stop.is_set():
            assert self._cap is not None
            self._beat()
            try:
                ok, image = self._cap.read()
            except Exception as exc:  # a backend error is a failed read, not a crash
                ok, image = False, None
                log.warning("read raised", source=self.shown_source, error=str(exc))
            self._beat()
            if not ok:
                if not self.is_file:
                    with self._lock:
                        self._stats = replace(self._stats, read_failures=self._stats.read_failures + 1)
                    self._reopen("read failed (camera gone or stream interrupted)")
                    continue
                left = self._packets_left() if self._pass_frames == 0 else None
                if left:  # the file holds more than it gave: this frame could not be decoded
                    corrupt_run += 1
                    self._count_corrupt(1)
                    if corrupt_run >= self.cfg.max_corrupt_frames:
                        self._end_pass()
                        corrupt_run = 0
                    continue
                if left is None:
                    failed_reads += 1
                    if failed_reads < self.cfg.max_corrupt_frames:
                        continue
                self._end_pass()
                corrupt_run = failed_reads = 0
                continue
            if failed_reads:
                # A frame after failed reads: those were frames OpenCV could not decode, not the end.
                self._count_corrupt(failed_reads)
                failed_reads = 0
            frame_image = validate_image(image)
            if frame_image is None:
                corrupt_run += 1
                self._count_corrupt(1)
                if corrupt_run >= self.cfg.max_corrupt_frames:
                    if self.is_file:
                        if self._pass_frames == 0:
                            self._end_pass()
                            corrupt_run = 0
                            continue
                        self._update(state=CameraState.FAILED)
                        raise SourceEnded(f"{corrupt_run} corrupt frames in a row")
                    self._reopen(f"{corrupt_run} corrupt frames in a row")
                    corrupt_run = 0
                continue
            return self._make_frame(frame_image)
        raise SourceEnded("stopping")

    def _count_corrupt(self, frames: int) -> None:
        self._pass_corrupt += frames
        with self._lock:
            self._stats = replace(
                self._stats, corrupt_frames=self._stats.corrupt_frames + frames, last_error="corrupt frame"
            )

    def _packets_left(self) -> bool | None:
        """Whether the file holds packets beyond those this pass has read, while no frame has come (every
        one read so far was corrupt); None when the file cannot tell. Read from the file's index, not decoded."""
        consumed = self._pass_corrupt
        if consumed < self._pass_packets_known:
            return True
        packets = count_packets(str(self.spec.target), consumed + self.cfg.max_corrupt_frames + 1)
        if packets is None:
            return None
        self._pass_packets_known = packets
        return packets > consumed

    def _end_pass(self) -> None:
        """The file gives no more frames this pass: rewind a looped file, end the source, or refuse a file
        that gave no frame at all."""
        self._note_short_file()
        if self.cfg.loop:
            self._rewind()
            return
        if self._pass_frames == 0:
            self._fail_empty_file(self._no_frame_reason(self._pass_corrupt))
        self._update(state=CameraState.ENDED)
        raise SourceEnded("end of file")

    def _note_short_file(self) -> None:
        """Warn, once per source, when a pass that gave frames ends well before the frame count the file's
        header declares: the file was cut short (a copy interrupted, a recorder that lost power)."""
        if self._short_file_noted or self._cap is None or self._pass_frames == 0:
            return
        declared = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        read = self._pass_frames + self._pass_corrupt
        if ended_early(read, declared):
            self._short_file_noted = True
            log.warning(
                "video file ended before its declared length (truncated?)",
                source=self.shown_source,
                frames_read=read,
                frames_declared=declared,
            )

    def _no_frame_reason(self, corrupt_frames: int, passes: int = 1) -> str:
        if corrupt_frames == 0:
            if passes > 1:
                return f"{passes} passes in a row gave no frame (empty or truncated)"
            return "it holds no readable frame (empty or truncated)"
        each = f" in {passes} passes in a row" if passes > 1 else ""
        return f"no frame could be decoded{each} ({corrupt_frames} corrupt frames)"

    def _rewind(self) -> None:
        """Play a looped file again. A pass that gave no frame waits (the reopen backoff, growing) and
        reopens the file, which may have been replaced; ``MAX_EMPTY_PASSES`` in a row end the source."""
        assert self._cap is not None
        if self._pass_frames == 0:
            self._empty_passes += 1
            self._empty_corrupt += self._pass_corrupt
            if self._empty_passes >= MAX_EMPTY_PASSES:
                self._fail_empty_file(self._no_frame_reason(self._empty_corrupt, self._empty_passes))
            wait = self._next_wait_s()
            log.warning(
                "looped video file gave no frame; reopening it",
                source=self.shown_source,
                empty_passes=self._empty_passes,
                max_empty_passes=MAX_EMPTY_PASSES,
                corrupt_frames=self._pass_corrupt,
                retry_in_s=round(wait, 2),
            )
            self.release()
            self._wait(wait)
            self._open()
            return
        self._empty_passes = self._empty_corrupt = 0
        self._backoff_s = self.cfg.reopen_initial_s
        self._pass_frames = self._pass_corrupt = self._pass_packets_known = 0
        self._file_offset_s = self._last_media_s + 1.0 / max(1.0, self._file_fps)
        if not self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0):
            self.release()
            self._open()
        log.info("looping video file", source=self.shown_source)

    def _fail_empty_file(self, why: str) -> NoReturn:
        self._update(state=CameraState.FAILED, last_error=why)
        raise SourceSetupError(f"video file {self.spec.target}: {why}")

    def _make_frame(self, image: ImageArray) -> Frame:
        now = self._clock()
        media_s: float | None = None
        if self.is_file:
            assert self._cap is not None
            media_s = self._file_offset_s + max(0.0, self._cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0)
            if media_s <= self._last_media_s and self._next_id > 0:
                media_s = self._last_media_s + 1.0 / max(1.0, self._file_fps)
            self._last_media_s = media_s
            if self._file_t0 is None:
                self._file_t0 = now - media_s
            if self.cfg.file_pacing == "realtime":
                due = self._file_t0 + media_s
                if due > now:
                    self._wait(due - now)
                capture_s = self._clock()
            else:
                capture_s = self._file_t0 + media_s
        else:
            capture_s = now
        wall = self._wall() - (self._clock() - capture_s) if not self.is_file else self._wall()
        frame = Frame(frame_id=self._next_id, capture_s=capture_s, wall_time_s=wall, image=image, media_s=media_s)
        self._next_id += 1
        self._pass_frames += 1
        with self._lock:
            self._stats = replace(self._stats, state=CameraState.STREAMING, frames=self._stats.frames + 1)
        self._delivered.add(self._clock())
        return frame

    def release(self) -> None:
        """Close the device or file."""
        if self._cap is not None:
            try:
                self._cap.release()
            finally:
                self._cap = None
