"""The recorder: the rules engine's inputs and events, written to rotated Parquet files on a thread of its own.

The inference thread turns each frame into a compact, pixel-free ``FrameSample`` and puts it into a
bounded queue without waiting: when the writer falls behind (a slow or full disk) new frames are
dropped and counted, and inference goes on. The writer thread gathers rows, writes them a row group
at a time to ``<name>.parquet.partial`` and renames the file to ``<name>.parquet`` when it closes it
(by size or age, and at shutdown), so an uploader only ever sees finished files. After each file it
deletes the oldest files beyond the folder's size cap. A write error is logged, the rows it held are
counted as lost, and writing starts again with a new file a few seconds later.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import structlog

from cabin_monitor.config import RecordConfig, RulesConfig
from cabin_monitor.messages import Event, FrameResult
from cabin_monitor.record.format import (
    CLOSE_METADATA_KEY,
    Closing,
    Entry,
    RecordingMeta,
    RowBuffer,
    RulesChange,
    frame_sample,
)
from cabin_monitor.record.policy import MB, FileInfo, RotationPolicy
from cabin_monitor.rules import OccupantState
from cabin_monitor.runtime.uploader import Uploader

log = structlog.get_logger("cabin_monitor.runtime.recorder")

SUFFIX = ".parquet"
PARTIAL_SUFFIX = ".parquet.partial"
RETRY_AFTER_S = 5.0
# Repeated strings are stored once per row group; every other column is encoded for numbers.
DICTIONARY_COLUMNS = [
    "kind",
    "occupant_id",
    "seat",
    "event_type",
    "event_phase",
    "event_rule",
    "event_severity",
    "rules_json",
]
_STOP = object()


class Recorder:
    """Writes the entries handed to it into rotated recording files; ``record_*`` never block."""

    def __init__(
        self,
        cfg: RecordConfig,
        meta: RecordingMeta,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        uploader: Uploader | None = None,
    ) -> None:
        """``meta``: the session's description (its ``segment`` and ``opened_wall_time_s`` are set per file);
        ``uploader``: sends the finished files away (started and stopped with the recorder)."""
        if cfg.dir is None:
            raise ValueError("Recorder needs record.dir")
        self.folder = cfg.dir
        self._policy = RotationPolicy(int(cfg.max_file_mb * MB), cfg.max_file_age_s, int(cfg.max_total_mb * MB))
        self._row_group_rows = cfg.row_group_rows
        self._queue: queue.Queue[object] = queue.Queue(cfg.queue_max_frames)
        self._meta = meta
        self._class_names = meta.class_names
        self._clock = clock
        self._wall = wall_clock
        self._buffer = RowBuffer(meta.class_names)
        self._writer: pq.ParquetWriter | None = None
        self._partial: Path | None = None
        self._segment = 0
        self._segment_started_s: float | None = None  # when the file being gathered got its first row
        self._segment_rules = meta.rules  # the rules in force at that row
        self._file_rows = 0
        self._retry_at_s: float | None = None  # after a write error: no new file before this
        self._thread: threading.Thread | None = None
        self._uploader = uploader
        self.dropped_frames = 0  # not queued: the writer was behind (counted by the inference thread)
        self.lost_rows = 0  # queued but never written: write errors
        self.files_written = 0

    # -- the inference thread's side --------------------------------------------------

    def record_frame(self, result: FrameResult, occupants: Sequence[OccupantState]) -> None:
        """Queue one frame's sample; dropped (and counted) when the writer is behind."""
        self._offer(frame_sample(result, occupants, self._class_names))

    def record_rules(self, rules: RulesConfig, capture_s: float, wall_time_s: float) -> None:
        """Queue a rules change."""
        self._offer(RulesChange(capture_s, wall_time_s, rules))

    def record_close(self, events: Sequence[Event], capture_s: float, wall_time_s: float) -> None:
        """Queue the shutdown's forced ends; waits briefly for room, as the engine is done by then."""
        try:
            self._queue.put(Closing(capture_s, wall_time_s, tuple(events)), timeout=1.0)
        except queue.Full:
            self._count_drop()

    def _offer(self, entry: Entry) -> None:
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self._count_drop()

    def _count_drop(self) -> None:
        self.dropped_frames += 1
        if self.dropped_frames == 1 or self.dropped_frames % 1000 == 0:
            log.warning("recorder behind; frames dropped from the recording", dropped_total=self.dropped_frames)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Create the folder, clear what a crash left, and start the writer thread."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for leftover in sorted(self.folder.glob("*" + PARTIAL_SUFFIX)):
            # An unfinished file has no Parquet footer and cannot be read: a crash or power loss.
            log.warning("unfinished recording file from an earlier run deleted", path=str(leftover))
            leftover.unlink(missing_ok=True)
        self._enforce_cap()
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._thread.start()
        if self._uploader is not None:
            self._uploader.start()
        log.info("recording", folder=str(self.folder), session_id=self._meta.session_id)

    def stop(self, timeout_s: float) -> None:
        """Write what is queued, close the file and join the thread (up to ``timeout_s``)."""
        if self._thread is None:
            return
        try:
            self._queue.put(_STOP, timeout=timeout_s)
        except queue.Full:
            log.error("recorder queue still full at stop; the last frames are not recorded")
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("recorder did not stop in time", timeout_s=timeout_s)
        if self._uploader is not None:
            self._uploader.stop(timeout_s)
        log.info(
            "recording stopped",
            files=self.files_written,
            dropped_frames=self.dropped_frames,
            lost_rows=self.lost_rows,
        )

    # -- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                try:
                    item = self._queue.get(timeout=0.5)
                except queue.Empty:
                    item = None
                if item is _STOP:
                    break
                now = self._clock()
                if item is not None:
                    self._add(item, now)  # type: ignore[arg-type]
                if len(self._buffer) >= self._row_group_rows:
                    self._flush(now)
                started = self._segment_started_s
                if started is not None and self._policy.should_rotate(self._file_bytes(), started, now):
                    self._flush(now)
                    self._close_file()
            self._flush(self._clock())
            self._close_file()
        except Exception as exc:  # the recorder must never take the daemon down
            log.exception("recorder failed; recording stops", error=repr(exc))
            self._abandon_file()

    def _add(self, entry: Entry, now: float) -> None:
        if self._segment_started_s is None:
            self._segment_started_s = now
            self._segment_rules = self._meta.rules  # the file describes the rules its first row was judged by
        if isinstance(entry, RulesChange):
            self._meta = _with(self._meta, rules=entry.rules)  # the next file says which rules were in force
        self._buffer.add(entry)

    def _flush(self, now: float) -> None:
        if not len(self._buffer):
            return
        if self._retry_at_s is not None and now < self._retry_at_s:
            self._lose_buffer()
            return
        try:
            if self._writer is None:
                self._open_file()
            assert self._writer is not None
            self._writer.write_table(self._buffer.table())
        except (OSError, pa.ArrowException) as exc:
            log.error(
                "recording write failed; rows lost, retrying with a new file",
                error=str(exc),
                rows=len(self._buffer),
                retry_in_s=RETRY_AFTER_S,
            )
            self._lose_buffer()
            self._abandon_file()
            self._retry_at_s = now + RETRY_AFTER_S
            return
        if self._retry_at_s is not None:
            log.info("recording writes again", lost_rows_total=self.lost_rows)
            self._retry_at_s = None
        self._file_rows += len(self._buffer)
        self._buffer.clear()

    def _lose_buffer(self) -> None:
        self.lost_rows += len(self._buffer)
        self._buffer.clear()

    def _open_file(self) -> None:
        wall = self._wall()
        self._meta = _with(self._meta, segment=self._segment, opened_wall_time_s=wall)
        file_meta = _with(self._meta, rules=self._segment_rules)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(wall))
        name = f"{self._meta.vehicle_id}-{stamp}-{self._meta.session_id[:8]}-{self._segment:05d}"
        self._partial = self.folder / (name + PARTIAL_SUFFIX)
        self._writer = pq.ParquetWriter(
            self._partial,
            self._buffer.table(file_meta).schema,
            compression="zstd",
            use_dictionary=DICTIONARY_COLUMNS,
            use_byte_stream_split=_float_columns(self._class_names),
            column_encoding={"frame_id": "DELTA_BINARY_PACKED"},
        )
        self._segment += 1
        self._file_rows = 0

    def _file_bytes(self) -> int:
        try:
            return self._partial.stat().st_size if self._partial is not None else 0
        except OSError:
            return 0

    def _close_file(self) -> None:
        writer, partial = self._writer, self._partial
        self._segment_started_s = None
        if writer is None or partial is None:
            return
        try:
            writer.add_key_value_metadata(
                {
                    CLOSE_METADATA_KEY: json.dumps(
                        {
                            "rows": self._file_rows,
                            "closed_wall_time_s": self._wall(),
                            "dropped_frames_total": self.dropped_frames,
                            "lost_rows_total": self.lost_rows,
                        }
                    )
                }
            )
            writer.close()
            final = partial.with_name(partial.name.removesuffix(PARTIAL_SUFFIX) + SUFFIX)
            partial.rename(final)
        except (OSError, pa.ArrowException) as exc:
            log.error("recording file could not be finished; its rows are lost", path=str(partial), error=str(exc))
            self.lost_rows += self._file_rows
            self._abandon_file()
            return
        self._writer = self._partial = None
        self.files_written += 1
        log.info("recording file closed", path=str(final), rows=self._file_rows, bytes=final.stat().st_size)
        self._enforce_cap()
        if self._uploader is not None:
            self._uploader.wake()

    def _abandon_file(self) -> None:
        writer, partial = self._writer, self._partial
        self._writer = self._partial = None
        self._segment_started_s = None
        if writer is not None:
            with contextlib.suppress(OSError, pa.ArrowException):
                writer.close()
        if partial is not None:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)

    def _enforce_cap(self) -> None:
        try:
            files = [
                FileInfo(p.name, st.st_size, st.st_mtime)
                for p in self.folder.glob("*" + SUFFIX)
                if p.is_file() and (st := p.stat())
            ]
            for doomed in self._policy.over_cap(files):
                (self.folder / doomed.name).unlink(missing_ok=True)
                log.warning(
                    "recording folder over its cap; oldest file deleted",
                    path=str(self.folder / doomed.name),
                    bytes=doomed.size_bytes,
                    max_total_mb=self._policy.max_total_bytes / MB,
                )
        except OSError as exc:
            log.error("recording folder cap not enforced", folder=str(self.folder), error=str(exc))


def _with(meta: RecordingMeta, **changes: object) -> RecordingMeta:
    return replace(meta, **changes)  # type: ignore[arg-type]


def _float_columns(class_names: Sequence[str]) -> list[str]:
    # Byte-stream split lets zstd see the slowly changing exponent bytes of neighbouring values.
    return [
        "capture_s",
        "wall_time_s",
        "media_s",
        "event_score",
        "event_started_wall_time_s",
        "face_w_px",
        "face_h_px",
        "face_score",
        *(f"p_{name}" for name in class_names),
        *(f"s_{name}" for name in class_names),
    ]
