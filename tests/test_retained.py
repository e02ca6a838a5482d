"""Retained latest values: only the newest value of each slot goes, once, and all again after a connect."""

from __future__ import annotations

import pytest

from cabin_monitor.bus.retained import LatestValues


def test_only_the_newest_value_of_each_slot_is_due_once_in_slot_order() -> None:
    """Two values set before a send give one publish of the newer; slots come in the order they were named."""
    values = LatestValues(["health", "rules/state"])
    values.set("rules/state", b"r1")
    values.set("health", b"h1")
    values.set("health", b"h2")
    assert values.take_due() == [("health", b"h2"), ("rules/state", b"r1")]
    assert values.take_due() == []


def test_a_new_connection_makes_every_filled_slot_due_again() -> None:
    """After a connect the broker may hold an old value: every slot set so far goes again, empty ones do not."""
    values = LatestValues(["health", "rules/state"])
    values.all_due()
    assert values.take_due() == []
    values.set("health", b"h1")
    values.take_due()
    values.all_due()
    assert values.take_due() == [("health", b"h1")]


def test_an_unknown_topic_is_refused() -> None:
    """Setting a topic that has no slot is a programming error, not a silent new slot."""
    with pytest.raises(KeyError):
        LatestValues(["health"]).set("status", b"online")
