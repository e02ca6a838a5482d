"""The JSON payloads the daemon publishes on MQTT, as strict pydantic models, and their assembly.

The pipeline hands the bus plain messages (``Event``, the rules engine's ``OccupantState``, a
``HealthSnapshot``); ``event_payload``, ``state_payloads`` and ``health_payload`` are the one place
that turns them into payloads, which the sinks serialise and send.

Topics are ``<topic_prefix>/<vehicle_id>/<name>``:

- ``events`` (QoS 1): ``EventPayload``
- ``shadow/events`` (QoS 0, sent directly, never through the outbox): ``EventPayload`` of the shadow rules;
  the topic alone tells them from live events
- ``occupants/<occupant_id>/state`` (QoS 0): ``OccupantStatePayload``
- ``health`` (retained, QoS 1): ``HealthPayload``
- ``config/set`` (subscribed, QoS 1): ``ConfigSetPayload``
- ``config/get`` and ``config/reset`` (subscribed, QoS 1): ``ConfigRequestPayload``
- ``config/result`` (QoS 1): ``ConfigResultPayload``, the answer to each of the three
- ``rules/state`` (retained, QoS 1): ``RulesStatePayload``, the rules in force and where each value came from
- ``status`` (retained, QoS 1): the plain text ``online`` / ``offline``, not JSON.

Every payload carries ``schema_version`` so consumers can tell formats apart. The shadow rules' fields
(``shadow`` in requests, answers and ``rules/state``) are left out of published payloads while at their
default, so a daemon without shadow rules publishes exactly what it did before them.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Annotated, Any, ClassVar, Literal, cast

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, model_validator

from cabin_monitor.messages import (
    CameraState,
    Event,
    HealthSnapshot,
    HealthStatus,
    OutboxState,
    RemoteAction,
    Severity,
)
from cabin_monitor.messages import utc_iso as utc_iso  # re-exported: every payload timestamp is made by it
from cabin_monitor.rules import RULE_NAMES, OccupantState
from cabin_monitor.rules.in_force import PRECEDENCE as PRECEDENCE
from cabin_monitor.rules.in_force import RuleSource

SCHEMA_VERSION: Literal[1] = 1


def _parse_iso(text: str) -> datetime:
    # fromisoformat accepts "Z" only from Python 3.11; the daemon supports 3.10.
    try:
        return datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        raise ValueError(f"not an ISO-8601 timestamp: {text!r}") from None


def utc_epoch_s(text: str) -> float:
    """A payload's UTC timestamp back as epoch seconds (the inverse of ``utc_iso``); ``ValueError`` if unreadable."""
    return _parse_iso(text).timestamp()


def _check_utc(text: str) -> str:
    if _parse_iso(text).utcoffset() != timedelta(0):
        raise ValueError(f"timestamp must be UTC ('Z' or +00:00): {text!r}")
    return text


def _check_uuid(text: str) -> str:
    try:
        uuid.UUID(text)
    except ValueError:
        raise ValueError(f"not a UUID: {text!r}") from None
    return text


UtcTimestamp = Annotated[
    str,
    AfterValidator(_check_utc),
    Field(description="UTC time, ISO-8601 with 'Z' or +00:00.", json_schema_extra={"format": "date-time"}),
]
UuidText = Annotated[str, AfterValidator(_check_uuid), Field(json_schema_extra={"format": "uuid"})]


class _Payload(BaseModel):
    """Base of every payload: unknown keys are errors, instances are immutable."""

    # Every field is always serialised, so the exported schema lists them all as required.
    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_serialization_defaults_required=True)
    # Optional fields left out of the published JSON while at their default (``omitted_at_default``).
    OMIT_AT_DEFAULT: ClassVar[frozenset[str]] = frozenset()


def omitted_at_default(payload: BaseModel) -> set[str]:
    """The fields of ``payload`` to leave out of its JSON: those of its ``OMIT_AT_DEFAULT`` at their default."""
    names: frozenset[str] = getattr(type(payload), "OMIT_AT_DEFAULT", frozenset())
    fields = type(payload).model_fields
    return {name for name in names if getattr(payload, name) == fields[name].default}


def _not_required(*names: str) -> Callable[[dict[str, Any]], None]:
    """A ``json_schema_extra`` that takes ``names`` (fields left out at their default) off the required list."""

    def edit(schema: dict[str, Any]) -> None:
        required = [name for name in cast(list[str], schema.get("required", [])) if name not in names]
        schema["required"] = required

    return edit


class EventPayload(_Payload):
    """One rule firing (``start``) or closing (``end``) for one occupant; topic ``events``."""

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: UuidText = Field(description="Unique per message; subscribers de-duplicate on it.")
    vehicle_id: str
    type: str = Field(description=" | ".join(RULE_NAMES))
    phase: Literal["start", "end"]
    occupant_id: str
    seat: str | None
    ts: UtcTimestamp
    started_ts: UtcTimestamp | None = Field(None, description="On 'end': when the event started.")
    start_event_id: UuidText | None = Field(None, description="On 'end': the event_id of its 'start'.")
    score: float
    emotions: dict[str, float] = Field(description="Emotion class -> probability.")
    rule: str = Field(description="The configured rule name.")
    severity: Severity
    frame_id: int
    interrupted: bool = Field(
        False,
        description="On 'end': true when the daemon run that started the event ended without ending it (a crash, "
        "a watchdog kill, a power cut) and the next start ended it; score is then 0 and emotions empty.",
    )

    @model_validator(mode="after")
    def _end_refers_to_start(self) -> EventPayload:
        # Consumers pair start and end on start_event_id, so the pairing fields belong to 'end' only.
        has_start = (self.started_ts is not None, self.start_event_id is not None)
        if self.phase == "end" and has_start != (True, True):
            raise ValueError("an 'end' event needs started_ts and start_event_id")
        if self.phase == "start" and (has_start != (False, False) or self.interrupted):
            raise ValueError("a 'start' event has no started_ts, start_event_id or interrupted")
        return self


class OccupantStatePayload(_Payload):
    """The latest smoothed reading of one occupant; topic ``occupants/<occupant_id>/state``, QoS 0."""

    schema_version: Literal[1] = SCHEMA_VERSION
    vehicle_id: str
    occupant_id: str
    seat: str | None
    ts: UtcTimestamp
    emotions: dict[str, float] = Field(description="Smoothed emotion class -> probability.")
    top_emotion: str
    active_events: list[str] = Field(description="Types of this occupant's open events.")


class CameraHealth(_Payload):
    """The frame source."""

    state: CameraState
    source: str
    fps: float
    frames: int
    corrupt_frames: int
    reopen_count: int
    last_error: str | None = None


class PipelineHealth(_Payload):
    """Frames through detection, alignment and the emotion model."""

    fps: float
    frames_processed: int
    dropped_frames: int = Field(description="Frames the camera mailbox replaced before inference took them.")
    stale_frames: int = Field(description="Frames skipped as older than max_frame_age_ms.")


class ModelHealth(_Payload):
    """The emotion model and the onnxruntime providers it runs on."""

    path: str
    providers_requested: list[str]
    provider_in_use: str


class OutboxHealth(_Payload):
    """The durable event queue."""

    state: OutboxState = Field(
        description="ok; disk_full or unwritable while the file cannot be written and events wait in memory."
    )
    depth: int = Field(description="Events waiting for the broker, on disk and in memory.")
    memory_depth: int = Field(
        description="Of those, events held in memory (and sent from there) until acknowledged or written to the file."
    )
    memory_unkept: int = Field(
        0,
        description="Of those, events no fallback file keeps (none configured, or it failed): lost if the daemon "
        "ends before they are acknowledged or written.",
    )
    dropped_total: int
    dropped_by_reason: dict[str, int] = Field(description="'full', 'expired' and 'memory_full' -> events dropped.")
    dropped_by_type: dict[str, int] = Field(
        default_factory=dict, description="Event type ('stress', …; 'unknown' without facts) -> events dropped."
    )
    last_error: str | None = Field(None, description="Why the file cannot be written, while state is not ok.")


class RefusalHealth(_Payload):
    """The last event the broker refused."""

    event_id: UuidText
    reason: str = Field(description="The PUBACK reason code's name, e.g. 'Not authorized'.")
    reason_code: int = Field(description="The MQTT 5 reason code, e.g. 135 (0x87).")
    ts: UtcTimestamp


class MqttHealth(_Payload):
    """The broker connection."""

    connected: bool
    reconnects: int
    refused_events: int = Field(description="Events the broker refused in a PUBACK (MQTT 5), each kept and retried.")
    last_refusal: RefusalHealth | None = None
    refusals_detectable: bool = Field(
        True,
        description="False on MQTT 3.1.1: a PUBACK cannot refuse, so events the broker's ACL denies are lost unseen.",
    )


class RemoteHealth(_Payload):
    """Operators' requests (config/set, config/get, config/reset) since start-up."""

    received: int
    answered: int = Field(description="Answers published on config/result (applied, refused or busy).")
    busy: int = Field(description="Answered 'busy' (over remote_config.max_requests_per_s), not applied.")
    dropped: int = Field(description="Dropped unanswered because the request queue was full.")
    queued: int


class HealthPayload(_Payload):
    """The daemon's health; topic ``health``, retained, QoS 1."""

    schema_version: Literal[1] = SCHEMA_VERSION
    vehicle_id: str
    ts: UtcTimestamp
    status: HealthStatus
    camera: CameraHealth
    pipeline: PipelineHealth
    model: ModelHealth
    outbox: OutboxHealth
    mqtt: MqttHealth
    remote: RemoteHealth | None = Field(None, description="Operators' requests; null without a broker.")
    last_error: str | None = None


class ConfigSetPayload(_Payload):
    """An operator's rules change; topic ``config/set``. ``rules`` is a partial ``RulesConfig`` mapping."""

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: str | None = Field(
        None, max_length=128, description="Echoed in the result; a change is applied at most once per request_id."
    )
    rules: dict[str, Any]
    shadow: StrictBool = Field(
        False,
        description="true: change the shadow rules (made from the live rules in force when there are none), "
        "never the live ones.",
    )


class ConfigRequestPayload(_Payload):
    """An operator's question or reset; topics ``config/get`` and ``config/reset`` (``{}`` is enough)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: str | None = Field(
        None, max_length=128, description="Echoed in the result; a reset is applied at most once per request_id."
    )
    shadow: StrictBool = Field(
        False,
        description="true: the shadow rules (get: read them; reset: drop their overrides, back to the file's "
        "rules_shadow or none).",
    )


class ConfigProblem(_Payload):
    """One problem with a config request."""

    path: str = Field(
        description="Dotted path of the offending key, or '(payload)', '(retained)', '(busy)', '(state)'."
    )
    message: str


class RuleOverride(_Payload):
    """One rule value an operator's override sets, and the value underneath it."""

    path: str = Field(description="Dotted path in the rules, e.g. 'stress.sustain_s'.")
    remote: Any = Field(description="The override's value: the one in force.")
    file: Any = Field(description="The configuration file's value (or the default) that it hides.")


class ConfigResultPayload(_Payload):
    """The answer to a config/set, config/get or config/reset request; topic ``config/result``, QoS 1."""

    schema_version: Literal[1] = SCHEMA_VERSION
    ts: UtcTimestamp
    action: RemoteAction = Field("set", description="What was asked: the topic the request came on.")
    request_id: str | None = None
    ok: bool
    errors: list[ConfigProblem] = Field(default_factory=list)
    rules: dict[str, Any] | None = Field(None, description="The effective rules after the request (on success).")
    sources: dict[str, RuleSource] | None = Field(
        None,
        description="On success: dotted path of every rule value -> 'remote', 'environment', 'file' or 'default'.",
    )
    overrides: list[RuleOverride] | None = Field(
        None, description="On success: every value the remote overrides set, with the file's value underneath."
    )
    precedence: str = Field(PRECEDENCE, description="How the configuration file and remote overrides combine.")
    shadow: bool = Field(
        False,
        description="Present and true when the request was about the shadow rules: rules, sources and overrides "
        "are then the shadow set's (rules null when there is none); left out otherwise.",
    )

    OMIT_AT_DEFAULT: ClassVar[frozenset[str]] = frozenset({"shadow"})
    model_config = ConfigDict(json_schema_extra=_not_required("shadow"))

    @model_validator(mode="after")
    def _ok_means_no_errors(self) -> ConfigResultPayload:
        if self.ok == bool(self.errors):
            raise ValueError("ok must be true exactly when errors is empty")
        return self

    @classmethod
    def failure(
        cls,
        message: str,
        *,
        wall_time_s: float,
        request_id: str | None = None,
        path: str = "(payload)",
        action: RemoteAction = "set",
        shadow: bool = False,
    ) -> ConfigResultPayload:
        """A refusal with a single error."""
        return cls(
            ts=utc_iso(wall_time_s),
            action=action,
            request_id=request_id,
            ok=False,
            errors=[ConfigProblem(path=path, message=message)],
            shadow=shadow,
        )


ChangeCause = Literal["start", "config/set", "config/reset", "reload"]


class ShadowRulesState(_Payload):
    """The shadow rules in force: run on the same readings, their events on ``shadow/events`` only."""

    rules: dict[str, Any] = Field(description="The shadow rules (a complete RulesConfig).")
    sources: dict[str, RuleSource] = Field(
        description="Dotted path of every rule value -> 'remote' (a shadow override), 'live' (the live rules the "
        "shadow set was made from), 'environment', 'file' (the file's rules_shadow) or 'default'."
    )
    overrides: list[RuleOverride] = Field(
        description="Every value the shadow overrides set, with the value underneath ('file': from rules_shadow "
        "or the live rules the set was made from)."
    )


class RulesStatePayload(_Payload):
    """The rules in force, where each value came from, and the last change; topic ``rules/state``, retained."""

    schema_version: Literal[1] = SCHEMA_VERSION
    vehicle_id: str
    ts: UtcTimestamp
    cause: ChangeCause = Field(description="What made this state: start-up, an operator's request, or SIGHUP.")
    request_id: str | None = Field(None, description="The operator's request_id, for config/set and config/reset.")
    rules: dict[str, Any] = Field(description="The effective rules (a complete RulesConfig).")
    sources: dict[str, RuleSource] = Field(
        description="Dotted path of every rule value -> 'remote' (an override), 'environment', 'file' or 'default'."
    )
    overrides: list[RuleOverride] = Field(description="Every value the remote overrides set, with the file's.")
    precedence: str = Field(PRECEDENCE, description="How the configuration file and remote overrides combine.")
    shadow: ShadowRulesState | None = Field(
        None, description="The shadow rules in force and their sources; left out while there are none."
    )

    OMIT_AT_DEFAULT: ClassVar[frozenset[str]] = frozenset({"shadow"})
    model_config = ConfigDict(json_schema_extra=_not_required("shadow"))


def event_payload(event: Event, vehicle_id: str) -> EventPayload:
    """The payload of a rules-engine event."""
    return EventPayload(
        event_id=event.event_id,
        vehicle_id=vehicle_id,
        type=event.type,
        phase=event.phase.value,
        occupant_id=event.occupant_id,
        seat=event.seat,
        ts=utc_iso(event.wall_time_s),
        started_ts=None if event.started_wall_time_s is None else utc_iso(event.started_wall_time_s),
        start_event_id=event.start_event_id,
        score=event.score,
        emotions=dict(event.emotions),
        rule=event.rule,
        severity=event.severity,
        frame_id=event.frame_id,
        interrupted=event.interrupted,
    )


def state_payloads(
    occupants: Sequence[OccupantState], vehicle_id: str, wall_time_s: float
) -> list[OccupantStatePayload]:
    """The state payload of every occupant the model has read so far."""
    return [
        OccupantStatePayload(
            vehicle_id=vehicle_id,
            occupant_id=occ.occupant_id,
            seat=occ.seat,
            ts=utc_iso(wall_time_s),
            emotions={k: round(v, 4) for k, v in occ.emotions.items()},
            top_emotion=max(occ.emotions, key=lambda k: occ.emotions[k]),
            active_events=list(occ.active_events),
        )
        for occ in occupants
        if occ.emotions
    ]


def health_payload(health: HealthSnapshot, vehicle_id: str) -> HealthPayload:
    """The health payload of a snapshot."""
    cam, sink = health.camera, health.sink
    refusal = sink.last_refusal
    return HealthPayload(
        vehicle_id=vehicle_id,
        ts=utc_iso(health.wall_time_s),
        status=health.status,
        camera=CameraHealth(
            state=cam.state,
            source=cam.source,
            fps=health.camera_fps,
            frames=cam.frames,
            corrupt_frames=cam.corrupt_frames,
            reopen_count=cam.reopen_count,
            last_error=cam.last_error,
        ),
        pipeline=PipelineHealth(
            fps=health.processed_fps,
            frames_processed=health.frames_processed,
            dropped_frames=health.dropped_frames,
            stale_frames=health.stale_frames,
        ),
        model=ModelHealth(
            path=health.model_path,
            providers_requested=list(health.providers_requested),
            provider_in_use=health.provider_in_use,
        ),
        outbox=OutboxHealth(
            state=sink.outbox_state,
            depth=sink.outbox_depth,
            memory_depth=sink.outbox_memory_depth,
            memory_unkept=sink.outbox_memory_unkept,
            dropped_total=sink.dropped_total,
            dropped_by_reason=dict(sink.dropped_by_reason),
            dropped_by_type=dict(sink.dropped_by_type),
            last_error=sink.outbox_error,
        ),
        mqtt=MqttHealth(
            connected=sink.connected,
            reconnects=sink.reconnects,
            refused_events=sink.refused_total,
            refusals_detectable=sink.refusals_detectable,
            last_refusal=None
            if refusal is None
            else RefusalHealth(
                event_id=refusal.event_id,
                reason=refusal.reason,
                reason_code=refusal.reason_code,
                ts=utc_iso(refusal.wall_time_s),
            ),
        ),
        remote=None if health.remote is None else RemoteHealth(**dataclasses.asdict(health.remote)),
        last_error=health.last_error,
    )


PAYLOADS: dict[str, type[BaseModel]] = {
    "event": EventPayload,
    "shadow_event": EventPayload,  # the same payload on shadow/events
    "occupant_state": OccupantStatePayload,
    "health": HealthPayload,
    "config_set": ConfigSetPayload,
    "config_request": ConfigRequestPayload,
    "config_result": ConfigResultPayload,
    "rules_state": RulesStatePayload,
}
OPERATOR_WRITTEN = frozenset({"config_set", "config_request"})


def json_schemas() -> dict[str, dict[str, Any]]:
    """Name -> JSON schema (draft 2020-12) of every MQTT JSON payload.

    Published payloads always carry every field, so their schemas require them all; the schemas of
    ``config_set`` and ``config_request``, which operators write, require only what they must send.
    """
    return {
        name: model.model_json_schema(mode="validation" if name in OPERATOR_WRITTEN else "serialization")
        for name, model in PAYLOADS.items()
    }
