"""When a recording file is closed and which old files go: pure decisions, the writer thread acts on them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MB = 1_000_000


@dataclass(frozen=True, slots=True)
class RotationPolicy:
    """A file is closed once it is big or old enough; the folder is kept under a total size."""

    max_file_bytes: int
    max_file_age_s: float
    max_total_bytes: int

    def should_rotate(self, file_bytes: int, opened_s: float, now_s: float) -> bool:
        """Whether the open file (``file_bytes`` on disk, opened at monotonic ``opened_s``) is to be closed now."""
        return file_bytes >= self.max_file_bytes or now_s - opened_s >= self.max_file_age_s

    def over_cap(self, files: Sequence[FileInfo]) -> list[FileInfo]:
        """The closed files to delete, oldest first, so that they and one more file fit under the cap.

        Room for one more file is kept so that the folder, the file being written included, never
        holds more than ``max_total_bytes``.
        """
        budget = self.max_total_bytes - self.max_file_bytes
        total = sum(f.size_bytes for f in files)
        doomed = []
        for f in sorted(files, key=lambda f: (f.mtime_s, f.name)):
            if total <= budget:
                break
            doomed.append(f)
            total -= f.size_bytes
        return doomed


@dataclass(frozen=True, slots=True)
class FileInfo:
    """A closed recording file in the folder."""

    name: str
    size_bytes: int
    mtime_s: float  # modification time, UTC epoch seconds
