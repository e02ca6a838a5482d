"""The outbox sender without a broker: the window, refusals held back and probed with backoff, acks, expiry."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest

from cabin_monitor.bus.backoff import Backoff
from cabin_monitor.bus.outbox import Outbox
from cabin_monitor.bus.outbox_watch import OutboxWatch
from cabin_monitor.bus.sender import EXPIRE_EVERY_S, OutboxSender, PubAck
from tests.support.helpers import capturing_logger
from tests.support.publisher import RecordingPublisher

TOPIC = "cabin/car-1/events"
ACCEPTED = 0x00
NOT_AUTHORIZED = 0x87


class HighestRandom(random.Random):
    """Backoff always at its cap, so the doubling per refused round is visible."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


class Rig:
    """A sender over a real outbox file, a recording publisher, a test clock and captured logs."""

    def __init__(self, outbox: Outbox, max_inflight: int) -> None:
        self.outbox = outbox
        self.clock = Clock()
        logger, self.logs = capturing_logger()
        self.publisher = RecordingPublisher()
        backoff = Backoff(1.0, 8.0, HighestRandom())
        watch = OutboxWatch(outbox, logger, self.clock)
        self.sender = OutboxSender(outbox, watch, max_inflight, backoff, logger, self.clock)

    def put(self, *names: str, created_wall_s: float | None = None) -> None:
        """Put events whose payload is their name."""
        for name in names:
            self.outbox.put(name, TOPIC, name.encode(), "warning", created_wall_s or time.time())

    def send(self) -> list[str]:
        """Drain acks, send, and return the payloads published."""
        self.sender.drain_acks()
        self.sender.send(self.publisher)
        return [payload for _, payload in self.publisher.take()]

    def answer(self, mids: dict[str, int], code: int, *names: str) -> None:
        """Acknowledge (or refuse) the named events."""
        for name in names:
            self.sender.note_ack(PubAck(mids[name], code, "Success" if code < 0x80 else "Not authorized"))

    def lines(self, what: str) -> list[MutableMapping[str, Any]]:
        """The captured log entries named ``what``."""
        return [e for e in self.logs.entries if e["event"] == what]


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    """An empty outbox in the test's folder."""
    with Outbox(tmp_path / "outbox.sqlite", max_age_s=3600) as box:
        yield box


def sent_mids(rig: Rig) -> dict[str, int]:
    """Send and map each published payload to its message id."""
    rig.sender.drain_acks()
    rig.sender.send(rig.publisher)
    return {payload: mid for mid, payload in rig.publisher.take()}


def test_at_most_the_window_is_in_flight_and_each_ack_frees_a_place(outbox: Outbox) -> None:
    """With a window of 3, three events go; each acknowledgement lets the next one go, in order."""
    rig = Rig(outbox, max_inflight=3)
    rig.put(*[f"e{i}" for i in range(6)])
    mids = sent_mids(rig)
    assert list(mids) == ["e0", "e1", "e2"] and rig.send() == []
    rig.answer(mids, ACCEPTED, "e0", "e1")
    assert rig.send() == ["e3", "e4"]
    assert [e["event_id"] for e in rig.lines("event delivered")] == ["e0", "e1"]
    assert outbox.depth() == 4 and rig.sender.published_total == 2


def test_a_refusal_holds_back_later_events_and_probes_the_oldest_alone_after_the_backoff(outbox: Outbox) -> None:
    """A refused event stays; nothing new goes until the backoff is over, then the refused event goes alone."""
    rig = Rig(outbox, max_inflight=3)
    rig.put("e0", "e1", "e2", "e3", "e4")
    mids = sent_mids(rig)
    rig.answer(mids, NOT_AUTHORIZED, "e0")
    assert rig.send() == [] and rig.sender.refusing
    (refusal,) = rig.lines("mqtt broker refused an event; it stays in the outbox")
    assert (refusal["event_id"], refusal["reason_code"], refusal["retry_in_s"]) == ("e0", "0x87", 2.0)
    rig.answer(mids, ACCEPTED, "e1", "e2")  # already in flight: delivered before the refused one
    rig.clock.now_s += 1.9
    assert rig.send() == [], "sent again before the backoff was over"
    rig.clock.now_s += 0.2
    assert rig.send() == ["e0"], "the probe goes alone, the oldest first"
    assert rig.send() == []
    assert [item.event_id for item in outbox.pending(10)] == ["e0", "e3", "e4"]
    assert rig.sender.last_refusal is not None and rig.sender.last_refusal.reason_code == NOT_AUTHORIZED


def test_an_accepted_probe_resumes_the_full_window_in_order(outbox: Outbox) -> None:
    """Once the probe is accepted the window opens again from the next event, and the order is kept."""
    rig = Rig(outbox, max_inflight=3)
    rig.put("e0", "e1", "e2", "e3", "e4", "e5")
    mids = sent_mids(rig)
    rig.answer(mids, NOT_AUTHORIZED, "e0")
    rig.answer(mids, ACCEPTED, "e1", "e2")
    rig.send()
    rig.clock.now_s += 2.0
    probe = sent_mids(rig)
    rig.answer(probe, ACCEPTED, "e0")
    assert rig.send() == ["e3", "e4", "e5"] and not rig.sender.refusing
    assert [e["event_id"] for e in rig.lines("event delivered")] == ["e1", "e2", "e0"]
    assert len(rig.lines("mqtt broker accepts events again")) == 1


def test_a_refused_probe_doubles_the_backoff(outbox: Outbox) -> None:
    """Each refused round waits twice as long as the one before, up to the cap."""
    rig = Rig(outbox, max_inflight=2)
    rig.put("e0", "e1")
    waits = []
    mids = sent_mids(rig)
    rig.answer(mids, NOT_AUTHORIZED, "e0", "e1")
    for _ in range(4):
        rig.send()
        waits.append(rig.lines("mqtt broker refused an event; it stays in the outbox")[-1]["retry_in_s"])
        rig.clock.now_s += 100.0
        probe = sent_mids(rig)
        assert list(probe) == ["e0"]
        rig.answer(probe, NOT_AUTHORIZED, "e0")
    rig.sender.drain_acks()
    assert waits == [2.0, 4.0, 8.0, 8.0]
    assert rig.sender.refused_total == 6 and outbox.depth() == 2


def test_a_closed_link_sends_the_unanswered_again_from_the_oldest(outbox: Outbox) -> None:
    """Events left unanswered by a dropped connection go again, in order, on the next one; answered ones do not."""
    rig = Rig(outbox, max_inflight=3)
    rig.put("e0", "e1", "e2", "e3")
    mids = sent_mids(rig)
    rig.answer(mids, ACCEPTED, "e0")
    rig.sender.link_closed()
    rig.sender.restart()
    assert rig.send() == ["e1", "e2", "e3"]


def test_a_link_going_down_stops_the_round_and_the_row_goes_later(outbox: Outbox) -> None:
    """When the publisher takes nothing, sending stops there; after a restart that row goes first."""
    rig = Rig(outbox, max_inflight=3)
    rig.put("e0", "e1")
    rig.publisher.down = True
    assert rig.send() == []
    rig.publisher.down = False
    rig.sender.link_closed()
    rig.sender.restart()
    assert rig.send() == ["e0", "e1"]


def test_an_event_too_large_for_the_broker_is_kept_and_holds_nobody_back(outbox: Outbox) -> None:
    """An event over the broker's packet limit stays in the outbox, named once; those after it go; the next
    connection tries it again (a broker with a larger limit takes it)."""
    rig = Rig(outbox, max_inflight=4)
    rig.publisher.max_payload_bytes = 10
    rig.put("e0", "too-large-event", "e2")
    mids = sent_mids(rig)
    assert list(mids) == ["e0", "e2"]
    rig.answer(mids, ACCEPTED, "e0", "e2")
    assert rig.send() == [] and [i.event_id for i in outbox.pending(10)] == ["too-large-event"]
    rig.sender.link_closed()
    rig.sender.restart()
    assert rig.send() == []
    (named,) = rig.lines("event larger than the broker's Maximum Packet Size kept in the outbox, not sent")
    assert named["event_id"] == "too-large-event" and named["size_bytes"] == 15
    rig.publisher.max_payload_bytes = None
    rig.sender.link_closed()
    rig.sender.restart()
    assert rig.send() == ["too-large-event"]


def test_expired_events_are_dropped_and_logged_once_per_period(tmp_path: Path) -> None:
    """Expiry runs at once and then every EXPIRE_EVERY_S; what it drops is logged and never sent."""
    with Outbox(tmp_path / "outbox.sqlite", max_age_s=0.3) as outbox:
        rig = Rig(outbox, max_inflight=3)
        rig.put("old")
        time.sleep(0.4)
        rig.sender.expire_if_due()
        assert [e["event_id"] for e in rig.lines("outbox dropped an event")] == ["old"]
        rig.put("stale")
        time.sleep(0.4)
        rig.sender.expire_if_due()
        assert outbox.depth() == 1, "expired again before the period was over"
        rig.clock.now_s += EXPIRE_EVERY_S
        rig.sender.expire_if_due()
        assert outbox.depth() == 0 and rig.send() == []
        assert [e["event_id"] for e in rig.lines("outbox dropped an event")] == ["old", "stale"]
