"""Tests of the frame source on real video files, with faults injected around OpenCV captures."""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from structlog.testing import capture_logs

from cabin_monitor.assets import sample_path
from cabin_monitor.config import CameraConfig
from cabin_monitor.messages import CameraState, Frame
from cabin_monitor.vision.capture import (
    MAX_EMPTY_PASSES,
    Capture,
    FrameSource,
    SourceEnded,
    SourceError,
    SourceSetupError,
    SourceSpec,
    ended_early,
    open_capture,
    parse_source,
    validate_image,
)
from tests.support.camera import ScriptedCamera
from tests.support.daemon import DaemonProcess, clean_environment

VIDEO = sample_path("single_face.mp4")


def read_all(source: FrameSource, limit: int = 10_000) -> list[Frame]:
    """Frames until the source ends."""
    frames: list[Frame] = []
    try:
        while len(frames) < limit:
            frames.append(source.read())
    except SourceEnded:
        pass
    return frames


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("0", SourceSpec("camera", 0)),
        ("/dev/video2", SourceSpec("camera", "/dev/video2")),
        ("rtsp://cam.local/stream", SourceSpec("stream", "rtsp://cam.local/stream")),
        ("gst: v4l2src ! appsink", SourceSpec("gstreamer", "v4l2src ! appsink")),
        ("clip.mp4", SourceSpec("file", "clip.mp4")),
    ],
)
def test_parse_source(text: str, spec: SourceSpec) -> None:
    """Source strings are classified by shape."""
    assert parse_source(text) == spec


def test_a_missing_video_file_is_refused_up_front() -> None:
    """A file source that does not exist raises SourceError naming it."""
    with pytest.raises(SourceError, match="not found"):
        FrameSource(CameraConfig(source="/no/such/clip.mp4"), threading.Event())


def test_a_fifo_or_a_folder_is_named_for_what_it_is(tmp_path: Path) -> None:
    """A named pipe (FIFO, which would block until a writer came) or a folder given as the source is refused
    at once, saying what it is, with exit code 2; not reported as a missing file."""
    fifo = tmp_path / "frames.fifo"
    os.mkfifo(fifo)
    for path, what in ((fifo, "is a named pipe (FIFO)"), (tmp_path, "is a folder")):
        with pytest.raises(SourceSetupError) as err:
            FrameSource(CameraConfig(source=str(path)), threading.Event())
        assert f"camera.source {path} {what}" in str(err.value) and "not found" not in str(err.value)
        assert err.value.exit_code == 2


def test_file_is_read_to_the_end_on_the_file_clock() -> None:
    """Fast pacing returns every frame with ids in order and capture times one frame period apart."""
    source = FrameSource(CameraConfig(source=str(VIDEO), file_pacing="fast"), threading.Event())
    frames = read_all(source)
    cap = cv2.VideoCapture(str(VIDEO))
    expected = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    fps = cap.get(cv2.CAP_PROP_FPS)
    cap.release()
    assert abs(len(frames) - expected) <= 1
    assert [f.frame_id for f in frames] == list(range(len(frames)))
    steps = np.diff([f.capture_s for f in frames])
    assert np.allclose(steps, 1.0 / fps, atol=2e-3)
    assert frames[0].image.shape == (360, 640, 3) and frames[0].image.dtype == np.uint8
    assert source.stats().state == CameraState.ENDED


def test_loop_replays_with_increasing_capture_times() -> None:
    """With loop on, a file plays again and capture times keep rising."""
    source = FrameSource(CameraConfig(source=str(VIDEO), file_pacing="fast", loop=True), threading.Event())
    frames = read_all(source, limit=200)
    assert len(frames) == 200
    assert np.all(np.diff([f.capture_s for f in frames]) > 0)


def test_truncated_video_ends_cleanly(tmp_path: Path) -> None:
    """A video cut in half either refuses to open with SourceError or yields frames and then ends."""
    cut = tmp_path / "cut.mp4"
    data = sample_path("WolfgangLanger_Pexels.mp4").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    try:
        source = FrameSource(CameraConfig(source=str(cut), file_pacing="fast"), threading.Event())
        frames = read_all(source)
    except SourceError as exc:
        assert "cut.mp4" in str(exc)
    else:
        assert all(f.image.ndim == 3 for f in frames)


def test_a_file_cut_short_is_said_to_end_before_its_declared_length(tmp_path: Path) -> None:
    """The moov-first sample cut in half plays its first half and warns once, with both frame counts."""
    sample, cut = sample_path("WolfgangLanger_Pexels.mp4"), tmp_path / "cut.mp4"
    data = sample.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    whole = read_all(FrameSource(CameraConfig(source=str(sample), file_pacing="fast"), threading.Event()))
    with capture_logs() as logs:
        frames = read_all(FrameSource(CameraConfig(source=str(cut), file_pacing="fast"), threading.Event()))
    warnings = [e for e in logs if e["event"].startswith("video file ended before its declared length")]
    assert 0 < len(frames) < len(whole)
    assert [(w["frames_read"], w["frames_declared"]) for w in warnings] == [(len(frames), len(whole))]
    with capture_logs() as logs:
        read_all(FrameSource(CameraConfig(source=str(sample), file_pacing="fast"), threading.Event()))
    assert not [e for e in logs if e["event"].startswith("video file ended")]


@pytest.mark.parametrize(
    ("read", "declared", "early"), [(228, 472, True), (472, 472, False), (463, 472, False), (40, 0, False)]
)
def test_ended_early_allows_an_estimated_header_count(read: int, declared: int, early: bool) -> None:
    """A header's frame count may be an estimate: only a shortfall beyond 2 % or two frames counts."""
    assert ended_early(read, declared) is early


# The moov-first sample (its index before the media data): cut short, it still opens, but holds no frame.
INDEX_FIRST_VIDEO = sample_path("WolfgangLanger_Pexels.mp4")


def media_data_offset(data: bytes) -> int:
    """Where the ``mdat`` box of an MP4 starts: everything before it is header (ftyp, moov)."""
    offset = 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if kind == b"mdat":
            return offset
        offset += size
    raise AssertionError("no mdat box")


def cut_copy(tmp_path: Path, video: Path, size: int | None) -> Path:
    """A copy of ``video`` cut to ``size`` bytes (``None``: the header only, up to the media data)."""
    data = video.read_bytes()
    cut = tmp_path / f"cut-{size}-{video.name}"
    cut.write_bytes(data[: media_data_offset(data) if size is None else size])
    return cut


@pytest.fixture
def stop_after_a_minute() -> Iterator[threading.Event]:
    """A stop event set after 60 s, so a source that never gives up fails the test instead of hanging it."""
    stop = threading.Event()
    timer = threading.Timer(60.0, stop.set)
    timer.start()
    yield stop
    timer.cancel()


class CountingOpener:
    """The real ``open_capture``, counting how often the source opens the file."""

    def __init__(self) -> None:
        self.opens = 0

    def __call__(self, spec: SourceSpec, cfg: CameraConfig) -> Capture:
        self.opens += 1
        return open_capture(spec, cfg)


@pytest.mark.parametrize("size", [12 * 1024, None], ids=["12KB", "header-only"])
def test_a_looped_file_without_frames_backs_off_and_ends_as_a_setup_error(
    tmp_path: Path, size: int | None, stop_after_a_minute: threading.Event
) -> None:
    """A looped file with no frame is reopened after a growing wait a few times, then refused with exit code 2."""
    cut = cut_copy(tmp_path, INDEX_FIRST_VIDEO, size)
    opener = CountingOpener()
    source = FrameSource(CameraConfig(source=str(cut), loop=True), stop_after_a_minute, opener=opener)
    with capture_logs() as logs, pytest.raises(SourceSetupError, match="gave no frame") as err:
        source.read()
    assert cut.name in str(err.value) and err.value.exit_code == 2
    assert opener.opens == MAX_EMPTY_PASSES  # the first open, then one reopen per empty pass but the last
    retries = [r for r in logs if r["event"] == "looped video file gave no frame; reopening it"]
    assert [r["empty_passes"] for r in retries] == list(range(1, MAX_EMPTY_PASSES))
    assert all(r["retry_in_s"] > 0 for r in retries)
    assert not [r for r in logs if r["event"] == "looping video file"]
    assert source.stats().state == CameraState.FAILED


def test_a_file_without_frames_is_a_setup_error_when_not_looped(tmp_path: Path) -> None:
    """Played once, a header-only file is refused (exit code 2) rather than ending as if it had played."""
    cut = cut_copy(tmp_path, INDEX_FIRST_VIDEO, None)
    with pytest.raises(SourceSetupError, match="no readable frame") as err:
        FrameSource(CameraConfig(source=str(cut)), threading.Event()).read()
    assert err.value.exit_code == 2


def test_a_truncated_file_that_cannot_be_opened_is_a_setup_error(tmp_path: Path) -> None:
    """A file cut before its index (moov at the end) cannot be opened: a setup error, loop or not."""
    cut = cut_copy(tmp_path, VIDEO, 12 * 1024)
    with pytest.raises(SourceSetupError, match="open failed") as err:
        FrameSource(CameraConfig(source=str(cut), loop=True), threading.Event()).read()
    assert err.value.exit_code == 2


def test_a_looped_file_truncated_while_playing_ends_as_a_setup_error(
    tmp_path: Path, stop_after_a_minute: threading.Event
) -> None:
    """A looped file that played and is then cut to its header gives up after a few empty passes."""
    clip = tmp_path / "clip.mp4"
    data = INDEX_FIRST_VIDEO.read_bytes()
    clip.write_bytes(data)
    source = FrameSource(CameraConfig(source=str(clip), loop=True, file_pacing="fast"), stop_after_a_minute)
    played = [source.read() for _ in range(5)]
    with clip.open("r+b") as f:
        f.truncate(media_data_offset(data))
    with pytest.raises(SourceSetupError, match="gave no frame"):
        read_all(source)
    assert [f.frame_id for f in played] == list(range(5))


def daemon_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a daemon under test: JSON logs, its own state folder, no systemd variables."""
    return clean_environment() | {
        "CABIN_MONITOR__LOGGING__FORMAT": "json",
        "CABIN_MONITOR__STATE_DIR": str(tmp_path / "state"),
    }


def test_the_daemon_exits_2_with_one_clear_line_on_a_looped_file_without_frames(tmp_path: Path) -> None:
    """``run --loop`` on a header-only file ends by itself with exit code 2 and a few log lines, no traceback."""
    cut = cut_copy(tmp_path, INDEX_FIRST_VIDEO, None)
    daemon = DaemonProcess(tmp_path, ["--source", str(cut), "--loop"], env=daemon_env(tmp_path))
    assert daemon.wait(120.0) == 2, daemon.logs()[-3000:]
    (stopped,) = daemon.logged("stage thread stopped")
    assert stopped["thread"] == "capture" and stopped["exit_code"] == 2 and cut.name in stopped["error"]
    assert len(daemon.logged("looped video file gave no frame; reopening it")) == MAX_EMPTY_PASSES - 1
    assert "Traceback" not in daemon.logs()
    assert len(daemon.logs().splitlines()) < 100, daemon.logs()[-3000:]


def write_avi(path: Path, frames: int, corrupt: Callable[[int], bool] = lambda i: False, size_px: int = 160) -> Path:
    """A real Motion-JPEG AVI of ``frames`` distinct frames; those ``corrupt`` picks have their JPEG data
    overwritten with random bytes (the container and its index stay intact), so FFmpeg cannot decode them."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (size_px, size_px * 3 // 4))
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((size_px * 3 // 4, size_px, 3), (i * 8) % 256, np.uint8))
    writer.release()
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(7)
    offset, index = data.index(b"movi") + 4, 0
    while data[offset : offset + 4] != b"idx1":
        size = struct.unpack("<I", data[offset + 4 : offset + 8])[0]
        if data[offset : offset + 4] == b"00dc":
            if corrupt(index):
                data[offset + 8 : offset + 8 + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            index += 1
        offset += 8 + size + (size & 1)
    assert index == frames
    path.write_bytes(bytes(data))
    return path


def test_opencv_answers_an_undecodable_frame_with_a_failed_read_and_goes_on(tmp_path: Path) -> None:
    """What the source relies on: OpenCV fails the read of a frame it cannot decode, then reads the next one."""
    video = write_avi(tmp_path / "odd.avi", 6, corrupt=lambda i: i % 2 == 1)
    cap = cv2.VideoCapture(str(video), cv2.CAP_FFMPEG)
    assert [cap.read()[0] for _ in range(8)] == [True, False, True, False, True, False, False, False]
    cap.release()


@pytest.mark.parametrize("frames", [12, 45])
def test_a_file_whose_frames_are_all_corrupt_is_a_setup_error(tmp_path: Path, frames: int) -> None:
    """No frame decodes: exit code 2, naming the file and the corrupt frames seen (up to max_corrupt_frames)."""
    video = write_avi(tmp_path / "garbled.avi", frames, corrupt=lambda i: True)
    source = FrameSource(CameraConfig(source=str(video), file_pacing="fast"), threading.Event())
    seen = min(frames, CameraConfig().max_corrupt_frames)
    with pytest.raises(SourceSetupError) as err:
        source.read()
    assert str(err.value) == f"video file {video}: no frame could be decoded ({seen} corrupt frames)"
    assert err.value.exit_code == 2
    assert (source.stats().state, source.stats().corrupt_frames) == (CameraState.FAILED, seen)


def test_a_looped_file_whose_frames_are_all_corrupt_ends_after_the_empty_passes(
    tmp_path: Path, stop_after_a_minute: threading.Event
) -> None:
    """Looped, a file without a decodable frame is reopened like an empty one, then refused with the count."""
    video = write_avi(tmp_path / "garbled.avi", 12, corrupt=lambda i: True)
    opener = CountingOpener()
    source = FrameSource(CameraConfig(source=str(video), loop=True), stop_after_a_minute, opener=opener)
    with pytest.raises(SourceSetupError) as err:
        source.read()
    assert str(err.value) == (
        f"video file {video}: no frame could be decoded in {MAX_EMPTY_PASSES} passes in a row "
        f"({12 * MAX_EMPTY_PASSES} corrupt frames)"
    )
    assert opener.opens == MAX_EMPTY_PASSES and source.stats().corrupt_frames == 12 * MAX_EMPTY_PASSES


def test_frames_too_small_to_use_are_a_setup_error_too(tmp_path: Path, stop_after_a_minute: threading.Event) -> None:
    """Frames that decode but are no usable image (8x6 px) count as corrupt: refused, looped or not, not ended."""
    video = write_avi(tmp_path / "tiny.avi", 40, size_px=8)
    for loop in (False, True):
        source = FrameSource(CameraConfig(source=str(video), loop=loop), stop_after_a_minute)
        with pytest.raises(SourceSetupError, match=r"no frame could be decoded.*\(\d+ corrupt frames\)"):
            source.read()


def test_corrupt_frames_inside_a_file_are_skipped_and_counted(tmp_path: Path) -> None:
    """Frames 10 to 19 of 30 do not decode: the other 20 are read, in order and on the file's clock, 10 counted."""
    video = write_avi(tmp_path / "mixed.avi", 30, corrupt=lambda i: 10 <= i < 20)
    source = FrameSource(CameraConfig(source=str(video), file_pacing="fast"), threading.Event())
    frames = read_all(source)
    assert [f.frame_id for f in frames] == list(range(20))
    assert [round(f.image[0, 0, 0] / 8) for f in frames] == [*range(10), *range(20, 30)]
    media_s = [f.media_s or 0.0 for f in frames]
    assert media_s[10] - media_s[9] == pytest.approx(11 / 30, abs=1e-3)
    assert (source.stats().state, source.stats().corrupt_frames) == (CameraState.ENDED, 10)


@pytest.mark.parametrize("loop", [False, True], ids=["once", "looped"])
def test_the_daemon_exits_2_naming_a_file_whose_frames_are_all_corrupt(tmp_path: Path, loop: bool) -> None:
    """``run`` on a file none of whose 12 frames decodes ends with exit code 2 and one line saying so, no traceback."""
    video = write_avi(tmp_path / "garbled.avi", 12, corrupt=lambda i: True)
    daemon = DaemonProcess(tmp_path, ["--source", str(video), *(["--loop"] if loop else [])], env=daemon_env(tmp_path))
    assert daemon.wait(120.0) == 2, daemon.logs()[-3000:]
    (stopped,) = daemon.logged("stage thread stopped")
    passes = f" in {MAX_EMPTY_PASSES} passes in a row" if loop else ""
    corrupt = 12 * (MAX_EMPTY_PASSES if loop else 1)
    assert stopped["thread"] == "capture" and stopped["exit_code"] == 2
    assert stopped["error"] == f"video file {video}: no frame could be decoded{passes} ({corrupt} corrupt frames)"
    assert daemon.logged("stats")[-1]["corrupt_frames"] == corrupt
    assert "Traceback" not in daemon.logs()


def test_the_daemon_plays_a_file_with_some_corrupt_frames_and_exits_0(tmp_path: Path) -> None:
    """``run --fast`` on a file with 10 undecodable frames of 30 processes the other 20 and exits 0."""
    video = write_avi(tmp_path / "mixed.avi", 30, corrupt=lambda i: 10 <= i < 20)
    daemon = DaemonProcess(tmp_path, ["--source", str(video), "--fast"], env=daemon_env(tmp_path))
    assert daemon.wait(120.0) == 0, daemon.logs()[-3000:]
    assert (daemon.logged("stats")[-1]["frames"], daemon.logged("stats")[-1]["corrupt_frames"]) == (20, 10)
    assert not daemon.logged("stage thread stopped")


def test_garbage_file_is_a_source_error(tmp_path: Path) -> None:
    """A file that is not a video gives SourceError, not a crash."""
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00not a video" * 1000)
    with pytest.raises(SourceError):
        FrameSource(CameraConfig(source=str(junk), file_pacing="fast"), threading.Event()).read()


def sample_camera(fail_after: int | None = None, corrupt_every: int | None = None) -> ScriptedCamera:
    """The sample clip posing as a camera that fails on cue."""
    return ScriptedCamera(VIDEO, fail_after=fail_after, corrupt_every=corrupt_every)


def camera_config(**changes: object) -> CameraConfig:
    """A camera source with fast reopen timings."""
    return CameraConfig(source="0", reopen_initial_s=0.01, reopen_max_s=0.05, **changes)  # type: ignore[arg-type]


def test_camera_that_fails_mid_stream_is_reopened() -> None:
    """After the camera stops delivering, the source reopens it and frames flow again."""
    opened: list[ScriptedCamera] = []

    def opener(spec: SourceSpec, cfg: CameraConfig) -> ScriptedCamera:
        cam = sample_camera(fail_after=10 if not opened else None)
        opened.append(cam)
        return cam

    source = FrameSource(camera_config(), threading.Event(), opener=opener)
    frames = [source.read() for _ in range(25)]
    stats = source.stats()
    assert len(opened) == 2
    assert stats.reopen_count == 1 and stats.read_failures == 1
    assert stats.state == CameraState.STREAMING
    assert "read failed" in (stats.last_error or "")
    assert [f.frame_id for f in frames] == list(range(25))


def test_camera_that_cannot_open_is_retried_with_backoff() -> None:
    """Failed opens are retried until the camera appears."""
    attempts: list[int] = []

    class Closed(ScriptedCamera):
        def isOpened(self) -> bool:  # noqa: N802
            return False

    def opener(spec: SourceSpec, cfg: CameraConfig) -> ScriptedCamera:
        attempts.append(1)
        return Closed(VIDEO) if len(attempts) < 4 else sample_camera()

    source = FrameSource(camera_config(), threading.Event(), opener=opener)
    assert source.read().frame_id == 0
    assert len(attempts) == 4


def test_stop_ends_an_endless_reopen_loop() -> None:
    """A camera that never opens does not hold the daemon: stop ends the wait with SourceEnded."""
    stop = threading.Event()

    def opener(spec: SourceSpec, cfg: CameraConfig) -> ScriptedCamera:
        stop.set()
        raise cv2.error("no such device")

    source = FrameSource(camera_config(), stop, opener=opener)
    with pytest.raises(SourceEnded):
        source.read()
    assert source.stats().state == CameraState.REOPENING


def test_corrupt_frames_are_skipped_and_counted() -> None:
    """Frames of the wrong shape or dtype never leave the source; they are counted."""
    source = FrameSource(camera_config(), threading.Event(), opener=lambda s, c: sample_camera(corrupt_every=3))
    frames = [source.read() for _ in range(20)]
    assert all(f.image.dtype == np.uint8 and f.image.ndim == 3 for f in frames)
    assert source.stats().corrupt_frames >= 9


def test_a_run_of_corrupt_frames_reopens_the_camera() -> None:
    """max_corrupt_frames bad frames in a row trigger a reopen."""
    calls: list[int] = []

    def opener(spec: SourceSpec, cfg: CameraConfig) -> ScriptedCamera:
        calls.append(1)
        return sample_camera(corrupt_every=1) if len(calls) == 1 else sample_camera()

    source = FrameSource(camera_config(max_corrupt_frames=5), threading.Event(), opener=opener)
    source.read()
    assert source.stats().reopen_count == 1
    assert source.stats().corrupt_frames == 5


@pytest.mark.parametrize(
    "image",
    [
        None,
        np.zeros((0, 0, 3), np.uint8),
        np.zeros((10, 10, 3), np.uint8),
        np.zeros((100, 100, 3), np.float32),
        np.zeros((100, 100, 2), np.uint8),
        "frame",
    ],
)
def test_unusable_images_are_rejected(image: object) -> None:
    """Empty, tiny, float, two-channel and non-array frames are not usable."""
    assert validate_image(image) is None


def test_grey_and_bgra_frames_become_bgr() -> None:
    """Single-channel and four-channel frames are converted to three channels."""
    assert validate_image(np.zeros((32, 32), np.uint8)).shape == (32, 32, 3)  # type: ignore[union-attr]
    assert validate_image(np.zeros((32, 32, 4), np.uint8)).shape == (32, 32, 3)  # type: ignore[union-attr]


def test_open_capture_on_a_real_file() -> None:
    """The OpenCV opener opens a video file through FFmpeg."""
    cap = open_capture(SourceSpec("file", str(VIDEO)), CameraConfig())
    try:
        assert cap.isOpened()
        ok, image = cap.read()
        assert ok and image is not None
    finally:
        cap.release()


def test_fps_follows_the_delivery_pace() -> None:
    """The source's fps is the pace at which frames are delivered, here one every 1/30 s."""
    now = [100.0]
    source = FrameSource(camera_config(), threading.Event(), opener=lambda s, c: sample_camera(), clock=lambda: now[0])
    assert source.delivered_fps() == 0.0
    for _ in range(15):
        source.read()
        now[0] += 1 / 30
    assert source.delivered_fps() == pytest.approx(30.0, rel=1e-3)


def test_a_stream_password_never_reaches_the_health_or_the_logs() -> None:
    """An rtsp:// source with a password is shown (health, logs) with *** in its place."""
    stop = threading.Event()

    def refuse(spec: SourceSpec, cfg: CameraConfig) -> Capture:
        stop.set()  # one failed open, then the source stops retrying
        raise OSError("connection refused")

    source = FrameSource(CameraConfig(source="rtsp://admin:hunter2@cam.local/stream"), stop, opener=refuse)
    with capture_logs() as logs, pytest.raises(SourceEnded):
        source.read()
    assert source.stats().source == "rtsp://admin:***@cam.local/stream"
    assert logs and "hunter2" not in repr(logs)
