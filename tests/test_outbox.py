"""The durable event outbox: order, acknowledgement, bounds, expiry, persistence, and real filesystem faults."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cabin_monitor.bus.facts import EventFacts
from cabin_monitor.bus.fallback import FallbackFile, KeptEvent
from cabin_monitor.bus.outbox import (
    SEVERITY_RANK,
    Outbox,
    OutboxContentError,
    OutboxError,
    open_outbox,
)
from cabin_monitor.bus.payloads import event_payload
from cabin_monitor.messages import Event, Phase
from tests.support.helpers import make_event
from tests.support.mounts import fill, pin_wal, read_only_bind, remount, tmpfs

NOW = time.time()
DAY_S = 86400.0  # a maximum age no event put at NOW reaches, however long the suite has run
DATA = Path(__file__).parent / "data"
FOREVER_S = 1e10  # the events stored in DATA are from 2023: never expire them here


def put(outbox: Outbox, event_id: str, severity: str = "warning", created_wall_s: float = NOW) -> list[str]:
    """Put an event; returns the ids of the events dropped."""
    dropped = outbox.put(event_id, "cabin/car-1/events", f'{{"id":"{event_id}"}}'.encode(), severity, created_wall_s)
    return [d.event_id for d in dropped]


def state_of(outbox: Outbox) -> str:
    """The outbox's state, read afresh (a plain str, so that type checkers do not narrow it between reads)."""
    return outbox.state


def ids(outbox: Outbox) -> list[str]:
    return [item.event_id for item in outbox.pending(1000)]


def test_pending_in_insertion_order(tmp_path: Path) -> None:
    """pending() returns events oldest first, with their bytes, topic and severity."""
    with Outbox(tmp_path / "outbox.sqlite") as outbox:
        for i, severity in enumerate(["info", "critical", "warning"]):
            put(outbox, f"e{i}", severity)
        items = outbox.pending(10)
        assert [i.event_id for i in items] == ["e0", "e1", "e2"]
        assert [i.severity for i in items] == ["info", "critical", "warning"]
        assert items[1].payload == b'{"id":"e1"}' and items[1].topic == "cabin/car-1/events"
        assert [i.event_id for i in outbox.pending(2)] == ["e0", "e1"]
        assert [i.event_id for i in outbox.pending(10, after_row_id=items[0].row_id)] == ["e1", "e2"]


def test_ack_removes_only_that_event(tmp_path: Path) -> None:
    """ack() removes one row; acking it again reports False."""
    with Outbox(tmp_path / "outbox.sqlite") as outbox:
        for i in range(3):
            put(outbox, f"e{i}")
        middle = outbox.pending(10)[1]
        assert outbox.ack(middle.row_id)
        assert not outbox.ack(middle.row_id)
        assert ids(outbox) == ["e0", "e2"]
        assert outbox.depth() == 2


def test_row_ids_never_reused(tmp_path: Path) -> None:
    """After the newest row is acknowledged, the next event still gets a larger row id."""
    with Outbox(tmp_path / "outbox.sqlite") as outbox:
        put(outbox, "e0")
        first = outbox.pending(1)[0]
        outbox.ack(first.row_id)
        put(outbox, "e1")
        assert outbox.pending(1, after_row_id=first.row_id)[0].event_id == "e1"


def test_put_is_idempotent(tmp_path: Path) -> None:
    """Putting the same event_id twice keeps one copy in its first place."""
    with Outbox(tmp_path / "outbox.sqlite") as outbox:
        put(outbox, "a")
        put(outbox, "b")
        assert put(outbox, "a") == []
        assert ids(outbox) == ["a", "b"]


def test_eviction_lowest_severity_then_oldest(tmp_path: Path) -> None:
    """When full, the oldest event of the lowest severity held goes first, and is counted."""
    with Outbox(tmp_path / "outbox.sqlite", max_events=4) as outbox:
        put(outbox, "w1", "warning")
        put(outbox, "i1", "info")
        put(outbox, "c1", "critical")
        put(outbox, "i2", "info")
        assert put(outbox, "w2", "warning") == ["i1"]
        assert put(outbox, "c2", "critical") == ["i2"]
        assert put(outbox, "w3", "warning") == ["w1"]
        assert ids(outbox) == ["c1", "w2", "c2", "w3"]
        assert outbox.dropped_by_reason == {"full": 3, "expired": 0, "memory_full": 0}
        assert outbox.dropped_total == 3


def test_full_of_more_severe_events_refuses_newcomer(tmp_path: Path) -> None:
    """An info event is refused (and counted) rather than evicting a critical one."""
    with Outbox(tmp_path / "outbox.sqlite", max_events=2) as outbox:
        put(outbox, "c1", "critical")
        put(outbox, "c2", "critical")
        dropped = outbox.put("i1", "t", b"{}", "info", NOW)
        assert [(d.event_id, d.reason, d.severity) for d in dropped] == [("i1", "full", "info")]
        assert ids(outbox) == ["c1", "c2"]


def test_unknown_severity_rejected(tmp_path: Path) -> None:
    """Severity must be info, warning or critical."""
    with Outbox(tmp_path / "outbox.sqlite") as outbox, pytest.raises(ValueError, match="severity"):
        put(outbox, "x", "urgent")


def test_expiry(tmp_path: Path) -> None:
    """Events older than max_age_s are dropped, reported and counted; an already-old event is refused."""
    now = time.time()  # not the import-time NOW: put() compares with the real clock
    with Outbox(tmp_path / "outbox.sqlite", max_age_s=60) as outbox:
        put(outbox, "old", created_wall_s=now - 30)
        put(outbox, "new", created_wall_s=now)
        dropped = outbox.expire(now_wall_s=now + 45)
        assert [(d.event_id, d.reason) for d in dropped] == [("old", "expired")]
        assert ids(outbox) == ["new"]
        assert put(outbox, "ancient", created_wall_s=now - 3600) == ["ancient"]
        assert outbox.dropped_by_reason == {"full": 0, "expired": 2, "memory_full": 0}


def test_persists_across_reopen(tmp_path: Path) -> None:
    """A new Outbox on the same file sees what was pending, in order, without acked rows."""
    path = tmp_path / "state" / "outbox.sqlite"
    outbox = Outbox(path)
    for i in range(3):
        put(outbox, f"e{i}")
    outbox.ack(outbox.pending(1)[0].row_id)
    outbox.close()
    with Outbox(path) as reopened:
        assert ids(reopened) == ["e1", "e2"]


def test_not_a_database(tmp_path: Path) -> None:
    """A file that is not SQLite gives an OutboxError naming the path."""
    path = tmp_path / "outbox.sqlite"
    path.write_bytes(b"this is not a database, just some text that is long enough" * 100)
    with pytest.raises(OutboxContentError, match="not a usable SQLite outbox") as info:
        Outbox(path)
    assert str(path) in str(info.value)
    assert info.value.path == path


def test_unopenable_path(tmp_path: Path) -> None:
    """A path that cannot be a database file (a folder) gives an OutboxError naming it."""
    with pytest.raises(OutboxError, match=str(tmp_path)) as info:
        Outbox(tmp_path)
    assert not isinstance(info.value, OutboxContentError)


def test_open_outbox_moves_a_damaged_file_aside(tmp_path: Path) -> None:
    """open_outbox moves a file that is not SQLite aside and starts an empty outbox in its place."""
    path = tmp_path / "outbox.sqlite"
    path.write_bytes(b"not a database" * 500)
    outbox, aside = open_outbox(path, max_events=10, max_age_s=60.0)
    with outbox:
        assert outbox.pending(limit=10) == []
    assert aside is not None and aside.moved_to.read_bytes() == b"not a database" * 500
    assert "not a database" in aside.reason


def test_open_outbox_refuses_an_unopenable_path(tmp_path: Path) -> None:
    """open_outbox leaves a path problem to the caller instead of moving anything."""
    with pytest.raises(OutboxError):
        open_outbox(tmp_path, max_events=10, max_age_s=60.0)
    assert tmp_path.is_dir()


def test_concurrent_put_and_ack(tmp_path: Path) -> None:
    """A putting thread and an acking thread share the outbox without errors or losses."""
    with Outbox(tmp_path / "outbox.sqlite") as outbox:
        acked: list[str] = []
        done = threading.Event()

        def producer() -> None:
            for i in range(200):
                put(outbox, f"e{i:03}")
            done.set()

        thread = threading.Thread(target=producer)
        thread.start()
        deadline = time.monotonic() + 30
        while (not done.is_set() or outbox.depth()) and time.monotonic() < deadline:
            for item in outbox.pending(10):
                assert outbox.ack(item.row_id)
                acked.append(item.event_id)
        thread.join(10)
        assert acked == [f"e{i:03}" for i in range(200)]


@settings(max_examples=60, deadline=None)
@given(severities=st.lists(st.sampled_from(sorted(SEVERITY_RANK)), max_size=25), max_events=st.integers(1, 6))
def test_eviction_matches_reference(
    tmp_path_factory: pytest.TempPathFactory, severities: list[str], max_events: int
) -> None:
    """Whatever the sequence, the outbox keeps what a plain list evicting lowest-severity-oldest keeps."""
    kept: list[tuple[str, str]] = []
    dropped = 0
    with Outbox(tmp_path_factory.mktemp("prop") / "outbox.sqlite", max_events=max_events) as outbox:
        for i, severity in enumerate(severities):
            put(outbox, f"e{i}", severity)
            if len(kept) < max_events:
                kept.append((f"e{i}", severity))
                continue
            dropped += 1
            victim = min(kept, key=lambda e: SEVERITY_RANK[e[1]])
            if SEVERITY_RANK[severity] >= SEVERITY_RANK[victim[1]]:
                kept.remove(victim)
                kept.append((f"e{i}", severity))
        assert ids(outbox) == [e for e, _ in kept]
        assert outbox.dropped_total == dropped


def test_outbox_files_are_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    """The database and its WAL and shared-memory files are mode 0600 even under umask 000."""
    old = os.umask(0)
    try:
        with Outbox(tmp_path / "outbox.sqlite") as outbox:
            put(outbox, "e1")
            files = sorted(tmp_path.glob("outbox.sqlite*"))
            assert {f.name for f in files} >= {"outbox.sqlite", "outbox.sqlite-wal", "outbox.sqlite-shm"}
            assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o600}
    finally:
        os.umask(old)


def test_an_existing_outbox_is_made_owner_only(tmp_path: Path) -> None:
    """An outbox file left world-readable by an older install is narrowed to 0600 when opened."""
    path = tmp_path / "outbox.sqlite"
    Outbox(path).close()
    path.chmod(0o644)
    Outbox(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_open_outbox_moves_a_malformed_database_aside_with_the_reason(tmp_path: Path) -> None:
    """A real outbox whose pages were overwritten is set aside with SQLite's reason, and an empty one started."""
    path = tmp_path / "outbox.sqlite"
    with Outbox(path) as outbox:
        for i in range(50):
            put(outbox, f"e{i}")
    data = bytearray(path.read_bytes())
    data[4096 : 4096 * 3] = b"\xa5" * 8192  # pages 2 and 3: tables and indexes
    path.write_bytes(bytes(data))
    outbox, aside = open_outbox(path, max_events=100, max_age_s=60.0)
    with outbox:
        assert outbox.depth() == 0
    assert aside is not None and aside.moved_to.exists()
    assert "malformed" in aside.reason or "damaged" in aside.reason


def test_full_disk_holds_events_in_memory_and_writes_them_in_order_later(tmp_path: Path) -> None:
    """On a full tmpfs put() keeps accepting: events wait in memory (disk_full) and reach the file, in order."""
    with tmpfs(tmp_path / "state", 256) as state:
        with Outbox(state / "outbox.sqlite") as outbox:
            put(outbox, "e0")
            filler = fill(state)
            accepted = ["e0"]
            while state_of(outbox) == "ok" and len(accepted) < 500:
                accepted.append(f"e{len(accepted)}")
                assert put(outbox, accepted[-1]) == []
            assert state_of(outbox) == "disk_full", "the full tmpfs never refused a write"
            for _ in range(5):
                accepted.append(f"e{len(accepted)}")
                assert put(outbox, accepted[-1]) == []
            assert outbox.memory_depth >= 5 and outbox.depth() == len(accepted)
            assert outbox.write_error is not None and "full" in outbox.write_error
            assert outbox.retry_writes() == [] and state_of(outbox) == "disk_full"
            filler.unlink()
            assert outbox.retry_writes() == []
            assert (state_of(outbox), outbox.memory_depth) == ("ok", 0)
            assert ids(outbox) == accepted
        with Outbox(state / "outbox.sqlite") as reopened:
            assert ids(reopened) == accepted


def test_memory_queue_is_bounded_by_severity_while_the_disk_is_full(tmp_path: Path) -> None:
    """With the disk full at most memory_max_events wait in memory; low severity goes first, counted."""
    with tmpfs(tmp_path / "state", 1024) as state, Outbox(state / "outbox.sqlite", memory_max_events=3) as outbox:
        put(outbox, "w0", "warning")
        with pin_wal(outbox.path):
            filler = fill(state)
            assert put(outbox, "w1", "warning") == []
            assert state_of(outbox) == "disk_full"
            assert put(outbox, "i1", "info") == [] and put(outbox, "c1", "critical") == []
            assert put(outbox, "w2", "warning") == ["i1"]
            assert put(outbox, "i2", "info") == ["i2"]
            assert outbox.dropped_by_reason == {"full": 0, "expired": 0, "memory_full": 2}
            assert outbox.depth() == 4 and ids(outbox) == ["w0", "w1", "c1", "w2"]
            filler.unlink()
        assert put(outbox, "c2", "critical") == []
        assert ids(outbox) == ["w0", "w1", "c1", "w2", "c2"] and state_of(outbox) == "ok"


def put_until_held(outbox: Outbox, prefix: str) -> list[str]:
    """On a filled disk, put events until one is held in memory (the WAL may take the first few); returns them all."""
    accepted: list[str] = []
    while outbox.memory_depth == 0 and len(accepted) < 500:
        accepted.append(f"{prefix}{len(accepted)}")
        assert put(outbox, accepted[-1]) == []
    assert state_of(outbox) == "disk_full", "the full tmpfs never refused a write"
    return accepted


def fill_and_hold(outbox: Outbox, state: Path, more: int) -> tuple[Path, list[str]]:
    """Fill the disk, put events until one is held in memory, then ``more`` (all held); returns the filler and
    the events put."""
    filler = fill(state)
    accepted = put_until_held(outbox, "e")
    for i in range(more):
        accepted.append(f"m{i}")
        assert put(outbox, accepted[-1]) == []
    return filler, accepted


def test_events_in_memory_are_handed_out_after_the_disk_rows_and_forgotten_once_acked(tmp_path: Path) -> None:
    """While the disk is full pending() gives disk rows then memory ones; an acked one is never written later."""
    with tmpfs(tmp_path / "state", 1024) as state:
        with Outbox(state / "outbox.sqlite") as outbox:
            put(outbox, "d0")
            with pin_wal(outbox.path):
                filler, accepted = fill_and_hold(outbox, state, more=4)
                accepted = ["d0", *accepted]
                held = accepted[-5:]
                assert outbox.memory_event_ids == held and state_of(outbox) == "disk_full"
                items = outbox.pending(1000)
                assert [i.event_id for i in items] == accepted
                assert [i.row_id for i in items] == sorted({i.row_id for i in items}), "row ids follow acceptance"
                assert items[-1].payload == b'{"id":"m3"}' and items[-1].severity == "warning"
                row = {i.event_id: i.row_id for i in items}
                assert [i.event_id for i in outbox.pending(2, after_row_id=row[accepted[-6]])] == held[:2]
                assert outbox.ack(row[held[1]]) and not outbox.ack(row[held[1]])
                assert outbox.ack(row[held[4]])  # the newest: its row id is still never given again
                kept = [*accepted[:-5], held[0], held[2], held[3]]
                assert ids(outbox) == kept and outbox.depth() == len(kept)
                assert [i.event_id for i in outbox.pending(10, after_row_id=row[held[0]])] == held[2:4]
                assert outbox.retry_writes() == [] and state_of(outbox) == "disk_full"
                assert outbox.memory_event_ids == [held[0], held[2], held[3]]
                filler.unlink()
            assert outbox.retry_writes() == [] and (state_of(outbox), outbox.memory_depth) == ("ok", 0)
            assert [(i.event_id, i.row_id) for i in outbox.pending(1000)] == [(e, row[e]) for e in kept]
            put(outbox, "late")
            assert [i.event_id for i in outbox.pending(10, after_row_id=row[held[4]])] == ["late"]
        with Outbox(state / "outbox.sqlite") as reopened:
            assert ids(reopened) == [*kept, "late"]


def test_a_full_disk_reads_ok_only_once_a_write_works_again(tmp_path: Path) -> None:
    """With every held event acked from memory, state stays disk_full until a probe write fits again."""
    with tmpfs(tmp_path / "state", 1024) as state, Outbox(state / "outbox.sqlite") as outbox:
        with pin_wal(outbox.path):
            filler = fill(state)
            accepted = put_until_held(outbox, "e")
            assert outbox.ack(outbox.pending(1000)[-1].row_id) and outbox.memory_depth == 0
            assert outbox.retry_writes() == [] and state_of(outbox) == "disk_full"
            filler.unlink()
        assert outbox.retry_writes() == [] and state_of(outbox) == "ok"
        assert ids(outbox) == accepted[:-1]


def test_events_dropped_from_memory_are_not_handed_out_and_their_late_acks_ignored(tmp_path: Path) -> None:
    """A memory-held event that expires or is evicted leaves pending() at once; acking it afterwards is False."""
    now = time.time()
    with (
        tmpfs(tmp_path / "state", 1024) as state,
        Outbox(state / "outbox.sqlite", max_age_s=3600.0, memory_max_events=3) as outbox,
    ):
        with pin_wal(outbox.path):
            filler = fill(state)
            accepted = put_until_held(outbox, "w")
            put(outbox, "old", created_wall_s=now - 3000.0)
            put(outbox, "info", "info")
            row = {i.event_id: i.row_id for i in outbox.pending(1000)}
            assert list(row) == [*accepted, "old", "info"]
            assert put(outbox, "crit", "critical") == ["info"]
            assert not outbox.ack(row["info"])
            assert [d.event_id for d in outbox.expire(now_wall_s=now + 700.0)] == ["old"]
            assert not outbox.ack(row["old"])
            assert ids(outbox) == [*accepted, "crit"]
            assert outbox.dropped_by_reason == {"full": 0, "expired": 1, "memory_full": 1}
            filler.unlink()
        assert outbox.retry_writes() == [] and ids(outbox) == [*accepted, "crit"]


def test_a_delete_that_cannot_be_written_is_retried_and_the_row_not_sent_again(tmp_path: Path) -> None:
    """ack() on a full disk succeeds for the caller: pending() skips the row, and the delete lands later."""
    with tmpfs(tmp_path / "state", 1024) as state:
        with Outbox(state / "outbox.sqlite") as outbox:
            for i in range(40):
                put(outbox, f"e{i}")
            with pin_wal(outbox.path):
                filler = fill(state)
                # The WAL file has room left from before; deletes fit until it must grow.
                acked = 0
                while state_of(outbox) == "ok" and acked < 40:
                    assert outbox.ack(outbox.pending(1)[0].row_id)
                    acked += 1
                assert state_of(outbox) == "disk_full", "no delete ever failed on the full tmpfs"
                failed = outbox.pending(40, after_row_id=0)
                assert [i.event_id for i in failed] == [f"e{i}" for i in range(acked, 40)]
                assert outbox.depth() == 40 - acked
                assert outbox.retry_writes() == [] and state_of(outbox) == "disk_full"
                filler.unlink()
            assert outbox.retry_writes() == [] and state_of(outbox) == "ok"
        with Outbox(state / "outbox.sqlite") as reopened:
            assert ids(reopened) == [f"e{i}" for i in range(acked, 40)]


def test_a_read_only_folder_opens_reading_its_events_and_holding_new_ones(tmp_path: Path) -> None:
    """An outbox in a folder remounted read-only opens: its events are handed out, new ones held in memory (and the
    fallback file), acknowledgements wait; once writable again all of it is written and nothing was moved."""
    with tmpfs(tmp_path / "state", 1024) as state:
        path = state / "outbox.sqlite"
        with Outbox(path) as outbox:
            put(outbox, "e0")
            put(outbox, "e1")
        before = sorted(p.name for p in state.iterdir())
        remount(state, read_only=True)
        try:
            outbox, moved = open_outbox(path, 10, DAY_S, fallback=tmp_path / "run" / "held-events.sqlite")
            assert moved is None and state_of(outbox) == "unwritable" and "read-only" in (outbox.write_error or "")
            put(outbox, "e2")
            assert ids(outbox) == ["e0", "e1", "e2"] and outbox.memory_event_ids == ["e2"]
            assert outbox.ack(outbox.pending(1)[0].row_id) and ids(outbox) == ["e1", "e2"]
            assert outbox.retry_writes() == [] and state_of(outbox) == "unwritable"
        finally:
            remount(state, read_only=False)
        assert sorted(p.name for p in state.iterdir()) == before
        assert outbox.retry_writes() == [] and state_of(outbox) == "ok" and outbox.memory_depth == 0
        outbox.close()
        with Outbox(path) as reopened:
            assert ids(reopened) == ["e1", "e2"]


def test_a_full_disk_at_start_opens_reading_the_events_already_there(tmp_path: Path) -> None:
    """An outbox closed cleanly on a disk that is then filled opens (before: 'disk I/O error'), says disk_full and
    hands out its events; a new one waits in memory and is written, after them, once space is freed."""
    with tmpfs(tmp_path / "state", 256) as state:
        path = state / "outbox.sqlite"
        with Outbox(path) as outbox:
            for i in range(3):
                put(outbox, f"e{i}")
        filler = fill(state)
        with Outbox(path) as outbox:
            assert state_of(outbox) == "disk_full" and ids(outbox) == ["e0", "e1", "e2"]
            put(outbox, "e3")
            assert outbox.memory_event_ids == ["e3"] and ids(outbox) == ["e0", "e1", "e2", "e3"]
            filler.unlink()
            assert outbox.retry_writes() == [] and state_of(outbox) == "ok"
        with Outbox(path) as reopened:
            assert ids(reopened) == ["e0", "e1", "e2", "e3"]


def test_a_read_only_file_in_a_writable_folder_opens_and_is_never_moved_aside(tmp_path: Path) -> None:
    """An outbox file bind-mounted read-only opens for reading, never as 'damaged': its events are handed out."""
    path = tmp_path / "outbox.sqlite"
    with Outbox(path) as outbox:
        for i in range(62):
            put(outbox, f"e{i}")
    with read_only_bind(path):
        outbox, moved = open_outbox(path, max_events=100, max_age_s=DAY_S)
        assert moved is None and state_of(outbox) == "unwritable" and outbox.depth() == 62
        outbox.close()
    assert not list(tmp_path.glob("*unusable*"))
    with Outbox(path) as outbox:
        assert outbox.depth() == 62


def kept_ids(path: Path) -> list[str]:
    """The event ids a fallback file keeps, oldest first."""
    fallback = FallbackFile(path)
    try:
        return [event.event_id for event in fallback.events()]
    finally:
        fallback.close()


def test_events_left_in_a_fallback_file_are_taken_in_first_in_order_and_once(tmp_path: Path) -> None:
    """What an earlier process kept in the fallback file is written to the outbox file at open, oldest first,
    after the rows already there, an event the file holds already not twice; the fallback is emptied."""
    path, held = tmp_path / "outbox.sqlite", tmp_path / "run" / "held-events.sqlite"
    with Outbox(path) as outbox:
        put(outbox, "d0")
        put(outbox, "f1")
    fallback = FallbackFile(held)
    for event_id, rank in (("f1", 1), ("f2", 2), ("f3", 1)):
        fallback.add(KeptEvent(event_id, "cabin/car-1/events", f'{{"id":"{event_id}"}}'.encode(), rank, NOW))
    fallback.close()
    with Outbox(path, fallback=held) as outbox:
        assert outbox.restored_from_fallback == 3 and outbox.fallback_error is None
        items = outbox.pending(10)
        assert [i.event_id for i in items] == ["d0", "f1", "f2", "f3"]
        assert items[2].severity == "critical" and items[2].payload == b'{"id":"f2"}'
        assert kept_ids(held) == []
        put(outbox, "new")
        assert ids(outbox) == ["d0", "f1", "f2", "f3", "new"]
    with Outbox(path, fallback=held) as reopened:
        assert reopened.restored_from_fallback == 0 and ids(reopened) == ["d0", "f1", "f2", "f3", "new"]


def test_an_unusable_fallback_file_is_reported_and_the_outbox_works_without_it(tmp_path: Path) -> None:
    """A fallback path that cannot be opened (here a folder) is named in fallback_error; events still flow."""
    folder = tmp_path / "not-a-file"
    folder.mkdir()
    with Outbox(tmp_path / "outbox.sqlite", fallback=folder) as outbox:
        assert outbox.fallback_error is not None and str(folder) in outbox.fallback_error
        assert outbox.fallback_path is None
        put(outbox, "e0")
        assert ids(outbox) == ["e0"]


def test_events_held_in_memory_are_kept_in_the_fallback_file_and_survive_the_process(tmp_path: Path) -> None:
    """On a full disk each memory-held event is kept in the fallback file, forgotten there when acknowledged;
    a new outbox (the process gone, the disk still full, then freed) hands the rest out, in order, once."""
    held_path = tmp_path / "run" / "held-events.sqlite"
    with tmpfs(tmp_path / "state", 1024) as state:
        outbox = Outbox(state / "outbox.sqlite", fallback=held_path)
        put(outbox, "d0")
        with pin_wal(outbox.path):
            filler, accepted = fill_and_hold(outbox, state, more=3)
            accepted = ["d0", *accepted]
            memory = outbox.memory_event_ids
            assert len(memory) == 4 and kept_ids(held_path) == memory and outbox.unkept_event_ids == []
            row = {i.event_id: i.row_id for i in outbox.pending(1000)}
            assert outbox.ack(row[memory[1]])
            assert kept_ids(held_path) == [memory[0], *memory[2:]]
            outbox.close()  # the process ends: nothing of memory is written anywhere else
            with Outbox(state / "outbox.sqlite", fallback=held_path) as restarted:
                assert restarted.restored_from_fallback == 3 and state_of(restarted) == "disk_full"
                expected = [e for e in accepted if e != memory[1]]
                assert ids(restarted) == expected and restarted.memory_event_ids == [memory[0], *memory[2:]]
                filler.unlink()
                assert restarted.retry_writes() == [] and state_of(restarted) == "ok"
                assert kept_ids(held_path) == [] and ids(restarted) == expected
        with Outbox(state / "outbox.sqlite", fallback=held_path) as reopened:
            assert reopened.restored_from_fallback == 0 and ids(reopened) == expected


def put_event(outbox: Outbox, event: Event) -> None:
    """Put an event as the sink does: its payload with its facts."""
    payload = event_payload(event, "car-1").model_dump_json().encode()
    outbox.put(event.event_id, "cabin/car-1/events", payload, event.severity, event.wall_time_s, EventFacts.of(event))


def test_events_keep_their_facts_on_disk_across_a_reopen_and_through_the_fallback_file(tmp_path: Path) -> None:
    """Each item carries the facts it was put with: from the file, after reopening, and restored from a fallback."""
    start, end = make_event(Phase.START), make_event(Phase.END)
    path, held = tmp_path / "outbox.sqlite", tmp_path / "run" / "held-events.sqlite"
    with Outbox(path) as outbox:
        put_event(outbox, start)
        put(outbox, "not-an-event")
    kept = make_event(Phase.START, type="fatigue", seat=None)
    fallback = FallbackFile(held)
    fallback.add(KeptEvent(kept.event_id, "cabin/car-1/events", b"{}", 1, NOW, EventFacts.of(kept)))
    fallback.close()
    with Outbox(path, fallback=held) as outbox:
        put_event(outbox, end)
        facts = {item.event_id: item.facts for item in outbox.pending(10)}
    assert facts == {
        start.event_id: EventFacts.of(start),
        "not-an-event": None,
        kept.event_id: EventFacts.of(kept),
        end.event_id: EventFacts.of(end),
    }
    assert facts[end.event_id] == EventFacts("stress", Phase.END, "stress", "occupant-1", "driver", end.start_event_id)


def test_an_outbox_file_written_without_facts_columns_gets_them_and_its_rows_facts_from_their_payloads(
    tmp_path: Path,
) -> None:
    """A file of the outbox before facts were kept opens with its rows in order, their facts read from their
    payloads, and takes new events with their facts."""
    path = tmp_path / "outbox.sqlite"
    shutil.copyfile(DATA / "outbox-without-facts.sqlite", path)
    with Outbox(path, max_age_s=FOREVER_S) as outbox:
        items = outbox.pending(10)
        added = make_event(Phase.START)
        put_event(outbox, added)
        assert outbox.pending(1, after_row_id=items[-1].row_id)[0].facts == EventFacts.of(added)
    assert [i.facts.phase if i.facts else None for i in items] == [Phase.START, Phase.START, Phase.END, Phase.END, None]
    assert items[2].facts == EventFacts("stress", Phase.END, "stress", "occupant-1", "driver", items[1].event_id)
    with sqlite3.connect(path) as db:
        stored = db.execute("SELECT type, phase, start_event_id FROM outbox ORDER BY row_id").fetchall()
    assert stored[0] == (None, None, None) and stored[-1] == ("stress", "start", None)


def test_an_outbox_file_without_facts_columns_on_a_full_disk_opens_as_before(tmp_path: Path) -> None:
    """When the columns cannot be added (no space left) the file opens, its facts come from the payloads, new
    events wait in memory; the next open with space adds the columns."""
    with tmpfs(tmp_path / "state", 256) as state:
        path = state / "outbox.sqlite"
        shutil.copyfile(DATA / "outbox-without-facts.sqlite", path)
        # A WAL left by the process before (as after a crash): without one, no version opens a file there.
        with pin_wal(path):
            filler = fill(state)
            with Outbox(path, max_age_s=FOREVER_S) as outbox:
                assert [i.facts is not None for i in outbox.pending(10)] == [True, True, True, True, False]
                added = make_event(Phase.START)
                put_event(outbox, added)
                assert state_of(outbox) == "disk_full" and outbox.memory_event_ids == [added.event_id]
                assert outbox.pending(10)[-1].facts == EventFacts.of(added)
        filler.unlink()
        with Outbox(path, max_age_s=FOREVER_S) as reopened:
            assert len(reopened.pending(10)) == 5
        with sqlite3.connect(path) as db:
            assert "start_event_id" in {row[1] for row in db.execute("PRAGMA table_info(outbox)")}


def test_open_outbox_salvages_the_readable_rows_of_a_damaged_file(tmp_path: Path) -> None:
    """An outbox with a few pages overwritten is set aside and its readable rows go, in order, into the new one."""
    path = tmp_path / "outbox.sqlite"
    with Outbox(path, max_events=1000) as outbox:
        for i in range(400):
            outbox.put(f"e{i:03d}", "cabin/car-1/events", b"x" * 200, "warning", NOW)
    data = bytearray(path.read_bytes())
    pages = len(data) // 4096
    middle = pages // 2
    data[4096 * middle : 4096 * (middle + 2)] = b"\xa5" * 8192
    path.write_bytes(bytes(data))
    outbox, aside = open_outbox(path, max_events=1000, max_age_s=DAY_S)
    with outbox:
        salvaged = ids(outbox)
    print(f"\n{pages} pages, 2 overwritten: {len(salvaged)} of 400 rows salvaged")
    assert aside is not None and aside.moved_to.exists() and aside.salvaged == len(salvaged)
    assert 300 < len(salvaged) < 400 and salvaged == sorted(salvaged)
    assert set(salvaged) <= {f"e{i:03d}" for i in range(400)}


def unpaired_ends(outbox: Outbox, delivered_starts: set[str]) -> list[str]:
    """Pending ends whose start is neither pending nor delivered: ends of nothing the receiver has."""
    items = outbox.pending(1000)
    pending_starts = {i.event_id for i in items if i.facts is not None and i.facts.phase is Phase.START}
    return [
        i.event_id
        for i in items
        if i.facts is not None
        and i.facts.phase is Phase.END
        and i.facts.start_event_id not in pending_starts | delivered_starts
    ]


def test_eviction_keeps_a_start_and_its_end_together_and_counts_per_type(tmp_path: Path) -> None:
    """A full outbox evicts a start with its end, refuses the end of an evicted start, keeps the end of a delivered
    start while anything else can go, and counts what it dropped per event type."""
    with Outbox(tmp_path / "outbox.sqlite", max_events=6) as outbox:
        delivered = make_event(Phase.START, type="occupant_lost")
        put_event(outbox, delivered)
        assert outbox.ack(outbox.pending(1)[0].row_id)
        put_event(outbox, make_event(Phase.END, type="occupant_lost", start_event_id=delivered.event_id))
        late_start = make_event(Phase.START)
        put_event(outbox, late_start)
        for _ in range(5):  # a 'broker outage': pairs keep coming
            start = make_event(Phase.START)
            put_event(outbox, start)
            put_event(outbox, make_event(Phase.END, start_event_id=start.event_id))
        put_event(outbox, make_event(Phase.END, start_event_id=late_start.event_id))
        assert unpaired_ends(outbox, {delivered.event_id}) == []
        kept = [(i.facts.type, i.facts.phase.value) for i in outbox.pending(10) if i.facts is not None]
        assert kept[0] == ("occupant_lost", "end") and kept[1:] == [("stress", "start"), ("stress", "end")] * 2
        assert outbox.dropped_by_type == {"stress": 8} and outbox.dropped_by_reason["full"] == 8


def test_expiry_keeps_a_start_and_its_end_together(tmp_path: Path) -> None:
    """A start expires with its young end, the end of an expired start is refused when it comes, and the end of a
    delivered start never expires (the receiver would hold that start open for ever)."""
    now = time.time()
    with Outbox(tmp_path / "outbox.sqlite", max_age_s=60) as outbox:
        delivered = make_event(Phase.START, wall_time_s=now - 50)
        put_event(outbox, delivered)
        assert outbox.ack(outbox.pending(1)[0].row_id)
        put_event(outbox, make_event(Phase.END, start_event_id=delivered.event_id, wall_time_s=now - 40))
        old, alone = make_event(Phase.START, wall_time_s=now - 30), make_event(Phase.START, wall_time_s=now - 30)
        put_event(outbox, old)
        put_event(outbox, make_event(Phase.END, start_event_id=old.event_id, wall_time_s=now - 5))
        put_event(outbox, alone)
        young = make_event(Phase.START, wall_time_s=now)
        put_event(outbox, young)
        dropped = outbox.expire(now_wall_s=now + 45)
        assert len(dropped) == 3 and outbox.dropped_by_type == {"stress": 3}
        assert unpaired_ends(outbox, {delivered.event_id}) == []
        kept = [(i.facts.phase, i.facts.start_event_id) for i in outbox.pending(10) if i.facts is not None]
        assert kept == [(Phase.END, delivered.event_id), (Phase.START, None)]
        late_end = make_event(Phase.END, start_event_id=alone.event_id, wall_time_s=now + 45)
        put_event(outbox, late_end)
        assert late_end.event_id not in ids(outbox)
        assert [i.facts.phase for i in outbox.pending(10) if i.facts is not None] == [Phase.END, Phase.START]


def test_expiry_in_memory_keeps_a_start_and_its_end_together(tmp_path: Path) -> None:
    """With the disk full, a held start expires with its young held end; the held end of a delivered start stays."""
    now = time.time()
    day_ago = now - DAY_S  # a day's maximum age: the fillers put at the import-time NOW never expire here
    with tmpfs(tmp_path / "state", 1024) as state, Outbox(state / "outbox.sqlite", max_age_s=DAY_S) as outbox:
        delivered = make_event(Phase.START, wall_time_s=day_ago + 50)
        put_event(outbox, delivered)
        assert outbox.ack(outbox.pending(1)[0].row_id)
        with pin_wal(outbox.path):
            fill(state)
            put_until_held(outbox, "p")
            old = make_event(Phase.START, wall_time_s=day_ago + 70)
            for event in (
                make_event(Phase.END, start_event_id=delivered.event_id, wall_time_s=day_ago + 60),
                old,
                make_event(Phase.END, start_event_id=old.event_id, wall_time_s=now - 5),
            ):
                put_event(outbox, event)
            held = outbox.memory_depth
            dropped = outbox.expire(now_wall_s=now + 100)
            assert state_of(outbox) == "disk_full" and outbox.memory_depth == held - 2
            assert [d.reason for d in dropped] == ["expired", "expired"]
            assert unpaired_ends(outbox, {delivered.event_id}) == []
            ends = [i.facts.start_event_id for i in outbox.pending(1000) if i.facts is not None]
            assert ends == [delivered.event_id]


def test_the_memory_queue_keeps_a_start_and_its_end_together(tmp_path: Path) -> None:
    """With the disk full and memory_max_events 3, overlapping stress and occupant_lost pairs leave no end held
    without its start, and what went is counted per type."""
    with tmpfs(tmp_path / "state", 1024) as state, Outbox(state / "outbox.sqlite", memory_max_events=3) as outbox:
        put(outbox, "w0", "warning")
        with pin_wal(outbox.path):
            filler = fill(state)
            put_until_held(outbox, "p")
            before = {item.event_id for item in outbox.pending(1000)}
            for _ in range(6):
                stress, lost = make_event(Phase.START), make_event(Phase.START, type="occupant_lost")
                put_event(outbox, stress)
                put_event(outbox, lost)
                put_event(outbox, make_event(Phase.END, start_event_id=stress.event_id))
                put_event(outbox, make_event(Phase.END, type="occupant_lost", start_event_id=lost.event_id))
            assert filler.exists() and state_of(outbox) == "disk_full"
            assert unpaired_ends(outbox, set()) == []
            assert [i for i in outbox.pending(1000) if i.event_id not in before]
            assert set(outbox.dropped_by_type) <= {"stress", "occupant_lost", "unknown"}
            assert outbox.dropped_by_type.get("stress", 0) + outbox.dropped_by_type.get("occupant_lost", 0) >= 20


def test_an_outbox_damaged_while_open_is_replaced_by_its_readable_rows(tmp_path: Path) -> None:
    """Two pages overwritten under an open outbox (larger than SQLite's cache): the next call moves the file aside,
    goes on with a new one holding the readable rows under their row ids, and takes new events."""
    path = tmp_path / "outbox.sqlite"
    Outbox(path).close()
    with sqlite3.connect(path) as db:  # one transaction: 8000 puts would take a minute of fsyncs
        rows = [(i + 1, f"e{i:05d}", "cabin/car-1/events", b"x" * 600, 1, NOW) for i in range(8000)]
        db.executemany(
            "INSERT INTO outbox (row_id, event_id, topic, payload, severity, created_wall_s) VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
    with Outbox(path, max_events=20000) as outbox:
        row_ids = {item.event_id: item.row_id for item in outbox.pending(20000)}
        with path.open("r+b") as f:
            f.seek(4096 * (path.stat().st_size // 4096 // 3))
            f.write(b"\xa5" * 8192)
        items = outbox.pending(20000)
        put(outbox, "new")
        assert outbox.pending(20000)[-1].event_id == "new" and outbox.depth() == len(items) + 1
    (moved,) = outbox.replaced
    print(f"\n8000 rows, 2 pages overwritten while open: {moved.salvaged} salvaged")
    assert 7900 < len(items) == moved.salvaged < 8000 and moved.moved_to.exists()
    assert all(row_ids[item.event_id] == item.row_id for item in items)
    with Outbox(path) as reopened:
        assert reopened.depth() == len(items) + 1
