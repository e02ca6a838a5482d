"""Daemon configuration: one YAML file mirrored by a tree of strict pydantic models.

Every field has a default and a description, names carry their units, and an unknown key is an
error. One module per section of the file (``camera``, ``detector``, ``tracker``, ``emotion``,
``rules``, ``mqtt``, ``outbox``, ``remote`` for ``remote_config``, ``privacy``, ``logs`` for
``logging``, ``pipeline``, ``metrics``, ``record``), ``root`` for the file itself, and ``loader`` for reading it.
"""

from cabin_monitor.config.base import Strict
from cabin_monitor.config.camera import CameraConfig
from cabin_monitor.config.detector import DetectorConfig, DetectRegion
from cabin_monitor.config.emotion import EmotionConfig
from cabin_monitor.config.loader import (
    ENV_PREFIX,
    ConfigError,
    Problem,
    apply_env_overrides,
    deep_merge,
    describe_errors,
    load_config,
    merge_rules,
    parse_config_text,
    partial_config,
    paths_set,
    rule_paths_from_environment,
    validation_problems,
)
from cabin_monitor.config.logs import LoggingConfig
from cabin_monitor.config.metrics import MetricsConfig
from cabin_monitor.config.mqtt import MqttConfig, TlsConfig, parse_mqtt_url
from cabin_monitor.config.outbox import OutboxConfig
from cabin_monitor.config.pipeline import PipelineConfig
from cabin_monitor.config.privacy import PrivacyConfig
from cabin_monitor.config.record import RecordConfig
from cabin_monitor.config.remote import RemoteConfigConfig
from cabin_monitor.config.root import Config
from cabin_monitor.config.rules import (
    EMOTIONS_7,
    NEGATIVE_7,
    OccupantLostRuleConfig,
    RulesConfig,
    StressRuleConfig,
    UnexpectedExpressionRuleConfig,
)
from cabin_monitor.config.tracker import SeatZone, TrackerConfig
from cabin_monitor.config.urls import redacted

__all__ = [
    "EMOTIONS_7",
    "ENV_PREFIX",
    "NEGATIVE_7",
    "CameraConfig",
    "Config",
    "ConfigError",
    "DetectRegion",
    "DetectorConfig",
    "EmotionConfig",
    "LoggingConfig",
    "MetricsConfig",
    "MqttConfig",
    "OccupantLostRuleConfig",
    "OutboxConfig",
    "PipelineConfig",
    "PrivacyConfig",
    "Problem",
    "RecordConfig",
    "RemoteConfigConfig",
    "RulesConfig",
    "SeatZone",
    "StressRuleConfig",
    "Strict",
    "TlsConfig",
    "TrackerConfig",
    "UnexpectedExpressionRuleConfig",
    "apply_env_overrides",
    "deep_merge",
    "describe_errors",
    "load_config",
    "merge_rules",
    "parse_config_text",
    "parse_mqtt_url",
    "partial_config",
    "paths_set",
    "redacted",
    "rule_paths_from_environment",
    "validation_problems",
]
