"""The uploader: finished recording files sent to ``record.upload_url`` on a thread of its own, then deleted.

Each ``*.parquet`` file in the recording folder (never a ``.partial`` one) goes to
``<upload_url>/<vehicle_id>/<name>``, oldest first: written under ``<name>.partial`` (continued where an
earlier try stopped when the store can append, else started again), renamed, then read back and checked
against the local file's size and SHA-256. Only a verified file is deleted locally. Failures are retried
with a growing, jittered wait; writes and the read back are paced to ``upload_max_bytes_per_s``. While the
store is unreachable files stay, and the recorder's folder cap deletes the oldest as usual.
fsspec is imported here only when an uploader is made, i.e. when ``record.upload_url`` is set.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from cabin_monitor.config import RecordConfig
from cabin_monitor.errors import ConfigurationError
from cabin_monitor.record.policy import FileInfo
from cabin_monitor.record.upload import SUFFIX, TEMPORARY_SUFFIX, Throttle, UploadPolicy

log = structlog.get_logger("cabin_monitor.runtime.uploader")

WAKE_S = 0.5  # the thread notices a stop at least this often


class UploadMismatch(Exception):
    """The stored copy differs from the local file."""


class _Stopped(Exception):
    """The uploader was stopped between two writes or reads."""


class Uploader:
    """Uploads the recording folder's finished files and deletes them once verified; ``start``/``stop``."""

    def __init__(
        self,
        cfg: RecordConfig,
        vehicle_id: str,
        filesystem: Any | None = None,
        clock: Callable[[], float] = time.monotonic,
        draw: Callable[[], float] = random.random,
    ) -> None:
        """``filesystem``: an fsspec filesystem to use for ``upload_url``'s path (default: the URL's own)."""
        if cfg.dir is None or cfg.upload_url is None:
            raise ValueError("Uploader needs record.dir and record.upload_url")
        self.folder = cfg.dir
        if filesystem is None:
            self.fs, root = _filesystem(cfg.upload_url)
        else:
            self.fs, root = filesystem, filesystem._strip_protocol(cfg.upload_url)
        self.target = f"{str(root).rstrip('/')}/{vehicle_id}"
        self._policy = UploadPolicy(cfg.upload_retry_min_s, cfg.upload_retry_max_s)
        self._throttle = Throttle(cfg.upload_max_bytes_per_s)
        self._chunk_bytes = cfg.upload_chunk_bytes
        self._poll_s = cfg.upload_poll_s
        self._clock = clock
        self._draw = draw
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.uploaded_files = 0
        self.uploaded_bytes = 0
        self.failures = 0  # attempts that failed (store unreachable, a write error, a copy that did not verify)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the upload thread."""
        self._thread = threading.Thread(target=self._run, name="uploader", daemon=True)
        self._thread.start()
        log.info("uploading recordings", folder=str(self.folder), target=self.target)

    def wake(self) -> None:
        """Look at the folder now (a file was just finished)."""
        self._wake.set()

    def stop(self, timeout_s: float) -> None:
        """Stop between two writes (an unfinished upload is continued next time) and join the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is None:
            return
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("uploader did not stop in time", timeout_s=timeout_s)
        log.info("uploader stopped", files=self.uploaded_files, bytes=self.uploaded_bytes, failures=self.failures)

    # -- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        failures_in_row = 0
        while not self._stop.is_set():
            self._wake.clear()  # a file finished from here on is picked up by the next pass, without waiting
            try:
                self.upload_pending()
                failures_in_row = 0
                wait_s = self._poll_s
            except Exception as exc:  # any store's error (network, auth, a full bucket): retried later
                failures_in_row += 1
                self.failures += 1
                wait_s = self._policy.backoff_s(failures_in_row, self._draw())
                log.warning("recording upload failed; retrying", error=repr(exc), retry_in_s=round(wait_s, 1))
            self._sleep(wait_s, wakeable=failures_in_row == 0)

    def _sleep(self, wait_s: float, wakeable: bool) -> None:
        until = self._clock() + wait_s
        while not self._stop.is_set() and (left := until - self._clock()) > 0:
            if wakeable and self._wake.wait(min(WAKE_S, left)):
                return
            if not wakeable:
                self._stop.wait(min(WAKE_S, left))

    def upload_pending(self) -> None:
        """Upload every finished file, oldest first; raises on the first failure (the rest wait for the retry)."""
        for info in self._policy.pending(self._finished_files()):
            if self._stop.is_set() or not self.upload(self.folder / info.name):
                return

    def _finished_files(self) -> list[FileInfo]:
        files = []
        for path in self.folder.glob("*" + SUFFIX):
            try:
                st = path.stat()
            except FileNotFoundError:  # deleted by the folder cap meanwhile
                continue
            files.append(FileInfo(path.name, st.st_size, st.st_mtime))
        return files

    def upload(self, path: Path) -> bool:
        """Send one file, verify it, delete it locally; False when a stop interrupted it (it is continued later)."""
        try:
            size, digest = path.stat().st_size, _sha256(path)
        except FileNotFoundError:
            return True  # deleted by the folder cap meanwhile
        stored, partial = f"{self.target}/{path.name}", f"{self.target}/{path.name}{TEMPORARY_SUFFIX}"
        try:
            if self._verified(stored, size, digest):  # uploaded before, not yet deleted here
                path.unlink(missing_ok=True)
                return True
            self.fs.makedirs(self.target, exist_ok=True)
            self._send(path, partial, size)
            self.fs.mv(partial, stored)
            if not self._verified(stored, size, digest):
                self.fs.rm(stored)
                raise UploadMismatch(f"{stored}: the stored copy does not match {path.name}; uploading it again")
        except _Stopped:
            return False
        self.uploaded_files += 1
        self.uploaded_bytes += size
        log.info("recording uploaded", path=str(path), target=stored, bytes=size, sha256=digest)
        path.unlink(missing_ok=True)
        return True

    def _send(self, path: Path, partial: str, size: int) -> None:
        """Write the file to ``partial``, from where an earlier try stopped when the store can append."""
        offset = self._policy.resume_at(size, self._size_of(partial))
        try:
            remote = self.fs.open(partial, "ab" if offset else "wb")
        except (NotImplementedError, ValueError):  # a store that cannot append: start again
            offset, remote = 0, self.fs.open(partial, "wb")
        if offset:
            log.info("recording upload continued", path=str(path), from_bytes=offset, bytes=size)
        with remote, path.open("rb") as local:
            local.seek(offset)
            while chunk := local.read(self._chunk_bytes):
                self._pace(len(chunk))
                remote.write(chunk)

    def _pace(self, n_bytes: int) -> None:
        """Wait for the bandwidth budget of ``n_bytes``; ``_Stopped`` when stopped meanwhile."""
        while (wait_s := self._throttle.wait_s(self._clock())) > 0:
            if self._stop.wait(min(WAKE_S, wait_s)):
                break
        if self._stop.is_set():
            raise _Stopped
        self._throttle.sent(n_bytes, self._clock())

    def _size_of(self, remote_path: str) -> int | None:
        try:
            return int(self.fs.size(remote_path))
        except FileNotFoundError:
            return None

    def _verified(self, stored: str, size: int, digest: str) -> bool:
        """Whether the store holds the file: same size, then the same SHA-256 when read back."""
        stored_bytes = self._size_of(stored)
        if stored_bytes is None or stored_bytes != size:
            return False
        sha = hashlib.sha256()
        with self.fs.open(stored, "rb") as remote:
            while chunk := remote.read(self._chunk_bytes):
                self._pace(len(chunk))
                sha.update(chunk)
        return self._policy.verified(size, digest, stored_bytes, sha.hexdigest())


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def _filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem and root path of ``url``; a configuration error when it cannot be used."""
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise ConfigurationError("record.upload_url needs fsspec: pip install 'cabin-monitor[record]'") from None
    try:
        fs, root = url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise ConfigurationError(f"record.upload_url {url}: {exc}") from None
    return fs, str(root)
