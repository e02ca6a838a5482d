"""What ``run`` refuses before it opens the camera, in one place: ``check-config`` reports every problem,
``run`` stops at the first, and both exit with that problem's exit code.

The checks, in the order ``run`` meets them: the vehicle settings a broker needs, the extras the
configuration needs (prometheus-client for ``metrics``, pyarrow for ``record.dir``), the camera source (a
GStreamer pipeline without GStreamer in OpenCV, a missing file), the models and the rules' classes, and the
TLS files. The daemon's side: may import config, vision, runtime and bus, never the fleet package.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cabin_monitor.bus.mqtt import build_ssl_context
from cabin_monitor.config import Config, parse_mqtt_url, partial_config
from cabin_monitor.daemon import require_vehicle_settings
from cabin_monitor.errors import CabinMonitorError, ConfigurationError
from cabin_monitor.rules import check_classes
from cabin_monitor.runtime.processor import FrameProcessor
from cabin_monitor.vision.capture import check_source
from cabin_monitor.vision.emotion import EmotionModel


@dataclass(frozen=True)
class Extra:
    """A module the configuration needs from an extra of the package, and the settings that need it."""

    setting: str
    module: str
    extra: str
    needed: Callable[[Config], bool]
    package: str

    def problem(self) -> ConfigurationError:
        return ConfigurationError(
            f"{self.setting} needs {self.package}: pip install 'cabin-monitor[{self.extra}]' "
            f"(deploy/install.sh --extras {self.extra})"
        )


EXTRAS = (
    Extra("metrics.enabled", "prometheus_client", "metrics", lambda cfg: cfg.metrics.enabled, "prometheus-client"),
    Extra("record.dir", "pyarrow", "record", lambda cfg: cfg.record.dir is not None, "pyarrow"),
)


def missing_extras(cfg: Config) -> list[CabinMonitorError]:
    """One problem per extra the configuration needs and this environment lacks (looked up, not imported)."""
    return [e.problem() for e in EXTRAS if e.needed(cfg) and importlib.util.find_spec(e.module) is None]


def _vehicle_settings(cfg: Config) -> list[CabinMonitorError]:
    try:
        require_vehicle_settings(cfg)
    except CabinMonitorError as exc:
        return [exc]
    return []


def _source(cfg: Config) -> list[CabinMonitorError]:
    try:
        check_source(cfg.camera.source)
    except CabinMonitorError as exc:
        return [exc]
    return []


def _models_and_rules(cfg: Config) -> list[CabinMonitorError]:
    try:
        FrameProcessor(cfg).close()
    except CabinMonitorError as exc:
        return [exc]
    return []


def _tls(cfg: Config) -> list[CabinMonitorError]:
    if not cfg.mqtt.url:
        return []
    _, _, url_tls = parse_mqtt_url(cfg.mqtt.url)
    if not (url_tls or cfg.mqtt.tls is not None):
        return []
    try:
        build_ssl_context(cfg.mqtt.tls)
    except CabinMonitorError as exc:
        return [exc]
    return []


# The quick checks first: run refuses those before it loads any model.
QUICK_CHECKS = (_vehicle_settings, missing_extras, _source)
SLOW_CHECKS = (_models_and_rules, _tls)


def problems(cfg: Config, *, quick_only: bool = False) -> list[CabinMonitorError]:
    """Every problem ``run`` would stop at before the camera, in the order it would meet them."""
    checks = QUICK_CHECKS if quick_only else (*QUICK_CHECKS, *SLOW_CHECKS)
    return [problem for check in checks for problem in check(cfg)]


def refuse_early(cfg: Config) -> None:
    """Raise the first problem of the quick checks (``run`` does this before loading anything)."""
    found = problems(cfg, quick_only=True)
    if found:
        raise found[0]


def prepare_state_folder(cfg: Config) -> None:
    """With a broker, create the state folder (outbox, open events, overrides) readable by the daemon's user
    alone (0700) where it does not exist yet; systemd makes it itself (``StateDirectory=``, its own mode).
    An existing folder is left as it is."""
    if not cfg.mqtt.url:
        return
    folder = cfg.resolved_state_dir()
    if folder.exists():
        return
    try:
        folder.mkdir(mode=0o700, parents=True)
        folder.chmod(0o700)  # mkdir's mode passes through the umask
    except OSError as exc:
        raise ConfigurationError(f"state folder {folder}: cannot create it: {exc.strerror or exc}") from None


def rule_class_problems(path: Path) -> list[str]:
    """The rules' class names checked against the model's for a file that does not validate as a whole, so
    that check-config lists them with the other problems in one pass (empty where the rules or emotion
    sections are themselves invalid: their problems are listed already)."""
    cfg = partial_config(path, ("rules", "emotion"))
    if cfg is None:
        return []
    try:
        check_classes(cfg.rules, EmotionModel(cfg.emotion).class_names)
    except CabinMonitorError as exc:  # ClassMismatchError, or a model that does not load
        return [str(exc)]
    return []
