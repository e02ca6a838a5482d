"""The ``mqtt`` section: the vehicle bus connection, TLS included."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from cabin_monitor.config.base import Strict
from cabin_monitor.config.urls import has_user_info, redacted


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


_TOPIC_LEVELS = re.compile(r"[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*")


class MqttConfig(Strict):
    """Vehicle bus connection; with no url, events are printed to stdout as JSON lines."""

    url: str | None = Field(None, description="mqtt://host:port or mqtts://host:port; null prints events.")
    client_id: str | None = Field(None, max_length=128, description="Default: cabin-monitor-<vehicle_id>.")
    username: str | None = None
    password: SecretStr | None = None
    tls: TlsConfig | None = None
    topic_prefix: str = Field(
        "cabin",
        description="Topics are <prefix>/<vehicle_id>/...; one or more topic levels separated by '/', none "
        "empty, no wildcard (+, #).",
    )
    keepalive_s: int = Field(30, ge=5, le=3600)
    state_interval_s: float = Field(1.0, ge=0, le=3600, description="Occupant state publish period; 0 = off.")
    health_interval_s: float = Field(10.0, gt=0, le=3600, description="Health is also published on every change.")
    reconnect_min_s: float = Field(0.5, gt=0, le=60, description="First reconnect wait (doubles, with jitter).")
    reconnect_max_s: float = Field(30.0, gt=0, le=3600, description="Longest reconnect wait.")
    max_inflight: int = Field(20, ge=1, le=1000, description="Unacknowledged QoS 1 messages at once.")
    protocol: Literal["5", "3.1.1"] = Field(
        "5",
        description="MQTT version. 5 lets the broker refuse an event in its PUBACK (e.g. not authorized by "
        "the ACL), so it stays in the outbox; 3.1.1 brokers accept and silently drop what the ACL denies.",
    )

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_as_text(cls, v: Any) -> Any:
        # YAML reads `protocol: 5` as a number.
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("topic_prefix")
    @classmethod
    def _topic_levels(cls, v: str) -> str:
        if "+" in v or "#" in v:
            raise ValueError(f"{v!r} holds an MQTT wildcard (+ or #): a topic to publish on cannot")
        if any(not level for level in v.split("/")):
            raise ValueError(f"{v!r} has an empty topic level: no leading, trailing or doubled '/'")
        if not _TOPIC_LEVELS.fullmatch(v):
            raise ValueError(f"{v!r}: topic levels are letters, digits, '_' and '-', separated by '/'")
        return v

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


def parse_mqtt_url(url: str) -> tuple[str, int, bool]:
    """Split ``mqtt://host:port`` / ``mqtts://host:port`` into (host, port, tls).

    Credentials in the URL are refused (they would be read as part of the host, and shown wherever the URL
    is): they go in ``mqtt.username`` and ``mqtt.password``. No message repeats a password.
    """
    if has_user_info(url):
        raise ValueError(
            f"MQTT URL must not carry credentials ({redacted(url)!r}): set mqtt.username and mqtt.password "
            "(CABIN_MONITOR__MQTT__PASSWORD) instead"
        )
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"MQTT URL must look like mqtt://host:port or mqtts://host:port, got {redacted(url)!r}")
    tls = scheme in ("mqtts", "ssl")
    rest = rest.rstrip("/")
    host, colon, port_text = rest.rpartition(":")
    if not colon:
        host, port_text = rest, ""
    host = host.strip("[]")
    if not host:
        raise ValueError(f"MQTT URL has no host: {redacted(url)!r}")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"MQTT URL port must be 1..65535, got {port_text!r}")
        port = int(port_text)
    else:
        port = 8883 if tls else 1883
    return host, port, tls
