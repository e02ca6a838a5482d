"""Recordings read back: files, folders and globs to sessions, a session to its entries in order.

Local paths are read directly; a URL (``s3://``, ``gs://``, ``file://``, ...) goes through fsspec, imported
only when a URL is given.
"""

from __future__ import annotations

import contextlib
import glob
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cabin_monitor.errors import ConfigurationError
from cabin_monitor.record.format import METADATA_KEY, Entry, RecordingMeta, entries

SUFFIX = ".parquet"


class RecordingError(ConfigurationError):
    """A path that holds no usable recording."""


@dataclass(frozen=True, slots=True)
class RecordingFile:
    """One recording file and what it says about itself."""

    path: Path | str  # a local path, or a URL
    meta: RecordingMeta
    rows: int


@dataclass(frozen=True, slots=True)
class Session:
    """One daemon run of one vehicle: its files, in segment order."""

    vehicle_id: str
    session_id: str
    files: tuple[RecordingFile, ...]

    @property
    def rows(self) -> int:
        """Rows in all its files."""
        return sum(f.rows for f in self.files)

    def missing_segments(self) -> list[int]:
        """Segments between its first and last file that are not here (deleted by the cap, not uploaded)."""
        have = {f.meta.segment for f in self.files}
        return [n for n in range(min(have), max(have)) if n not in have]


def is_url(pattern: str) -> bool:
    """Whether ``pattern`` names a place through fsspec (``scheme://...``) rather than a local path."""
    return "://" in pattern


def expand(patterns: Sequence[str]) -> list[Path | str]:
    """Every recording file named by ``patterns``: files, folders (searched recursively) and globs, local or URLs."""
    found: list[Path | str] = []
    for pattern in patterns:
        if is_url(pattern):
            found += _expand_url(pattern)
            continue
        path = Path(pattern)
        if path.is_dir():
            found += sorted(path.rglob("*" + SUFFIX))
        elif path.is_file():
            found.append(path)
        else:
            matches = sorted(Path(m) for m in glob.glob(pattern, recursive=True))
            if not matches:
                raise RecordingError(f"{pattern}: no such file, folder or match")
            for match in matches:
                found += sorted(match.rglob("*" + SUFFIX)) if match.is_dir() else [match]
    unique = list(dict.fromkeys(p.resolve() if isinstance(p, Path) else p for p in found))
    if not unique:
        raise RecordingError(f"no recording files (*{SUFFIX}) in {', '.join(patterns)}")
    return unique


def _expand_url(pattern: str) -> list[Path | str]:
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise RecordingError(f"{pattern}: a URL needs fsspec: pip install 'cabin-monitor[fleet]'") from None
    try:
        fs, root = url_to_fs(pattern)
        if fs.isdir(root):
            matches = [root]
        elif fs.isfile(root):
            return [pattern]
        else:
            matches = sorted(fs.glob(root))
        found: list[Path | str] = []
        for match in matches:
            inner = sorted(p for p in fs.find(match) if p.endswith(SUFFIX)) if fs.isdir(match) else [match]
            found += [fs.unstrip_protocol(p) for p in inner]
    except (OSError, ValueError) as exc:
        raise RecordingError(f"{pattern}: cannot list ({exc})") from None
    if not found and not matches:
        raise RecordingError(f"{pattern}: no such file, folder or match")
    return found


def _readable(path: Path | str) -> Any:
    """What pyarrow reads: the path itself, or an open fsspec file (a context manager either way)."""
    if isinstance(path, Path):
        return contextlib.nullcontext(path)
    import fsspec

    return fsspec.open(path, "rb")


def open_file(path: Path | str) -> RecordingFile:
    """A recording file's metadata; ``RecordingError`` if it is not a readable recording."""
    try:
        with _readable(path) as source:
            metadata = pq.read_metadata(source)
    except (OSError, pa.ArrowException) as exc:
        raise RecordingError(f"{path}: not a readable Parquet file ({exc})") from None
    raw = (metadata.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise RecordingError(f"{path}: a Parquet file but not a cabin-monitor recording")
    try:
        meta = RecordingMeta.from_json(raw)
    except ValueError as exc:
        raise RecordingError(f"{path}: {exc}") from None
    return RecordingFile(path, meta, metadata.num_rows)


def sessions(files: Sequence[RecordingFile]) -> list[Session]:
    """The files grouped into sessions, each in segment order; sessions by vehicle, then by start."""
    grouped: dict[tuple[str, str], list[RecordingFile]] = {}
    for f in files:
        grouped.setdefault((f.meta.vehicle_id, f.meta.session_id), []).append(f)
    out = [
        Session(vehicle, session, tuple(sorted(group, key=lambda f: f.meta.segment)))
        for (vehicle, session), group in grouped.items()
    ]
    return sorted(out, key=lambda s: (s.vehicle_id, s.files[0].meta.opened_wall_time_s))


def read_entries(recording: RecordingFile) -> Iterator[Entry]:
    """The entries of one file, in order; ``RecordingError`` if its rows cannot be read."""
    try:
        with _readable(recording.path) as source:
            table = pq.read_table(source)
    except (OSError, pa.ArrowException) as exc:
        raise RecordingError(f"{recording.path}: rows unreadable ({exc})") from None
    try:
        yield from entries(table, recording.meta.class_names)
    except (KeyError, ValueError) as exc:
        raise RecordingError(f"{recording.path}: not a recording table ({exc})") from None


def session_items(session: Session) -> Iterator[RecordingMeta | Entry]:
    """Each file's metadata followed by its entries, file after file: the input of ``replay.replay_session``."""
    for f in session.files:
        yield f.meta
        yield from read_entries(f)
