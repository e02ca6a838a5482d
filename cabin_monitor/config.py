"""Daemon configuration: one YAML file mirrored by a tree of strict pydantic models.

Every field has a default and a description, names carry their units, and an
unknown key is an error. Environment variables named
``CABIN_MONITOR__SECTION__FIELD`` override single values (the value is read
as YAML, so ``CABIN_MONITOR__MQTT__KEEPALIVE_S=15`` is a number).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

ENV_PREFIX = "CABIN_MONITOR__"
EMOTIONS_7 = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger")
NEGATIVE_7 = ("sadness", "anger", "fear", "disgust")


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class CameraConfig(Strict):
    """Where frames come from."""

    source: str = Field(
        "sample",
        description="V4L2 index ('0'), device path ('/dev/video0'), video file, RTSP/HTTP URL, "
        "GStreamer pipeline ('gst:...'), or 'sample' for the bundled sample video.",
    )
    loop: bool = Field(False, description="Replay a video file from the start when it ends.")
    file_pacing: Literal["realtime", "fast"] = Field(
        "realtime",
        description="Video files: 'realtime' plays at the file's frame rate and drops like a camera; "
        "'fast' reads every frame as fast as the pipeline takes them, timed by the file's own clock.",
    )
    width_px: int | None = Field(None, ge=16, le=8192, description="Requested camera width (cameras only).")
    height_px: int | None = Field(None, ge=16, le=8192, description="Requested camera height (cameras only).")
    fps: float | None = Field(None, gt=0, le=240, description="Requested camera frame rate (cameras only).")
    read_timeout_s: float = Field(2.0, gt=0, le=60, description="No frame for this long counts as a stalled camera.")
    reopen_initial_s: float = Field(0.5, gt=0, le=60, description="First wait before reopening a failed camera.")
    reopen_max_s: float = Field(10.0, gt=0, le=600, description="Longest wait between reopen attempts.")
    max_corrupt_frames: int = Field(
        30, ge=1, description="Consecutive corrupt frames after which the source is reopened."
    )

    @model_validator(mode="after")
    def _backoff_order(self) -> CameraConfig:
        if self.reopen_max_s < self.reopen_initial_s:
            raise ValueError("reopen_max_s must be >= reopen_initial_s")
        return self


class DetectorConfig(Strict):
    """Face detector backend."""

    type: Literal["blazeface", "yunet"] = Field("blazeface", description="Detector backend.")
    range: Literal["short", "full"] = Field(
        "short", description="BlazeFace model: 'short' (front seats, ~2 m) or 'full' (rear seats, ~5 m)."
    )
    model_path: Path | None = Field(None, description="Detector model file; default: the bundled one for the type.")
    min_score: float = Field(0.6, gt=0, lt=1, description="Minimum detection confidence.")
    max_faces: int = Field(5, ge=1, le=32, description="Most faces kept per frame (highest scores first).")
    min_face_px: int = Field(32, ge=8, description="Faces whose box is narrower than this are ignored.")


class SeatZone(Strict):
    """A seat and the part of the image where its occupant's face appears."""

    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
    zone: tuple[float, float, float, float] = Field(
        ..., description="x0, y0, x1, y1 as fractions of the image width/height (0..1)."
    )

    @field_validator("zone")
    @classmethod
    def _zone_inside_image(cls, v: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = v
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError("zone must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
        return v


class TrackerConfig(Strict):
    """Occupant tracking across frames."""

    min_iou: float = Field(0.2, ge=0, le=1, description="Least box overlap to continue a track.")
    max_centre_jump: float = Field(
        0.6, gt=0, description="Largest centre move between frames, in face widths, when boxes do not overlap."
    )
    forget_after_s: float = Field(30.0, gt=0, description="A track unseen for this long is dropped.")
    confirm_frames: int = Field(
        3,
        ge=1,
        le=30,
        description="A new face becomes an occupant after this many consecutive detections "
        "(one-frame false detections never reach the rules).",
    )
    seats: tuple[SeatZone, ...] = Field((), description="Seat zones; a face is in the seat holding its box centre.")

    @field_validator("seats")
    @classmethod
    def _unique_seats(cls, v: tuple[SeatZone, ...]) -> tuple[SeatZone, ...]:
        names = [s.name for s in v]
        if len(set(names)) != len(names):
            raise ValueError(f"seat names must be unique, got {names}")
        return v


class EmotionConfig(Strict):
    """The EmotionalDAN ONNX model and how onnxruntime runs it."""

    model_path: Path | None = Field(None, description="ONNX file; default: the bundled emotionaldan-7.onnx.")
    providers: tuple[Literal["tensorrt", "cuda", "cpu"], ...] = Field(
        ("cpu",), min_length=1, description="onnxruntime execution providers in order of preference."
    )
    strict_providers: bool = Field(
        False, description="Fail start-up unless the first provider asked for is the one in use."
    )
    intra_op_threads: int = Field(0, ge=0, le=64, description="CPU threads per inference; 0 lets onnxruntime pick.")
    max_batch: int = Field(8, ge=1, le=64, description="Most faces sent in one inference call.")
    trt_cache_dir: Path | None = Field(None, description="TensorRT engine cache folder (speeds up later starts).")
    trt_fp16: bool = Field(True, description="Let TensorRT build FP16 engines.")


class StressRuleConfig(Strict):
    """Sustained negative emotion."""

    enabled: bool = True
    classes: tuple[str, ...] = Field(NEGATIVE_7, min_length=1, description="Classes whose probabilities are summed.")
    enter_score: float = Field(0.6, gt=0, le=1, description="Smoothed group score that opens the event...")
    sustain_s: float = Field(3.0, ge=0, le=600, description="...when held at or above it for this long.")
    exit_score: float = Field(0.4, ge=0, lt=1, description="Score below which the event may close...")
    release_s: float = Field(1.5, ge=0, le=600, description="...once it has stayed below for this long.")
    cooldown_s: float = Field(30.0, ge=0, le=86400, description="No new stress event this soon after one ended.")
    severity: Literal["info", "warning", "critical"] = "warning"

    @model_validator(mode="after")
    def _hysteresis(self) -> StressRuleConfig:
        if self.exit_score >= self.enter_score:
            raise ValueError(f"exit_score ({self.exit_score}) must be below enter_score ({self.enter_score})")
        return self


class UnexpectedExpressionRuleConfig(Strict):
    """A sudden, strong expression onset against the occupant's own recent baseline."""

    enabled: bool = True
    classes: tuple[str, ...] = Field(
        ("fear", "surprise", "anger", "disgust"), min_length=1, description="Classes whose probabilities are summed."
    )
    onset_window_s: float = Field(0.5, gt=0, le=10, description="Time constant of the fast average.")
    baseline_window_s: float = Field(20.0, gt=0, le=3600, description="Time constant of the slow baseline.")
    min_history_s: float = Field(3.0, ge=0, le=3600, description="Baseline needs this much history first.")
    min_score: float = Field(0.5, gt=0, le=1, description="Fast average must reach this...")
    min_rise: float = Field(0.3, gt=0, le=1, description="...and exceed the baseline by this much.")
    exit_score: float = Field(0.3, ge=0, lt=1, description="Event closes when the fast average falls below this.")
    max_duration_s: float = Field(10.0, gt=0, le=3600, description="An onset event closes after this long at most.")
    cooldown_s: float = Field(10.0, ge=0, le=86400, description="No new onset event this soon after one ended.")
    severity: Literal["info", "warning", "critical"] = "warning"

    @model_validator(mode="after")
    def _window_order(self) -> UnexpectedExpressionRuleConfig:
        if self.baseline_window_s <= self.onset_window_s:
            raise ValueError("baseline_window_s must be longer than onset_window_s")
        if self.exit_score >= self.min_score:
            raise ValueError(f"exit_score ({self.exit_score}) must be below min_score ({self.min_score})")
        return self


class OccupantLostRuleConfig(Strict):
    """A tracked face that has gone."""

    enabled: bool = True
    lost_after_s: float = Field(3.0, gt=0, le=3600, description="Unseen this long opens the event.")
    severity: Literal["info", "warning", "critical"] = "info"


class RulesConfig(Strict):
    """The anomaly rules; fleet operators tune these (also over MQTT config/set)."""

    smoothing_s: float = Field(
        0.7, ge=0, le=60, description="Time constant of the per-occupant probability smoothing; 0 = none."
    )
    stress: StressRuleConfig = StressRuleConfig()
    unexpected_expression: UnexpectedExpressionRuleConfig = UnexpectedExpressionRuleConfig()
    occupant_lost: OccupantLostRuleConfig = OccupantLostRuleConfig()

    def class_names_used(self) -> set[str]:
        """Every emotion class name a rule refers to."""
        used: set[str] = set()
        if self.stress.enabled:
            used |= set(self.stress.classes)
        if self.unexpected_expression.enabled:
            used |= set(self.unexpected_expression.classes)
        return used


class TlsConfig(Strict):
    """MQTT over TLS."""

    ca_file: Path | None = Field(None, description="CA bundle that signed the broker's certificate.")
    cert_file: Path | None = Field(None, description="Client certificate (mutual TLS).")
    key_file: Path | None = Field(None, description="Client private key (mutual TLS).")
    insecure_skip_verify: bool = Field(False, description="Do not check the broker's hostname (test benches only).")

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


class MqttConfig(Strict):
    """Vehicle bus connection; with no url, events are printed to stdout as JSON lines."""

    url: str | None = Field(None, description="mqtt://host:port or mqtts://host:port; null prints events.")
    client_id: str | None = Field(None, max_length=128, description="Default: cabin-monitor-<vehicle_id>.")
    username: str | None = None
    password: SecretStr | None = None
    tls: TlsConfig | None = None
    topic_prefix: str = Field(
        "cabin", pattern=r"^[A-Za-z0-9_\-/]+$", description="Topics are <prefix>/<vehicle_id>/..."
    )
    keepalive_s: int = Field(30, ge=5, le=3600)
    state_interval_s: float = Field(1.0, ge=0, le=3600, description="Occupant state publish period; 0 = off.")
    health_interval_s: float = Field(10.0, gt=0, le=3600, description="Health is also published on every change.")
    reconnect_min_s: float = Field(0.5, gt=0, le=60, description="First reconnect wait (doubles, with jitter).")
    reconnect_max_s: float = Field(30.0, gt=0, le=3600, description="Longest reconnect wait.")
    max_inflight: int = Field(20, ge=1, le=1000, description="Unacknowledged QoS 1 messages at once.")

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, v: str | None) -> str | None:
        if v is not None:
            parse_mqtt_url(v)
        return v

    @model_validator(mode="after")
    def _backoff_order(self) -> MqttConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self


class OutboxConfig(Strict):
    """Durable event queue between the rules engine and the broker."""

    path: Path | None = Field(None, description="SQLite file; default: <state_dir>/outbox.sqlite.")
    max_events: int = Field(10000, ge=10, description="Most events held; beyond it the oldest low-severity go.")
    max_age_s: float = Field(7 * 86400, gt=0, description="Events older than this are dropped (and counted).")


class RemoteConfigConfig(Strict):
    """The config/set topic through which operators change the rules."""

    enabled: bool = True
    max_payload_bytes: int = Field(16384, ge=64, le=1 << 20)
    override_path: Path | None = Field(
        None, description="Persisted overrides; default: <state_dir>/rules_override.json."
    )


class PrivacyConfig(Strict):
    """Pixels never leave the process unless enabled here."""

    save_crops: bool = Field(False, description="Write aligned face crops to crops_dir (off by default).")
    crops_dir: Path | None = Field(None, description="Folder for saved crops; required when save_crops is on.")

    @model_validator(mode="after")
    def _dir_when_saving(self) -> PrivacyConfig:
        if self.save_crops and self.crops_dir is None:
            raise ValueError("save_crops needs crops_dir")
        return self


class LoggingConfig(Strict):
    """Structured logs."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = Field("auto", description="auto: console on a TTY, JSON otherwise.")
    stats_interval_s: float = Field(10.0, gt=0, le=3600, description="Period of the fps/latency/drops log line.")


class PipelineConfig(Strict):
    """Pacing and liveness."""

    max_frame_age_ms: float = Field(
        500.0, gt=0, description="Frames older than this when inference is free are skipped (and counted)."
    )
    watchdog_stall_s: float = Field(
        5.0, gt=0, description="No frame through the pipeline for this long stops feeding the systemd watchdog."
    )


class Config(Strict):
    """Root of the daemon configuration file."""

    vehicle_id: str = Field("demo-vehicle", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
    state_dir: Path | None = Field(
        None,
        description="Writable folder for the outbox and overrides; default: $STATE_DIRECTORY or "
        "~/.local/state/cabin-monitor.",
    )
    camera: CameraConfig = CameraConfig()
    detector: DetectorConfig = DetectorConfig()
    tracker: TrackerConfig = TrackerConfig()
    emotion: EmotionConfig = EmotionConfig()
    rules: RulesConfig = RulesConfig()
    mqtt: MqttConfig = MqttConfig()
    outbox: OutboxConfig = OutboxConfig()
    remote_config: RemoteConfigConfig = RemoteConfigConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    logging: LoggingConfig = LoggingConfig()
    pipeline: PipelineConfig = PipelineConfig()

    def resolved_state_dir(self) -> Path:
        """Where the outbox and overrides live."""
        if self.state_dir is not None:
            return self.state_dir
        env = os.environ.get("STATE_DIRECTORY")
        if env:
            return Path(env.split(":")[0])
        return Path.home() / ".local" / "state" / "cabin-monitor"


def parse_mqtt_url(url: str) -> tuple[str, int, bool]:
    """Split ``mqtt://host:port`` / ``mqtts://host:port`` into (host, port, tls)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"MQTT URL must look like mqtt://host:port or mqtts://host:port, got {url!r}")
    tls = scheme in ("mqtts", "ssl")
    rest = rest.rstrip("/")
    host, colon, port_text = rest.rpartition(":")
    if not colon:
        host, port_text = rest, ""
    host = host.strip("[]")
    if not host:
        raise ValueError(f"MQTT URL has no host: {url!r}")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"MQTT URL port must be 1..65535, got {port_text!r}")
        port = int(port_text)
    else:
        port = 8883 if tls else 1883
    return host, port, tls


class ConfigError(Exception):
    """A configuration file that cannot be used, with one line per problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid configuration\n" + "\n".join(f"  {p}" for p in problems))


def _yaml_lines(text: str) -> dict[tuple[str | int, ...], int]:
    """Line number (1-based) of every key path in a YAML document."""
    lines: dict[tuple[str | int, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str | int, ...]) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = (*path, str(key.value))
                lines[child] = key.start_mark.line + 1
                walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def describe_errors(exc: ValidationError, lines: Mapping[tuple[str | int, ...], int] | None = None) -> list[str]:
    """One readable line per validation error: ``path.to.field (line N): message``."""
    out = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-after")))
        path = ".".join(str(p) for p in loc) or "(top level)"
        where = ""
        if lines:
            for n in range(len(loc), -1, -1):
                if loc[:n] in lines:
                    where = f" (line {lines[loc[:n]]})"
                    break
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not a setting here; check the spelling)"
        out.append(f"{path}{where}: {msg}")
    return out


def apply_env_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``CABIN_MONITOR__A__B=value`` settings applied."""
    result: dict[str, Any] = _deep_copy(raw)
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        value = yaml.safe_load(text) if text.strip() else None
        node = result
        for key in path[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        node[path[-1]] = value
    return result


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def parse_config_text(text: str, source: str = "<config>", environ: Mapping[str, str] | None = None) -> Config:
    """Parse and validate YAML text; raises ``ConfigError`` listing every problem."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [f"not valid YAML{where}: {problem}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"(top level): expected a mapping of sections, got {type(raw).__name__}"])
    raw = apply_env_overrides(raw, os.environ if environ is None else environ)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(source, describe_errors(exc, _yaml_lines(text))) from None


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Load a YAML file (or the defaults when ``path`` is None) with environment overrides."""
    if path is None:
        return parse_config_text("", "<defaults>", environ)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read the file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), ["the file is not UTF-8 text"]) from None
    return parse_config_text(text, str(path), environ)


def merge_rules(base: RulesConfig, patch: Mapping[str, Any]) -> RulesConfig:
    """Apply a partial rules mapping on top of ``base``; raises ``ValidationError`` on any problem."""
    merged = deep_merge(base.model_dump(mode="json"), dict(patch))
    return RulesConfig.model_validate(merged)


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``patch`` merged in, mapping by mapping (patch values win)."""
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
