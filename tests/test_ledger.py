"""The open-event ledger: what a run leaves open is ended, marked interrupted, by the next."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cabin_monitor.bus.facts import EventFacts
from cabin_monitor.bus.ledger import LedgerError, OpenEvent, OpenEventLedger, interrupted_ends, left_open
from cabin_monitor.bus.outbox import Outbox
from cabin_monitor.bus.payloads import event_payload
from cabin_monitor.messages import Event, Phase, end_event_id

NOW = 1_700_000_000.0
DATA = Path(__file__).parent / "data"
TOPIC = "cabin/car-1/events"
FOREVER_S = 1e10  # the stored events are from 2023: never expire them here
IDS = [f"3f2b5d0e-4c41-4c8e-9c59-00000000000{i}" for i in range(4)]
# What the ledger notes of the starts of IDS, at NOW + their index.
NOTED = [OpenEvent(i, "stress", "stress", "occupant-1", "driver", NOW + n, "critical") for n, i in enumerate(IDS)]


def event(event_id: str, phase: Phase, start_event_id: str | None = None, at: float = NOW) -> Event:
    """A stress event of occupant-1 at ``at``."""
    return Event(
        event_id=event_id,
        type="stress",
        phase=phase,
        rule="stress",
        occupant_id="occupant-1",
        seat="driver",
        capture_s=1.0,
        wall_time_s=at,
        score=0.7,
        emotions={"anger": 0.7},
        started_wall_time_s=None if start_event_id is None else NOW,
        start_event_id=start_event_id,
        severity="critical",
    )


def test_a_start_stays_in_the_ledger_until_its_end(tmp_path: Path) -> None:
    """A start is written at once, survives in the file for the next run, and its end removes it."""
    path = tmp_path / "open_events.json"
    ledger = OpenEventLedger(path)
    ledger.record(event("a", Phase.START))
    ledger.record(event("b", Phase.START, at=NOW + 1))
    ledger.record(event("a-end", Phase.END, start_event_id="a"))
    assert ledger.open_count == 1
    (left,) = OpenEventLedger(path).load()
    assert left == OpenEvent("b", "stress", "stress", "occupant-1", "driver", NOW + 1, "critical")
    ledger.record(event("b-end", Phase.END, start_event_id="b"))
    assert OpenEventLedger(path).load() == [] and json.loads(path.read_text())["open"] == []


def test_interrupted_ends_pair_with_their_starts_and_are_valid_payloads(tmp_path: Path) -> None:
    """Each left-open event gets one end, naming its start, marked interrupted, never before its start."""
    opened = [
        OpenEvent("3f2b5d0e-4c41-4c8e-9c59-000000000001", "stress", "stress", "occupant-1", "driver", NOW, "warning"),
        OpenEvent("3f2b5d0e-4c41-4c8e-9c59-000000000002", "occupant_lost", "lost", "occupant-2", None, NOW + 9, "info"),
    ]
    ends = interrupted_ends(opened, NOW + 5)
    assert [(e.phase, e.start_event_id, e.interrupted) for e in ends] == [
        (Phase.END, opened[0].event_id, True),
        (Phase.END, opened[1].event_id, True),
    ]
    assert [e.wall_time_s for e in ends] == [NOW + 5, NOW + 9]
    payloads = [event_payload(e, "car-1") for e in ends]
    assert [p.interrupted for p in payloads] == [True, True] and payloads[1].severity == "info"
    assert len({e.event_id for e in ends} | {o.event_id for o in opened}) == 4


def test_an_interrupted_end_has_the_id_of_the_end_the_run_would_have_sent(tmp_path: Path) -> None:
    """The end a crash left in the outbox is the same event as the next start's interrupted end: one id."""
    path = tmp_path / "open_events.json"
    OpenEventLedger(path).record(event("a", Phase.START))
    (end,) = interrupted_ends(OpenEventLedger(path).load(), NOW + 60)
    assert end.event_id == end_event_id("a") != end_event_id("b")


def test_the_outbox_has_the_last_word_on_what_is_open(tmp_path: Path) -> None:
    """A start pending without its end is open though the ledger missed it; one whose end is pending is not, though
    the ledger noted it; payloads that are not events are passed over; oldest first."""
    pending = [
        event(IDS[2], Phase.START, at=NOW + 2),
        event(IDS[0], Phase.START, at=NOW),
        event(end_event_id(IDS[0]), Phase.END, start_event_id=IDS[0], at=NOW + 3),
        event(end_event_id(IDS[3]), Phase.END, start_event_id=IDS[3], at=NOW + 4),
    ]
    with Outbox(tmp_path / "outbox.sqlite", max_age_s=FOREVER_S) as outbox:
        for e in pending:
            payload = event_payload(e, "car-1").model_dump_json().encode()
            outbox.put(e.event_id, TOPIC, payload, e.severity, e.wall_time_s, EventFacts.of(e))
        outbox.put("not-an-event", TOPIC, b"not an event", "info", NOW + 5)
        items = outbox.pending(10)
    assert left_open([NOTED[1], NOTED[3]], items) == [NOTED[1], NOTED[2]]
    assert left_open([], items[:1]) == [NOTED[2]]


def test_left_open_reads_outbox_files_written_before_the_facts_were_kept(tmp_path: Path) -> None:
    """An outbox and a fallback file written without facts columns give the same events left open."""
    path, fallback = tmp_path / "outbox.sqlite", tmp_path / "fallback.sqlite"
    shutil.copyfile(DATA / "outbox-without-facts.sqlite", path)
    shutil.copyfile(DATA / "outbox-fallback-without-facts.sqlite", fallback)
    with Outbox(path, max_age_s=FOREVER_S, fallback=fallback) as outbox:
        assert outbox.restored_from_fallback == 1
        assert left_open([NOTED[0], NOTED[3]], outbox.pending(10)) == [NOTED[1], NOTED[2]]
    with Outbox(path, max_age_s=FOREVER_S) as reopened:  # the start the fallback file held is now a row with facts
        assert left_open([], reopened.pending(10)) == [NOTED[1], NOTED[2]]


def test_a_run_that_ends_its_events_leaves_nothing_to_end(tmp_path: Path) -> None:
    """Loading the ledger and ending what it held empties it: a third run finds nothing open."""
    path = tmp_path / "open_events.json"
    OpenEventLedger(path).record(event("a", Phase.START))
    second = OpenEventLedger(path)
    for end in interrupted_ends(second.load(), NOW + 60):
        second.record(end)
    assert OpenEventLedger(path).load() == []


@pytest.mark.parametrize("text", ["{not json", '{"format": "other", "open": []}', '{"format": "x"}', "[]"])
def test_a_damaged_ledger_is_refused_naming_the_file(tmp_path: Path, text: str) -> None:
    """A file that is not JSON or not a ledger raises LedgerError naming the file."""
    path = tmp_path / "open_events.json"
    path.write_text(text)
    with pytest.raises(LedgerError, match=r"open_events\.json"):
        OpenEventLedger(path).load()


def test_a_ledger_that_cannot_be_written_says_so(tmp_path: Path) -> None:
    """A folder that is a file makes record() raise LedgerError naming the ledger."""
    (tmp_path / "state").write_text("a file, not a folder")
    with pytest.raises(LedgerError, match="cannot write"):
        OpenEventLedger(tmp_path / "state" / "open_events.json").record(event("a", Phase.START))


def test_a_ledger_the_state_folder_cannot_take_is_kept_beside_the_fallback_file(tmp_path: Path) -> None:
    """With the state folder unwritable the ledger goes to its fallback copy; the next load reads that copy first,
    and once the folder takes the ledger again the copy is removed."""
    state = tmp_path / "state"
    state.mkdir()
    path, aside = state / "open_events.json", tmp_path / "run" / "open-events.json"
    ledger = OpenEventLedger(path, aside)
    ledger.record(event("a", Phase.START, at=NOW))
    shutil.rmtree(state)
    state.write_text("a file, not a folder")  # the state folder cannot be written now
    ledger.record(event("b", Phase.START, at=NOW + 1))
    ledger.record(event(end_event_id("a"), Phase.END, start_event_id="a"))
    assert ledger.kept_aside and aside.exists()
    again = OpenEventLedger(path, aside)
    assert [e.event_id for e in again.load()] == ["b"] and again.kept_aside
    state.unlink()
    state.mkdir()
    again.record(event("c", Phase.START, at=NOW + 2))
    assert not again.kept_aside and not aside.exists()
    assert [e.event_id for e in OpenEventLedger(path, aside).load()] == ["b", "c"]
