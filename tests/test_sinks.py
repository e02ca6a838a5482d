"""The sink for runs without a broker: JSON event lines on a stream."""

from __future__ import annotations

import io
import json

from cabin_monitor.bus.payloads import EventPayload, event_payload
from cabin_monitor.bus.sinks import StdoutSink
from cabin_monitor.rules import OccupantState
from tests.support.helpers import make_event, make_health


def test_stdout_sink_prints_json_lines() -> None:
    """Each event is one EventPayload JSON line."""
    stream = io.StringIO()
    sink = StdoutSink("car-1", stream)
    events = [make_event(), make_event(severity="info")]
    sink.start()
    for event in events:
        sink.submit_event(event)
    sink.publish_state([OccupantState("occupant-1", None, 1.0, {"neutral": 1.0}, ())], 1_700_000_000)
    sink.publish_health(make_health())
    sink.stop(flush_timeout_s=0.1)
    lines = stream.getvalue().splitlines()
    assert [EventPayload.model_validate_json(line) for line in lines] == [event_payload(e, "car-1") for e in events]
    assert sink.stats().published_total == 2


def test_stdout_sink_marks_shadow_events() -> None:
    """A shadow event prints as {"shadow_event": EventPayload}, never as a live event line, and is not counted."""
    stream = io.StringIO()
    sink = StdoutSink("car-1", stream)
    live, shadow = make_event(), make_event()
    sink.submit_shadow_event(shadow)
    sink.submit_event(live)
    first, second = stream.getvalue().splitlines()
    assert EventPayload.model_validate(json.loads(first)["shadow_event"]) == event_payload(shadow, "car-1")
    assert EventPayload.model_validate_json(second) == event_payload(live, "car-1")
    assert sink.stats().published_total == 1
