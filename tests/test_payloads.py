"""The MQTT JSON payloads: round trips, mapping from events, schema export."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from cabin_monitor.bus.payloads import (
    PAYLOADS,
    ConfigRequestPayload,
    ConfigResultPayload,
    ConfigSetPayload,
    EventPayload,
    HealthPayload,
    OccupantStatePayload,
    RuleOverride,
    RulesStatePayload,
    event_payload,
    health_payload,
    json_schemas,
    state_payloads,
    utc_iso,
)
from cabin_monitor.messages import CameraState, Event, OutboxState, Phase, Refusal, RemoteStats
from cabin_monitor.rules import OccupantState
from tests.support import helpers
from tests.support.helpers import make_health

EMOTIONS = {"neutral": 0.1, "anger": 0.6, "fear": 0.3}


def make_event(phase: Phase = Phase.START, **changes: Any) -> Event:
    """An event at fixed times and values, so that its payload can be compared to the letter."""
    fixed: dict[str, Any] = {
        "occupant_id": "occ-1",
        "capture_s": 123.0,
        "wall_time_s": 1_700_000_000.25,
        "score": 0.9,
        "emotions": EMOTIONS,
        "frame_id": 42,
    }
    if phase is Phase.END:
        fixed["started_wall_time_s"] = 1_699_999_990.5
    return helpers.make_event(phase, **(fixed | changes))


def samples() -> list[BaseModel]:
    return [
        event_payload(make_event(), "car-1"),
        event_payload(make_event(Phase.END), "car-1"),
        OccupantStatePayload(
            vehicle_id="car-1",
            occupant_id="occ-1",
            seat=None,
            ts=utc_iso(1_700_000_000),
            emotions=EMOTIONS,
            top_emotion="anger",
            active_events=["stress"],
        ),
        health_payload(make_health(), "car-1").model_copy(update={"ts": utc_iso(1_700_000_000), "last_error": "x"}),
        ConfigSetPayload(request_id="r1", rules={"stress": {"enter_score": 0.7}}),
        ConfigResultPayload(ts=utc_iso(1_700_000_000), request_id="r1", ok=True, rules={"smoothing_s": 0.7}),
        ConfigResultPayload.failure("bad", wall_time_s=1_700_000_000, request_id="r2", path="stress.enter_score"),
        ConfigRequestPayload(request_id="g1"),
        ConfigResultPayload(
            ts=utc_iso(1_700_000_000),
            action="get",
            request_id="g1",
            ok=True,
            rules={"smoothing_s": 2.0},
            sources={"smoothing_s": "remote"},
            overrides=[RuleOverride(path="smoothing_s", remote=2.0, file=0.7)],
        ),
        RulesStatePayload(
            vehicle_id="car-1",
            ts=utc_iso(1_700_000_000),
            cause="reload",
            rules={"smoothing_s": 2.0},
            sources={"smoothing_s": "remote"},
            overrides=[RuleOverride(path="smoothing_s", remote=2.0, file=0.7)],
        ),
    ]


@pytest.mark.parametrize("payload", samples(), ids=lambda p: type(p).__name__)
def test_round_trip(payload: BaseModel) -> None:
    """Every payload survives JSON serialisation unchanged."""
    assert type(payload).model_validate_json(payload.model_dump_json()) == payload


def test_event_payload_start() -> None:
    """A start event maps field by field, with a UTC 'Z' timestamp and no start reference."""
    event = make_event()
    payload = event_payload(event, "car-1")
    doc = json.loads(payload.model_dump_json())
    assert doc == {
        "schema_version": 1,
        "event_id": event.event_id,
        "vehicle_id": "car-1",
        "type": "stress",
        "phase": "start",
        "occupant_id": "occ-1",
        "seat": "driver",
        "ts": "2023-11-14T22:13:20.250Z",
        "started_ts": None,
        "start_event_id": None,
        "score": 0.9,
        "emotions": EMOTIONS,
        "rule": "stress",
        "severity": "warning",
        "frame_id": 42,
        "interrupted": False,
    }


def test_event_payload_end() -> None:
    """An end event carries when its start happened and the start's event_id."""
    event = make_event(Phase.END, severity="critical", seat=None)
    payload = event_payload(event, "car-1")
    assert payload.phase == "end"
    assert payload.started_ts == "2023-11-14T22:13:10.500Z"
    assert payload.start_event_id == event.start_event_id
    assert payload.severity == "critical"
    assert payload.seat is None


def test_state_payloads_carry_the_smoothed_reading_of_each_read_occupant() -> None:
    """Each occupant the model has read gives one state (rounded, with its top emotion); unread ones none."""
    occupants = [
        OccupantState("occ-1", "driver", 10.0, {"neutral": 0.123456, "anger": 0.876544}, ("stress",)),
        OccupantState("occ-2", None, 10.0, {}, ()),
    ]
    (state,) = state_payloads(occupants, "car-1", 1_700_000_000.25)
    assert json.loads(state.model_dump_json()) == {
        "schema_version": 1,
        "vehicle_id": "car-1",
        "occupant_id": "occ-1",
        "seat": "driver",
        "ts": "2023-11-14T22:13:20.250Z",
        "emotions": {"neutral": 0.1235, "anger": 0.8765},
        "top_emotion": "anger",
        "active_events": ["stress"],
    }


def test_health_payload_maps_a_snapshot_field_by_field() -> None:
    """A healthy snapshot gives status ok and every counter in its section."""
    remote = RemoteStats(received=7, answered=5, busy=2, dropped=1, queued=1)
    doc = json.loads(
        health_payload(make_health(wall_time_s=1_700_000_000.25, remote=remote), "car-1").model_dump_json()
    )
    assert doc == {
        "schema_version": 1,
        "vehicle_id": "car-1",
        "ts": "2023-11-14T22:13:20.250Z",
        "status": "ok",
        "camera": {
            "state": "streaming",
            "source": "sample",
            "fps": 30.0,
            "frames": 900,
            "corrupt_frames": 0,
            "reopen_count": 0,
            "last_error": None,
        },
        "pipeline": {"fps": 29.5, "frames_processed": 880, "dropped_frames": 20, "stale_frames": 0},
        "model": {"path": "emotionaldan-7.onnx", "providers_requested": ["cuda", "cpu"], "provider_in_use": "cpu"},
        "outbox": {
            "state": "ok",
            "depth": 0,
            "memory_depth": 0,
            "memory_unkept": 0,
            "dropped_total": 0,
            "dropped_by_reason": {"full": 0, "expired": 0, "memory_full": 0},
            "dropped_by_type": {},
            "last_error": None,
        },
        "mqtt": {
            "connected": True,
            "reconnects": 0,
            "refused_events": 0,
            "last_refusal": None,
            "refusals_detectable": True,
        },
        "remote": {"received": 7, "answered": 5, "busy": 2, "dropped": 1, "queued": 1},
        "last_error": None,
    }
    assert json.loads(health_payload(make_health(), "car-1").model_dump_json())["remote"] is None  # no broker


def test_health_status_follows_stage_failures_the_camera_and_the_broker() -> None:
    """error on a stage failure or a failed camera; degraded while the camera or broker is away, the disk full,
    or the broker refusing events."""
    healthy = make_health()
    cam = healthy.camera
    offline = replace(healthy.sink, connected=False)
    cases = [
        (replace(healthy, failure="inference: RuntimeError()"), "error", "inference: RuntimeError()"),
        (replace(healthy, camera=replace(cam, state=CameraState.FAILED, last_error="gone")), "error", "gone"),
        (
            replace(healthy, camera=replace(cam, state=CameraState.STALLED, last_error="no frame")),
            "degraded",
            "no frame",
        ),
        (replace(healthy, camera=replace(cam, state=CameraState.REOPENING)), "degraded", None),
        (replace(healthy, sink=offline), "degraded", None),
        (replace(healthy, sink=offline, broker_required=False), "ok", None),
        (
            replace(healthy, sink=replace(healthy.sink, outbox_state=OutboxState.DISK_FULL, outbox_memory_depth=3)),
            "degraded",
            None,
        ),
        (replace(healthy, sink=replace(healthy.sink, refusing=True, refused_total=2)), "degraded", None),
        (
            replace(healthy, failure="capture: x", camera=replace(cam, last_error="corrupt frame")),
            "error",
            "capture: x",
        ),
    ]
    for snapshot, status, last_error in cases:
        payload = health_payload(snapshot, "car-1")
        assert (payload.status, payload.last_error) == (status, last_error), snapshot


def test_end_without_start_reference_is_rejected() -> None:
    """An end event that does not say which start it closes is invalid."""
    with pytest.raises(ValidationError, match="started_ts and start_event_id"):
        event_payload(make_event(Phase.END, start_event_id=None), "car-1")


def test_unknown_severity_is_rejected() -> None:
    """Severity is one of info, warning, critical."""
    with pytest.raises(ValidationError, match="severity"):
        event_payload(make_event(severity="panic"), "car-1")


@pytest.mark.parametrize("ts", ["2024-01-01T00:00:00Z", "2024-01-01T00:00:00.123+00:00"])
def test_utc_timestamps_accepted(ts: str) -> None:
    """'Z' and +00:00 are both UTC."""
    doc = json.loads(event_payload(make_event(), "car-1").model_dump_json()) | {"ts": ts}
    assert EventPayload.model_validate(doc).ts == ts


@pytest.mark.parametrize("ts", ["2024-01-01T00:00:00", "2024-01-01T01:00:00+01:00", "yesterday"])
def test_non_utc_timestamps_rejected(ts: str) -> None:
    """Naive, non-UTC and non-ISO timestamps are errors."""
    doc = json.loads(event_payload(make_event(), "car-1").model_dump_json()) | {"ts": ts}
    with pytest.raises(ValidationError, match="ts"):
        EventPayload.model_validate(doc)


def test_unknown_keys_rejected() -> None:
    """extra='forbid': a misspelt key is an error, also in nested models."""
    doc = json.loads(health_payload(make_health(), "car-1").model_dump_json())
    doc["camera"]["fsp"] = 30
    with pytest.raises(ValidationError, match="fsp"):
        HealthPayload.model_validate(doc)


def test_bad_event_id_rejected() -> None:
    """event_id must be a UUID."""
    with pytest.raises(ValidationError, match="UUID"):
        event_payload(make_event(event_id="not-a-uuid"), "car-1")


def test_config_result_ok_matches_errors() -> None:
    """ok is true exactly when there are no errors."""
    with pytest.raises(ValidationError, match="ok must be true"):
        ConfigResultPayload(ts=utc_iso(0), ok=False)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_json_schemas_export() -> None:
    """Every payload has a JSON-serialisable object schema whose refs resolve and whose required keys exist."""
    schemas = json_schemas()
    assert set(schemas) == set(PAYLOADS)
    for name, schema in schemas.items():
        schema = json.loads(json.dumps(schema))
        assert schema["type"] == "object", name
        assert schema["additionalProperties"] is False, name
        assert set(schema.get("required", [])) <= set(schema["properties"]), name
        for ref in _refs(schema):
            assert ref.startswith("#/$defs/") and ref.removeprefix("#/$defs/") in schema["$defs"], (name, ref)


def test_json_schemas_required_fields() -> None:
    """Published payloads require every field but the shadow rules' (left out without them); config/set requires
    only the rules."""
    schemas = json_schemas()
    assert set(schemas["event"]["required"]) == set(EventPayload.model_fields)
    assert {"started_ts", "start_event_id"} <= set(schemas["event"]["required"])
    assert set(schemas["health"]["required"]) == set(HealthPayload.model_fields)
    assert set(schemas["health"]["$defs"]["CameraHealth"]["required"]) >= {"state", "fps", "last_error"}
    assert schemas["event"]["properties"]["ts"]["format"] == "date-time"
    assert schemas["config_set"]["required"] == ["rules"]
    assert "required" not in schemas["config_request"]  # {} is a whole config/get or config/reset
    assert set(schemas["rules_state"]["required"]) == set(RulesStatePayload.model_fields) - {"shadow"}
    assert set(schemas["config_result"]["required"]) == set(ConfigResultPayload.model_fields) - {"shadow"}
    assert schemas["shadow_event"] == schemas["event"]
    shadow_sources = schemas["rules_state"]["$defs"]["ShadowRulesState"]["properties"]["sources"]
    assert "live" in shadow_sources["additionalProperties"]["enum"]


def test_health_reports_the_last_refusal_and_the_outbox_state() -> None:
    """A refused event and an outbox that cannot be written show in the health payload as they are."""
    refusal = Refusal("6f1c0f4e-2f6a-4c55-9d55-2b8f9f0f7a10", "Not authorized", 0x87, 1_700_000_000.25)
    sink = replace(
        make_health().sink,
        outbox_state=OutboxState.DISK_FULL,
        outbox_memory_depth=4,
        outbox_memory_unkept=1,
        outbox_depth=9,
        outbox_error="database or disk is full",
        refused_total=3,
        last_refusal=refusal,
        refusing=True,
        dropped_by_type={"stress": 2},
    )
    payload = json.loads(health_payload(make_health(sink=sink), "car-1").model_dump_json())
    assert payload["outbox"] | {"dropped_by_reason": None} == {
        "state": "disk_full",
        "depth": 9,
        "memory_depth": 4,
        "memory_unkept": 1,
        "dropped_total": 0,
        "dropped_by_reason": None,
        "dropped_by_type": {"stress": 2},
        "last_error": "database or disk is full",
    }
    assert payload["mqtt"]["refused_events"] == 3
    assert payload["mqtt"]["last_refusal"] == {
        "event_id": refusal.event_id,
        "reason": "Not authorized",
        "reason_code": 135,
        "ts": "2023-11-14T22:13:20.250Z",
    }
    assert payload["status"] == "degraded"
