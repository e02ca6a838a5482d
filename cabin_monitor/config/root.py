"""The root of the configuration file: the vehicle, the state folder, and one field per section."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field

from cabin_monitor.config.base import Strict
from cabin_monitor.config.camera import CameraConfig
from cabin_monitor.config.detector import DetectorConfig
from cabin_monitor.config.emotion import EmotionConfig
from cabin_monitor.config.logs import LoggingConfig
from cabin_monitor.config.metrics import MetricsConfig
from cabin_monitor.config.mqtt import MqttConfig
from cabin_monitor.config.outbox import OutboxConfig
from cabin_monitor.config.pipeline import PipelineConfig
from cabin_monitor.config.privacy import PrivacyConfig
from cabin_monitor.config.record import RecordConfig
from cabin_monitor.config.remote import RemoteConfigConfig
from cabin_monitor.config.rules import RulesConfig
from cabin_monitor.config.tracker import TrackerConfig


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
    rules_shadow: RulesConfig | None = Field(
        None,
        description="A second rule set run on the same readings, whose events go to shadow/events only (never "
        "to events nor through the outbox), to try thresholds on real trips; null: none. Changed at run time "
        "by config/set with shadow: true.",
    )
    mqtt: MqttConfig = MqttConfig()
    outbox: OutboxConfig = OutboxConfig()
    remote_config: RemoteConfigConfig = RemoteConfigConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    logging: LoggingConfig = LoggingConfig()
    pipeline: PipelineConfig = PipelineConfig()
    metrics: MetricsConfig = MetricsConfig()
    record: RecordConfig = RecordConfig()

    def resolved_state_dir(self) -> Path:
        """Where the outbox and overrides live."""
        if self.state_dir is not None:
            return self.state_dir
        env = os.environ.get("STATE_DIRECTORY")
        if env:
            return Path(env.split(":")[0])
        return Path.home() / ".local" / "state" / "cabin-monitor"

    def resolved_fallback_path(self) -> Path | None:
        """The outbox's fallback file: ``outbox.fallback_path``, else ``$RUNTIME_DIRECTORY/held-events.sqlite``
        under systemd (``RuntimeDirectory=``), else none."""
        if self.outbox.fallback_path is not None:
            return self.outbox.fallback_path
        env = os.environ.get("RUNTIME_DIRECTORY")
        return Path(env.split(":")[0]) / "held-events.sqlite" if env else None
