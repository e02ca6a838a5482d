"""What a message becomes in the store (fleet.records.classify): pure, scenario by scenario."""

from __future__ import annotations

import json

from cabin_monitor.fleet.records import (
    ConfigResultRecord,
    EventRecord,
    Quarantined,
    Reason,
    ShadowEventRecord,
    StatusRecord,
    classify,
    subscription_topics,
)
from tests.support.fleet import event_json


def reason(topic: str, payload: bytes) -> Reason | None:
    """The quarantine reason of a message, or None when it is stored."""
    record = classify(topic, payload)
    return record.reason if isinstance(record, Quarantined) else None


def test_valid_messages_become_records_of_their_topic() -> None:
    """An event, a status and a config/result (whose vehicle is the topic's) become typed records."""
    assert isinstance(classify("cabin/car-1/events", event_json("car-1")), EventRecord)
    assert classify("cabin/car-1/status", b"offline") == StatusRecord("car-1", "offline")
    answer = {"schema_version": 1, "ts": "2026-12-01T10:00:00Z", "action": "get", "request_id": "r", "ok": True}
    record = classify("cabin/car-9/config/result", json.dumps(answer).encode())
    assert isinstance(record, ConfigResultRecord) and record.vehicle_id == "car-9"


def test_foreign_topics_and_prefixes_are_quarantined() -> None:
    """Another prefix, a topic of no known kind, or no vehicle id: unknown_topic, with the bytes kept."""
    for topic in ("other/car-1/events", "cabin/car-1/occupants/o1/state", "cabin//events", "cabin/car-1"):
        assert reason(topic, event_json("car-1")) == Reason.UNKNOWN_TOPIC
    record = classify("cabin/car-1/nothing", b"\x00raw")
    assert isinstance(record, Quarantined) and record.payload == b"\x00raw"


def test_a_shadow_event_is_a_shadow_record_checked_like_an_event() -> None:
    """shadow/events makes a ShadowEventRecord (never an EventRecord); its payload is checked as an event's."""
    assert type(classify("cabin/car-1/shadow/events", event_json("car-1"))) is ShadowEventRecord
    data = json.loads(event_json("car-1"))
    assert reason("cabin/car-1/shadow/events", json.dumps({**data, "vehicle_id": "car-2"}).encode()) == (
        Reason.VEHICLE_MISMATCH
    )
    assert reason("cabin/car-1/shadow/events", json.dumps({**data, "schema_version": 2}).encode()) == (
        Reason.UNKNOWN_SCHEMA_VERSION
    )
    assert reason("cabin/car-1/shadow/events", b"{not json") == Reason.BAD_JSON


def test_a_boolean_schema_version_is_not_version_one() -> None:
    """schema_version true (== 1 in Python) is an unknown version; a status other than online/offline is invalid."""
    data = json.loads(event_json("car-1"))
    assert reason("cabin/car-1/events", json.dumps({**data, "schema_version": True}).encode()) == (
        Reason.UNKNOWN_SCHEMA_VERSION
    )
    assert reason("cabin/car-1/status", b"maybe") == Reason.INVALID_PAYLOAD


def test_retained_latest_value_topics_are_not_shared() -> None:
    """Events, shadow events, health and config/result are shared in the group; rules/state and status are not."""
    assert subscription_topics("g") == [
        "$share/g/cabin/+/events",
        "$share/g/cabin/+/shadow/events",
        "$share/g/cabin/+/health",
        "cabin/+/rules/state",
        "$share/g/cabin/+/config/result",
        "cabin/+/status",
    ]
