"""The composition root: configuration plus command-line overrides, the parts wired into a pipeline,
and the signals that steer it. ``run``, ``demo`` and ``bench`` all build their pipeline here.

Where things go once it runs:

- a frame: ``vision.capture`` -> ``runtime.pipeline`` (latest-frame mailbox) -> ``runtime.processor``
  (detect, track, align, emotion, rules);
- an event: the rules engine -> the sink (``bus.mqtt`` through the durable ``bus.outbox``, with
  ``bus.fallback`` for what the outbox file cannot take and ``bus.ledger`` remembering open events, or
  ``bus.sinks.StdoutSink``), turned into its JSON by ``bus.payloads``;
- a remote request: ``config/set``, ``config/get`` or ``config/reset`` -> ``bus.mqtt`` (network thread,
  queued only) -> ``bus.remote`` (its own worker: rate-limited, checked, answered, and ``rules/state``
  published) -> ``rules.in_force`` (validated, persisted, put in force; ``rules.shadow`` for the shadow
  rules) -> the inference thread, between two frames; SIGHUP -> ``rules.in_force`` (the file reloaded under
  the overrides) -> ``rules/state``;
- with ``record.dir``: every input of the rules engine and every event -> ``runtime.recorder`` (its own
  thread) -> rotated Parquet files, for ``cabin-monitor replay`` and ``report``.

Parts are constructed in an order that needs no back-references: the request queue, the sink that fills
it, the worker that answers through the sink, then the pipeline that is given them all.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

import structlog
from pydantic import ValidationError

from cabin_monitor.bus.ledger import (
    LedgerError,
    OpenEvent,
    OpenEventLedger,
    fallback_ledger_path,
    interrupted_ends,
    left_open,
)
from cabin_monitor.bus.mqtt import MqttSink
from cabin_monitor.bus.outbox import Outbox, open_outbox
from cabin_monitor.bus.remote import RemoteRequests, RequestQueue, RuleSets
from cabin_monitor.bus.sinks import StdoutSink
from cabin_monitor.config import (
    CameraConfig,
    Config,
    ConfigError,
    describe_errors,
    load_config,
    parse_mqtt_url,
    rule_paths_from_environment,
)
from cabin_monitor.errors import ConfigurationError
from cabin_monitor.messages import FrameResult, HealthSnapshot, PipelineMetrics
from cabin_monitor.record.sink import RecordingSink
from cabin_monitor.rules.in_force import PRECEDENCE, RulesInForce, describe_overrides
from cabin_monitor.rules.shadow import ShadowRules
from cabin_monitor.runtime.pipeline import Pipeline
from cabin_monitor.runtime.ports import EventSink
from cabin_monitor.runtime.processor import FrameProcessor
from cabin_monitor.vision.capture import FrameSource, parse_source

if TYPE_CHECKING:
    from cabin_monitor.runtime.prometheus import PrometheusExporter
    from cabin_monitor.runtime.uploader import Uploader

log = structlog.get_logger("cabin_monitor.daemon")

SourceFactory = Callable[[CameraConfig, threading.Event], FrameSource]


@dataclass(frozen=True)
class Overrides:
    """Settings given on the command line, applied over the configuration file."""

    source: str | None = None
    loop: bool = False
    fast: bool = False  # process every frame of a video file, timed by the file's clock
    mqtt_url: str | None = None
    vehicle_id: str | None = None
    model_path: Path | None = None
    providers: tuple[str, ...] = ()
    record_dir: Path | None = None  # record what the rules engine sees into this folder


def load(config_path: Path | None, overrides: Overrides = Overrides()) -> Config:
    """The configuration file (or the defaults) with ``overrides`` applied; ``ConfigurationError`` if unusable."""
    cfg = load_config(config_path)
    camera: dict[str, Any] = {}
    if overrides.source:
        camera["source"] = overrides.source
    if overrides.loop:
        camera["loop"] = True
    if overrides.fast:
        camera["file_pacing"] = "fast"
    emotion: dict[str, Any] = {}
    if overrides.model_path:
        emotion["model_path"] = overrides.model_path
    if overrides.providers:
        emotion["providers"] = overrides.providers
    update: dict[str, Any] = {}
    if camera:
        update["camera"] = cfg.camera.model_copy(update=camera)
    if emotion:
        update["emotion"] = cfg.emotion.model_copy(update=emotion)
    if overrides.vehicle_id:
        update["vehicle_id"] = overrides.vehicle_id
    if overrides.record_dir:
        update["record"] = cfg.record.model_copy(update={"dir": overrides.record_dir})
    try:
        if overrides.mqtt_url:
            parse_mqtt_url(overrides.mqtt_url)
            update["mqtt"] = cfg.mqtt.model_copy(update={"url": overrides.mqtt_url})
        # Re-validate so overrides from the command line obey the same rules as the file; only the values
        # given go in, so the configuration still tells them from its defaults (rules/state's sources).
        return Config.model_validate(cfg.model_copy(update=update).model_dump(exclude_unset=True))
    except ValidationError as exc:
        # The file was valid: what fails now came from the command line. One line, as every start-up error.
        raise ConfigurationError("command line: " + "; ".join(describe_errors(exc))) from None
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None


def _log_fallback(outbox: Outbox) -> None:
    """Say what the outbox found in its fallback file, or why it has none that works."""
    if outbox.fallback_error is not None:
        log.error(
            "outbox fallback file unusable; events the outbox file cannot take are held in memory only",
            error=outbox.fallback_error,
        )
    if outbox.restored_from_fallback:
        log.warning(
            "events an earlier run kept in the outbox fallback file taken in",
            events=outbox.restored_from_fallback,
            fallback=str(outbox.fallback_path),
            outbox_path=str(outbox.path),
            memory_depth=outbox.memory_depth,
        )


def _left_open(ledger: OpenEventLedger, outbox: Outbox) -> list[OpenEvent]:
    """The events the previous run left open, by the ledger and the outbox; an unreadable ledger is logged and
    started afresh."""
    try:
        noted = ledger.load()
    except LedgerError as exc:
        log.error(
            "open-event ledger unreadable; starting a new one (events it held stay without an end)", error=str(exc)
        )
        noted = []
    return left_open(noted, outbox.pending(outbox.depth()))


def _end_interrupted(sink: EventSink, unended: list[OpenEvent]) -> None:
    """End, before anything else, each event the previous run started and never ended."""
    if not unended:
        return
    ends = interrupted_ends(unended, time.time())
    for event in ends:
        sink.submit_event(event)
    log.warning(
        "events the previous run left open ended as interrupted",
        events=len(ends),
        start_event_ids=[opened.event_id for opened in unended],
    )


def build_pipeline(
    cfg: Config,
    *,
    on_result: Callable[[FrameResult], None] | None = None,
    on_health: Callable[[HealthSnapshot, PipelineMetrics], None] | None = None,
    events_stream: TextIO | None = None,
    source_factory: SourceFactory = FrameSource,
    config_path: Path | None = None,
) -> Pipeline:
    """Every part of the daemon, wired: the stages, the rules in force, the sink and the frame source.

    With ``mqtt.url`` set, events go to the broker through the outbox and operators may read, change
    and reset the rules over ``config/*``; without it they are printed to ``events_stream`` (stdout).
    SIGHUP (once ``install_signals`` has run) reloads the rules from ``config_path``.
    """
    processor = FrameProcessor(cfg)
    try:
        rules = open_rules_in_force(cfg, processor)
        shadow = open_shadow_rules(cfg, processor, rules)
        sink: EventSink
        worker: RemoteRequests | None = None
        if cfg.mqtt.url:
            sink, worker = connect_broker(cfg, RuleSets(rules, shadow))
        else:
            sink = StdoutSink(cfg.vehicle_id, events_stream or sys.stdout)
        stop = threading.Event()
        return Pipeline(
            cfg,
            processor,
            source_factory(cfg.camera, stop),
            sink,
            rules,
            on_result=on_result,
            on_health=on_health,
            stop_event=stop,
            recorder=open_recorder(cfg, processor),
            remote=worker,
            on_reload=functools.partial(reload_rules, RuleSets(rules, shadow), worker, config_path),
            shadow=shadow,
        )
    except BaseException:
        # Release the detector now: left to the garbage collector at exit, MediaPipe's
        # finaliser prints a traceback after the one-line error.
        processor.close()
        raise


def open_rules_in_force(cfg: Config, processor: FrameProcessor) -> RulesInForce:
    """The rules in force: the file's, its environment's, and (with a broker) the persisted overrides, which
    the rules engine takes at once."""
    override_path = cfg.remote_config.override_path or cfg.resolved_state_dir() / "rules_override.json"
    rules = RulesInForce(
        cfg.rules,
        processor.model.class_names,
        override_path if cfg.mqtt.url else None,
        remembered_request_ids=cfg.remote_config.remembered_request_ids,
        environment_paths=rule_paths_from_environment(os.environ),
    )
    if rules.effective != cfg.rules:
        processor.reconfigure_rules(rules.effective)
    return rules


def open_shadow_rules(cfg: Config, processor: FrameProcessor, live: RulesInForce) -> ShadowRules:
    """The shadow rules: the file's ``rules_shadow`` and (with a broker) the persisted shadow overrides, which
    the shadow engine takes at once."""
    state_dir = cfg.resolved_state_dir()
    override_path = cfg.remote_config.shadow_override_path or state_dir / "rules_shadow_override.json"
    shadow = ShadowRules(
        cfg.rules_shadow,
        lambda: live.effective,
        processor.model.class_names,
        override_path if cfg.mqtt.url else None,
        remembered_request_ids=cfg.remote_config.remembered_request_ids,
        environment_paths=rule_paths_from_environment(os.environ, "rules_shadow"),
    )
    in_force = shadow.current()
    rules = None if in_force is None else in_force.rules
    if rules != cfg.rules_shadow:
        processor.reconfigure_shadow(rules)
    return shadow


def connect_broker(cfg: Config, rules: RuleSets) -> tuple[MqttSink, RemoteRequests | None]:
    """The broker's sink over the outbox, with what a previous run left open ended first, and (with
    ``remote_config.enabled``) the worker answering operators' requests: the request queue, then the
    sink that fills it, then the worker that answers through the sink."""
    state_dir = cfg.resolved_state_dir()
    outbox = open_logged_outbox(cfg, state_dir)
    requests = RequestQueue(cfg.remote_config) if cfg.remote_config.enabled else None
    held_events = cfg.resolved_fallback_path()
    ledger = OpenEventLedger(
        state_dir / "open_events.json", None if held_events is None else fallback_ledger_path(held_events)
    )
    unended = _left_open(ledger, outbox)
    sink = MqttSink(
        cfg.mqtt,
        cfg.vehicle_id,
        outbox,
        on_remote_request=requests.offer if requests is not None else None,
        ledger=ledger,
        max_request_bytes=cfg.remote_config.max_payload_bytes if requests is not None else None,
    )
    _end_interrupted(sink, unended)
    if requests is None:
        return sink, None
    return sink, RemoteRequests(requests, rules, sink, cfg.remote_config, cfg.vehicle_id)


def open_logged_outbox(cfg: Config, state_dir: Path) -> Outbox:
    """The outbox (``outbox.path``, else in the state folder), saying what it found: a damaged file moved aside,
    events in its fallback file."""
    outbox_path = cfg.outbox.path or state_dir / "outbox.sqlite"
    outbox, moved = open_outbox(
        outbox_path,
        cfg.outbox.max_events,
        cfg.outbox.max_age_s,
        cfg.outbox.memory_max_events,
        cfg.resolved_fallback_path(),
    )
    _log_fallback(outbox)
    if outbox.write_error is not None:
        log.error(
            "outbox file cannot be written at start-up; its events are read and new ones held in memory until it can",
            path=str(outbox_path),
            state=outbox.state,
            error=outbox.write_error,
        )
    if moved is not None:
        log.error(
            "outbox file damaged; moved aside, starting with an empty outbox",
            path=str(outbox_path),
            moved_to=str(moved.moved_to),
            reason=moved.reason,
            salvaged=moved.salvaged,
        )
    return outbox


def open_recorder(cfg: Config, processor: FrameProcessor) -> RecordingSink | None:
    """The recorder of ``record.dir`` (None when unset), describing this run: vehicle, model, rules in force."""
    folder = cfg.record.dir
    if folder is None:
        return None
    try:
        from cabin_monitor.record.format import RecordingMeta
        from cabin_monitor.runtime.recorder import Recorder
    except ImportError:
        raise ConfigurationError("record.dir needs pyarrow: pip install 'cabin-monitor[record]'") from None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(f"record.dir {folder}: cannot create the folder: {exc.strerror or exc}") from None
    info = processor.model.info
    meta = RecordingMeta(
        vehicle_id=cfg.vehicle_id,
        session_id=str(uuid.uuid4()),
        segment=0,
        class_names=info.class_names,
        model_version=info.version,
        model_name=info.path.name,
        rules=processor.rules.config,
        source_kind=parse_source(cfg.camera.source).kind,
        opened_wall_time_s=0.0,
        software_version=_software_version(),
    )
    return Recorder(cfg.record, meta, uploader=open_uploader(cfg))


def open_uploader(cfg: Config) -> Uploader | None:
    """The uploader of ``record.upload_url`` (None when unset); fsspec is loaded only then."""
    if cfg.record.upload_url is None:
        return None
    from cabin_monitor.runtime.uploader import Uploader

    return Uploader(cfg.record, cfg.vehicle_id)


def _software_version() -> str:
    try:
        return version("cabin-monitor")
    except PackageNotFoundError:
        return "unknown"


def reload_rules(sets: RuleSets, worker: RemoteRequests | None, config_path: Path | None) -> None:
    """SIGHUP's work, run by the supervising loop (never inside the signal handler): the file's ``rules`` and
    ``rules_shadow``, each under its operators' overrides; either one refused leaves it as it was."""
    if config_path is None:
        log.warning("SIGHUP ignored: no configuration file to reload")
        return
    try:
        cfg = load_config(config_path)
        in_force = sets.live.reload(cfg.rules)
    except (ConfigError, ValueError) as exc:
        log.error("SIGHUP reload refused; rules unchanged", error=str(exc))
        return
    try:
        shadow = sets.shadow.reload(cfg.rules_shadow)
    except ValueError as exc:
        log.error("SIGHUP: the file's rules_shadow refused; shadow rules unchanged", error=str(exc))
        shadow = sets.shadow.current()
    # The precedence, stated where the operator looks: an override still wins over the new file.
    log.info(
        "rules reloaded from the configuration file",
        path=str(config_path),
        remote_overrides_still_win=describe_overrides(in_force.overrides),
        precedence=PRECEDENCE,
        shadow_rules=shadow is not None,
    )
    if worker is not None:
        worker.publish_state("reload", in_force)


def install_signals(pipeline: Pipeline) -> None:
    """SIGTERM and SIGINT stop the pipeline; SIGHUP asks it for its reload (``build_pipeline``'s ``config_path``)."""

    # Handlers only set flags: they run on the main thread between any two bytecodes,
    # possibly while it holds a logging or rules lock.
    def on_stop(signum: int, _frame: FrameType | None) -> None:
        pipeline.request_stop(signal.Signals(signum).name)

    def on_reload(_signum: int, _frame: FrameType | None) -> None:
        pipeline.request_reload()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_reload)


def require_vehicle_settings(cfg: Config) -> None:
    """With a broker, ``run`` needs a real camera source and vehicle id: the bundled sample and the
    default id are for ``demo``, and would publish look-alike events onto a vehicle bus."""
    if not cfg.mqtt.url:
        return
    missing = []
    if cfg.camera.source.strip() == "sample":
        missing.append("camera.source (--source)")
    if cfg.vehicle_id == Config.model_fields["vehicle_id"].default:
        missing.append("vehicle_id (--vehicle-id)")
    if missing:
        raise ConfigurationError(
            f"run with a broker needs {' and '.join(missing)} set; `cabin-monitor demo` plays the bundled sample"
        )


def run(cfg: Config, config_path: Path | None) -> int:
    """The daemon: build it, steer it by signals, run it until it ends; returns the exit code."""
    require_vehicle_settings(cfg)
    # A reload request during start-up (model load, TensorRT build) must not kill the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    exporter = start_metrics(cfg)
    try:
        on_health = exporter.update if exporter is not None else None
        pipeline = build_pipeline(cfg, on_health=on_health, config_path=config_path)
        install_signals(pipeline)
        return pipeline.run()
    finally:
        if exporter is not None:
            exporter.stop()


def start_metrics(cfg: Config) -> PrometheusExporter | None:
    """The Prometheus endpoint, listening, when ``metrics.enabled``; None otherwise."""
    if not cfg.metrics.enabled:
        return None
    try:
        from cabin_monitor.runtime.prometheus import PrometheusExporter
    except ImportError:
        raise ConfigurationError(
            "metrics.enabled needs prometheus-client: pip install 'cabin-monitor[metrics]'"
        ) from None
    exporter = PrometheusExporter(version=_software_version(), state_dir=cfg.resolved_state_dir())
    exporter.start(cfg.metrics.host, cfg.metrics.port)
    log.info("metrics endpoint listening", url=f"http://{cfg.metrics.host}:{cfg.metrics.port}/metrics")
    return exporter


def run_demo(cfg: Config, on_result: Callable[[FrameResult], None]) -> int:
    """The daemon without a broker (events on stdout), each processed frame also given to ``on_result``."""
    cfg = cfg.model_copy(update={"mqtt": cfg.mqtt.model_copy(update={"url": None})})
    pipeline = build_pipeline(cfg, on_result=on_result)
    install_signals(pipeline)
    return pipeline.run()
