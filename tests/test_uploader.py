"""The uploader: finished files reach the store under the vehicle id, verified before the local copy goes; broken
uploads continue where they stopped; stops are clean; the folder cap holds while the store is away."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from cabin_monitor.config import Config, RecordConfig
from cabin_monitor.daemon import open_uploader
from cabin_monitor.errors import ConfigurationError
from cabin_monitor.record.policy import FileInfo
from cabin_monitor.record.upload import Throttle, UploadPolicy
from cabin_monitor.runtime.recorder import Recorder
from cabin_monitor.runtime.uploader import Uploader, UploadMismatch
from tests.support.flaky_fs import FlakyFileSystem
from tests.support.helpers import wait_until
from tests.support.recordings import one_occupant, session_meta

REPO = Path(__file__).resolve().parents[1]


def record(folder: Path, frames: int = 3000, max_file_mb: float = 0.03) -> list[Path]:
    """Real recording files written by the recorder (several, as the size rotates them); their paths."""
    recorder = Recorder(RecordConfig(dir=folder, max_file_mb=max_file_mb, row_group_rows=256), session_meta())
    recorder.start()
    for result in one_occupant(frames):
        recorder.record_frame(result, ())
    recorder.stop(30.0)
    return sorted(folder.glob("*.parquet"))


def upload_config(folder: Path, url: str, **changes: object) -> RecordConfig:
    """``record`` settings uploading ``folder`` to ``url``, retrying quickly."""
    return RecordConfig.model_validate(
        {"dir": folder, "upload_url": url, "upload_retry_min_s": 0.05, "upload_retry_max_s": 0.2, **changes}
    )


def sha256(path: Path) -> str:
    """The file's SHA-256."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_finished_files_are_uploaded_under_the_vehicle_id_and_deleted_only_once_verified(tmp_path: Path) -> None:
    """A file:// store: every finished file arrives byte for byte under car-17/, the local copies go; the
    .partial file being written is left alone; the thread stops cleanly."""
    folder = tmp_path / "rec"
    files = record(folder)
    assert len(files) >= 2
    digests = {p.name: sha256(p) for p in files}
    being_written = folder / "car-17-20261203T000000Z-5f0e8a52-00099.parquet.partial"
    being_written.write_bytes(b"not finished")
    uploader = Uploader(upload_config(folder, f"file://{tmp_path}/store"), "car-17")
    uploader.start()
    wait_until(lambda: not list(folder.glob("*.parquet")), 30.0, "the uploads")
    started = time.monotonic()
    uploader.stop(10.0)
    assert time.monotonic() - started < 2.0
    stored = tmp_path / "store" / "car-17"
    assert {p.name: sha256(p) for p in stored.iterdir()} == digests
    assert being_written.exists() and uploader.uploaded_files == len(files)


def test_an_upload_broken_off_mid_file_continues_where_it_stopped_and_verifies(tmp_path: Path) -> None:
    """The store drops the connection after 10 000 bytes: the file stays, a temporary copy holds what arrived;
    the retry appends only the rest, then the verified copy replaces the local file."""
    folder = tmp_path / "rec"
    (path, *_) = record(folder, frames=2000, max_file_mb=1.0)
    digest, size = sha256(path), path.stat().st_size
    fs = FlakyFileSystem(fail_after_bytes=10_000, failing_opens=1)
    uploader = Uploader(
        upload_config(folder, f"file://{tmp_path}/store", upload_chunk_bytes=4096), "car-17", filesystem=fs
    )
    with pytest.raises(ConnectionResetError):
        uploader.upload_pending()
    partial = tmp_path / "store" / "car-17" / (path.name + ".partial")
    assert path.exists() and partial.stat().st_size == 10_000
    assert not (tmp_path / "store" / "car-17" / path.name).exists()
    uploader.upload_pending()
    assert fs.writes == [["wb", 10_000], ["ab", size - 10_000]]
    assert not path.exists() and sha256(tmp_path / "store" / "car-17" / path.name) == digest


def test_a_copy_that_does_not_verify_is_removed_and_the_file_kept_until_a_clean_upload(tmp_path: Path) -> None:
    """A temporary copy whose bytes differ from the file's start: the appended result fails the SHA-256 check,
    is removed, the local file stays; the next try starts from zero and only then is the file deleted."""
    folder = tmp_path / "rec"
    (path, *_) = record(folder, frames=2000, max_file_mb=1.0)
    store = tmp_path / "store" / "car-17"
    store.mkdir(parents=True)
    (store / (path.name + ".partial")).write_bytes(b"\0" * 5000)
    fs = FlakyFileSystem(fail_after_bytes=0, failing_opens=0)
    uploader = Uploader(upload_config(folder, f"file://{tmp_path}/store"), "car-17", filesystem=fs)
    with pytest.raises(UploadMismatch):
        uploader.upload_pending()
    assert path.exists() and list(store.iterdir()) == []
    uploader.upload_pending()
    assert [mode for mode, _ in fs.writes] == ["ab", "wb"]
    assert not path.exists() and (store / path.name).stat().st_size == fs.writes[-1][1]


def test_a_stop_during_a_slow_upload_is_prompt_and_the_file_stays(tmp_path: Path) -> None:
    """At 8 kB/s a file takes seconds: a stop returns within a second, the file stays local, nothing final is
    stored; a later uploader finishes it."""
    folder = tmp_path / "rec"
    (path, *_) = record(folder, frames=2000, max_file_mb=1.0)
    cfg = upload_config(folder, f"file://{tmp_path}/store", upload_max_bytes_per_s=8192, upload_chunk_bytes=4096)
    uploader = Uploader(cfg, "car-17")
    uploader.start()
    time.sleep(0.5)
    started = time.monotonic()
    uploader.stop(10.0)
    assert time.monotonic() - started < 1.5
    assert path.exists() and not (tmp_path / "store" / "car-17" / path.name).exists()
    Uploader(cfg.model_copy(update={"upload_max_bytes_per_s": 1e9}), "car-17").upload_pending()
    assert not path.exists() and (tmp_path / "store" / "car-17" / path.name).exists()


def test_the_folder_cap_holds_while_the_store_is_unreachable(tmp_path: Path) -> None:
    """Every upload fails: the recorder keeps writing, deletes its oldest files at the cap, and the uploader
    deletes nothing and keeps retrying."""
    folder = tmp_path / "rec"
    fs = FlakyFileSystem(fail_after_bytes=0, failing_opens=10**6)
    cfg = upload_config(
        folder,
        f"file://{tmp_path}/store",
        max_file_mb=0.02,
        max_total_mb=0.1,
        row_group_rows=64,
        queue_max_frames=10000,
    )
    uploader = Uploader(cfg, "car-17", filesystem=fs)
    recorder = Recorder(cfg, session_meta(), uploader=uploader)
    recorder.start()
    for result in one_occupant(8000):
        recorder.record_frame(result, ())
    wait_until(lambda: uploader.failures >= 2, 30.0, "failed uploads")
    recorder.stop(30.0)
    kept = list(folder.glob("*.parquet"))
    assert recorder.files_written > len(kept) >= 2
    assert sum(p.stat().st_size for p in kept) <= cfg.max_total_mb * 1e6
    assert uploader.uploaded_files == 0 and not list((tmp_path / "store").rglob("*.parquet"))


def test_retry_waits_pending_order_resumption_and_pacing() -> None:
    """Full jitter over a doubling wait up to its cap; finished files oldest first; where to resume; pacing."""
    policy = UploadPolicy(retry_min_s=2.0, retry_max_s=60.0)
    assert [policy.backoff_s(n, 0.5) for n in (1, 2, 3, 6, 7)] == [1.0, 2.0, 4.0, 30.0, 30.0]
    assert policy.backoff_s(3, 0.0) == 0.0
    files = [FileInfo("b.parquet", 1, 20.0), FileInfo("c.parquet.partial", 1, 1.0), FileInfo("a.parquet", 1, 30.0)]
    assert [f.name for f in policy.pending(files)] == ["b.parquet", "a.parquet"]
    assert (policy.resume_at(100, None), policy.resume_at(100, 40), policy.resume_at(100, 120)) == (0, 40, 0)
    assert policy.verified(10, "ab", 10, "ab") and not policy.verified(10, "ab", 10, "cd")
    throttle = Throttle(max_bytes_per_s=1000.0)
    assert throttle.wait_s(5.0) == 0.0
    throttle.sent(500, 5.0)
    throttle.sent(500, 5.0)
    assert throttle.wait_s(5.25) == pytest.approx(0.75)
    assert throttle.wait_s(7.0) == 0.0


def test_upload_settings_are_checked_and_the_daemon_loads_no_fsspec_without_them() -> None:
    """upload_url needs dir and a URL; importing the daemon and recorder loads neither fsspec, Dask nor fleet."""
    with pytest.raises(ValidationError, match="set dir too"):
        RecordConfig(upload_url="s3://bucket/recordings")
    with pytest.raises(ValidationError, match="expected a URL"):
        RecordConfig(dir=Path("/tmp/rec"), upload_url="/mnt/share")
    code = (
        "import sys, cabin_monitor.daemon, cabin_monitor.runtime.recorder, cabin_monitor.runtime.uploader\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('fsspec', 'dask', 'distributed')"
        " or m.startswith('cabin_monitor.fleet')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def test_the_daemon_uploads_under_its_vehicle_id_and_refuses_a_store_it_cannot_reach(tmp_path: Path) -> None:
    """record.upload_url gives an uploader into <url>/<vehicle_id>; an unknown scheme is a configuration error."""
    uploader = open_uploader(Config(vehicle_id="car-5", record=upload_config(tmp_path, f"file://{tmp_path}/store")))
    assert uploader is not None and uploader.target == f"{tmp_path}/store/car-5"
    assert open_uploader(Config(record=RecordConfig(dir=tmp_path))) is None
    with pytest.raises(ConfigurationError, match=r"record\.upload_url nosuchstore://bucket"):
        open_uploader(Config(record=upload_config(tmp_path, "nosuchstore://bucket")))
