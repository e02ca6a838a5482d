"""How recordings leave the vehicle: pure decisions (which files, where to resume, how long to wait, whether an
upload verified); ``runtime.uploader`` does the I/O on its own thread."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cabin_monitor.record.policy import FileInfo

SUFFIX = ".parquet"  # finished files only: one being written ends in .parquet.partial
TEMPORARY_SUFFIX = ".partial"  # an upload in progress, renamed once complete


@dataclass(frozen=True, slots=True)
class UploadPolicy:
    """Retry timing and the choices made around one file's upload."""

    retry_min_s: float
    retry_max_s: float

    def backoff_s(self, failures: int, draw: float) -> float:
        """The wait after ``failures`` failures in a row: full jitter (``draw`` in [0, 1)) over a doubling cap."""
        cap = min(self.retry_max_s, self.retry_min_s * 2.0 ** max(0, failures - 1))
        return draw * cap

    @staticmethod
    def pending(files: Sequence[FileInfo]) -> list[FileInfo]:
        """The finished recording files, oldest first (as the cap would delete them)."""
        return sorted((f for f in files if f.name.endswith(SUFFIX)), key=lambda f: (f.mtime_s, f.name))

    @staticmethod
    def resume_at(local_bytes: int, uploaded_bytes: int | None) -> int:
        """Where to continue a file of which ``uploaded_bytes`` reached the store's temporary copy (None: no
        copy): its end, unless there is nothing to keep or the copy is longer than the file."""
        if uploaded_bytes is None or uploaded_bytes > local_bytes:
            return 0
        return uploaded_bytes

    @staticmethod
    def verified(local_bytes: int, local_sha256: str, stored_bytes: int, stored_sha256: str | None) -> bool:
        """Whether the stored copy is the file: the same size and the same SHA-256."""
        return stored_bytes == local_bytes and stored_sha256 == local_sha256


class Throttle:
    """Spaces writes so that at most ``max_bytes_per_s`` pass on average (a burst of one write is allowed)."""

    def __init__(self, max_bytes_per_s: float) -> None:
        self.max_bytes_per_s = max_bytes_per_s
        self._free_at_s: float | None = None  # when the bytes already sent have been paid for

    def wait_s(self, now_s: float) -> float:
        """How long to wait before the next write."""
        return 0.0 if self._free_at_s is None else max(0.0, self._free_at_s - now_s)

    def sent(self, n_bytes: int, now_s: float) -> None:
        """Count ``n_bytes`` written at ``now_s``."""
        start = now_s if self._free_at_s is None else max(self._free_at_s, now_s)
        self._free_at_s = start + n_bytes / self.max_bytes_per_s
