"""What one MQTT message from a vehicle becomes in the store: a typed record, or a quarantined message and why.

``classify`` is pure (topic and bytes in, one record out) and never raises: every payload the store cannot
take as it is (not UTF-8, not JSON, not an object, an unknown ``schema_version``, a ``vehicle_id`` that
differs from the topic's, a payload the daemon's model refuses, a topic that is not one of ours) becomes a
``Quarantined`` with its reason. Imports the daemon's payload models only.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ValidationError

from cabin_monitor.bus.payloads import (
    SCHEMA_VERSION,
    ConfigResultPayload,
    EventPayload,
    HealthPayload,
    RulesStatePayload,
    utc_epoch_s,
)


class Reason(str, enum.Enum):
    """Why a message went to quarantine."""

    NOT_UTF8 = "not_utf8"
    BAD_JSON = "bad_json"
    NOT_AN_OBJECT = "not_an_object"
    UNKNOWN_SCHEMA_VERSION = "unknown_schema_version"
    VEHICLE_MISMATCH = "vehicle_mismatch"
    INVALID_PAYLOAD = "invalid_payload"
    UNKNOWN_TOPIC = "unknown_topic"
    IMPLAUSIBLE_TIME = "implausible_time"
    REFUSED_BY_STORE = "refused_by_store"
    BEFORE_RETENTION = "before_retention"


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A message kept as received, with the reason it was not stored."""

    topic: str
    payload: bytes
    reason: Reason
    detail: str


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One event; ``json_text`` is the payload exactly as received."""

    payload: EventPayload
    ts: datetime
    json_text: str


@dataclass(frozen=True, slots=True)
class ShadowEventRecord:
    """One event of the vehicle's shadow rules (topic ``shadow/events``): stored apart from the live ones."""

    payload: EventPayload
    ts: datetime
    json_text: str


@dataclass(frozen=True, slots=True)
class HealthRecord:
    """One health report."""

    payload: HealthPayload
    ts: datetime
    json_text: str


@dataclass(frozen=True, slots=True)
class RulesStateRecord:
    """The rules in force on one vehicle."""

    payload: RulesStatePayload
    ts: datetime
    json_text: str


@dataclass(frozen=True, slots=True)
class ConfigResultRecord:
    """One answer to a config request; the vehicle is the topic's (the payload does not name it)."""

    vehicle_id: str
    payload: ConfigResultPayload
    ts: datetime
    json_text: str


@dataclass(frozen=True, slots=True)
class StatusRecord:
    """``online`` or ``offline`` (plain text, retained)."""

    vehicle_id: str
    status: str


Record = (
    EventRecord | ShadowEventRecord | HealthRecord | RulesStateRecord | ConfigResultRecord | StatusRecord | Quarantined
)

SHADOW_EVENTS_TOPIC = "shadow/events"
# topic suffix after cabin/<vehicle_id>/ -> payload model; status is plain text.
JSON_TOPICS: dict[str, type[BaseModel]] = {
    "events": EventPayload,
    SHADOW_EVENTS_TOPIC: EventPayload,
    "health": HealthPayload,
    "rules/state": RulesStatePayload,
    "config/result": ConfigResultPayload,
}
STATUS_TOPIC = "status"
EVENT_YEARS = (2000, 2200)  # an event's ts must fall in [first, last) year
STATUS_VALUES = frozenset({"online", "offline"})


# Retained, rare, and kept as the latest per vehicle: every ingest process subscribes to these itself (a shared
# subscription gets no retained messages, so the rules in force before ingest started would never arrive).
RETAINED_SUFFIXES = ("rules/state", STATUS_TOPIC)


def subscription_topics(group: str, prefix: str = "cabin") -> list[str]:
    """Every topic filter the store takes in: shared in ``group``, but the retained latest-value topics."""
    suffixes = (*JSON_TOPICS, STATUS_TOPIC)
    return [f"{prefix}/+/{s}" if s in RETAINED_SUFFIXES else f"$share/{group}/{prefix}/+/{s}" for s in suffixes]


def utc_datetime(text: str) -> datetime:
    """A payload timestamp as an aware UTC ``datetime``."""
    return datetime.fromtimestamp(utc_epoch_s(text), tz=timezone.utc)


def _short_errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '(payload)'}: {e['msg']}" for e in exc.errors()[:5])


def classify(topic: str, payload: bytes, prefix: str = "cabin") -> Record:
    """The record a message on ``topic`` makes, or why it is quarantined."""
    head, _, rest = topic.partition("/")
    vehicle_id, _, suffix = rest.partition("/")
    if head != prefix or not vehicle_id or (suffix not in JSON_TOPICS and suffix != STATUS_TOPIC):
        return Quarantined(topic, payload, Reason.UNKNOWN_TOPIC, f"not {prefix}/<vehicle_id>/<one of ours>")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Quarantined(topic, payload, Reason.NOT_UTF8, str(exc))
    if suffix == STATUS_TOPIC:
        if text not in STATUS_VALUES:
            return Quarantined(topic, payload, Reason.INVALID_PAYLOAD, "status is 'online' or 'offline'")
        return StatusRecord(vehicle_id, text)
    return _classify_json(topic, payload, text, vehicle_id, suffix)


def _classify_json(topic: str, payload: bytes, text: str, vehicle_id: str, suffix: str) -> Record:
    try:
        data: Any = json.loads(text)
    except ValueError as exc:
        return Quarantined(topic, payload, Reason.BAD_JSON, str(exc))
    if not isinstance(data, dict):
        return Quarantined(topic, payload, Reason.NOT_AN_OBJECT, f"a JSON {type(data).__name__}, not an object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        return Quarantined(
            topic,
            payload,
            Reason.UNKNOWN_SCHEMA_VERSION,
            f"schema_version {version!r}; this store reads {SCHEMA_VERSION}",
        )
    if "\\u0000" in text:
        # PostgreSQL's jsonb cannot hold U+0000.
        return Quarantined(topic, payload, Reason.INVALID_PAYLOAD, "a string holds U+0000")
    named = data.get("vehicle_id", vehicle_id)
    if named != vehicle_id:
        return Quarantined(
            topic, payload, Reason.VEHICLE_MISMATCH, f"payload vehicle_id {named!r}, topic's {vehicle_id!r}"
        )
    try:
        parsed = JSON_TOPICS[suffix].model_validate(data)
    except ValidationError as exc:
        return Quarantined(topic, payload, Reason.INVALID_PAYLOAD, _short_errors(exc))
    record = _record(parsed, vehicle_id, text, shadow=suffix == SHADOW_EVENTS_TOPIC)
    return Quarantined(topic, payload, record.reason, record.detail) if isinstance(record, Quarantined) else record


def _record(parsed: BaseModel, vehicle_id: str, text: str, *, shadow: bool) -> Record:
    if isinstance(parsed, EventPayload):
        ts = utc_datetime(parsed.ts)
        if not EVENT_YEARS[0] <= ts.year < EVENT_YEARS[1]:
            # Each month of events is a partition: a clock gone wild would make one per message.
            return Quarantined("", text.encode(), Reason.IMPLAUSIBLE_TIME, f"ts {parsed.ts} outside {EVENT_YEARS}")
        return ShadowEventRecord(parsed, ts, text) if shadow else EventRecord(parsed, ts, text)
    if isinstance(parsed, HealthPayload):
        return HealthRecord(parsed, utc_datetime(parsed.ts), text)
    if isinstance(parsed, RulesStatePayload):
        return RulesStateRecord(parsed, utc_datetime(parsed.ts), text)
    assert isinstance(parsed, ConfigResultPayload)
    return ConfigResultRecord(vehicle_id, parsed, utc_datetime(parsed.ts), text)
