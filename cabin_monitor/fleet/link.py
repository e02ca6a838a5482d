"""The fleet's MQTT 5 connection: a broker URL with its credentials, and a paho client made from it.

``mqtt://user:password@host:port`` (``mqtts://`` for TLS; ``ca_file``, ``cert_file`` and ``key_file`` for
a private CA and client certificates). Every fleet client speaks MQTT 5; ingest keeps a persistent session
(``clean_start`` false and a session expiry), so what the broker holds for it survives a restart of
either side.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cabin_monitor.config import parse_mqtt_url

SESSION_EXPIRY_S = 7 * 24 * 3600  # a consumer may be away for a week without its queued messages being dropped


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where the broker is and how to log in."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @classmethod
    def from_url(
        cls, url: str, *, ca_file: Path | None = None, cert_file: Path | None = None, key_file: Path | None = None
    ) -> BrokerAddress:
        """Parse ``mqtt[s]://[user[:password]@]host[:port]``; ``ValueError`` when it is not one."""
        parts = urlsplit(url)
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        netloc = parts.netloc.rpartition("@")[2]
        host, port, tls = parse_mqtt_url(f"{parts.scheme}://{netloc}")
        return cls(host, port, tls, username, password, ca_file, cert_file, key_file)

    def __str__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def make_client(address: BrokerAddress, client_id: str) -> mqtt.Client:
    """A paho MQTT 5 client for ``address`` (not connected); reconnects by itself once its loop runs."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if address.username is not None:
        client.username_pw_set(address.username, address.password)
    if address.tls:
        client.tls_set(
            ca_certs=None if address.ca_file is None else str(address.ca_file),
            certfile=None if address.cert_file is None else str(address.cert_file),
            keyfile=None if address.key_file is None else str(address.key_file),
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    client.reconnect_delay_set(1, 2)  # back before the vehicles' bridges (5 s and more)
    return client


def connect(
    client: mqtt.Client, address: BrokerAddress, *, receive_maximum: int = 100, persistent: bool = True
) -> None:
    """Start connecting, ``receive_maximum`` unacknowledged messages in flight at most; ``persistent``: the
    broker keeps the session (and queues for it) for ``SESSION_EXPIRY_S`` while it is away."""
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = SESSION_EXPIRY_S if persistent else 0
    props.ReceiveMaximum = receive_maximum
    client.connect_async(address.host, address.port, keepalive=15, clean_start=not persistent, properties=props)
