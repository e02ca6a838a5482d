"""The broker connection, with paho behind it: connect, reconnect, publish, and paho's callbacks as plain calls.

Each connection is a fresh paho client (TLS and credentials from the config, the retained ``offline``
status as last will, the retained ``online`` birth first on every connect), so paho never re-sends
anything on its own. ``run`` connects, reconnecting with jittered exponential backoff, and hands each
connection to the caller's ``serve``. Acknowledgements come out as ``PubAck``s, messages on the
subscribed topics as ``(topic, payload, retained)`` (on MQTT 5 the retain flag as published, also
for a retained message that arrives while connected); both on the network thread, which must only hand
them over. Knows no outbox, no events and no payloads.

Imports ``bus.sender`` (``PubAck``), ``bus.backoff``, ``config`` and ``errors``.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
from collections.abc import Callable, Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from structlog.typing import FilteringBoundLogger

from cabin_monitor.bus.backoff import Backoff
from cabin_monitor.bus.sender import PubAck
from cabin_monitor.config import MqttConfig, TlsConfig, parse_mqtt_url
from cabin_monitor.errors import ConfigurationError, RuntimeFault

CONNECT_TIMEOUT_S = 5.0  # TCP connect, TLS handshake, and again for the CONNACK
OFFLINE_TIMEOUT_S = 2.0  # wait for the PUBACK of the 'offline' status on stop
STOP_S = CONNECT_TIMEOUT_S + OFFLINE_TIMEOUT_S  # the longest ``run`` takes to return once stop is set
IDLE_EVERY_S = 1.0  # how often ``idle`` runs while waiting to reconnect
PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}


def publish_packet_bytes(topic: str, payload: bytes, qos: int) -> int:
    """The size of the MQTT 5 PUBLISH packet carrying ``payload`` on ``topic`` (no properties)."""
    remaining = 2 + len(topic.encode()) + (2 if qos > 0 else 0) + 1 + len(payload)
    length_bytes = 1 if remaining < 128 else 2 if remaining < 16384 else 3 if remaining < 2097152 else 4
    return 1 + length_bytes + remaining


class TlsSetupError(RuntimeFault):
    """A TLS file named in the MQTT configuration is missing, unreadable or not usable.

    A setup error: restarting cannot fix the file, so it exits like a configuration error.
    """

    exit_code = ConfigurationError.exit_code


def build_ssl_context(tls: TlsConfig | None) -> ssl.SSLContext:
    """A client context from the config; raises ``TlsSetupError`` naming the file that cannot be used."""
    tls = tls or TlsConfig()
    for name in ("ca_file", "cert_file", "key_file"):
        path = getattr(tls, name)
        if path is not None:
            try:
                path.open("rb").close()
            except OSError as exc:
                raise TlsSetupError(f"mqtt.tls.{name}: cannot read {path}: {exc.strerror or exc}") from None
    try:
        context = ssl.create_default_context(cafile=None if tls.ca_file is None else str(tls.ca_file))
    except (ssl.SSLError, OSError) as exc:
        raise TlsSetupError(f"mqtt.tls.ca_file: {tls.ca_file} is not a PEM CA bundle: {exc}") from None
    if tls.cert_file is not None and tls.key_file is not None:
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        except (ssl.SSLError, OSError) as exc:
            raise TlsSetupError(
                f"mqtt.tls.cert_file/key_file: {tls.cert_file} and {tls.key_file} are not a matching PEM "
                f"certificate and key: {exc}"
            ) from None
    context.check_hostname = not tls.insecure_skip_verify
    return context


class BrokerClient:
    """One connection at a time to the broker named by the config; ``run`` on one thread, ``publish`` from any."""

    def __init__(
        self,
        config: MqttConfig,
        client_id: str,
        status_topic: str,
        stop: threading.Event,
        backoff: Backoff,
        logger: FilteringBoundLogger,
        *,
        subscriptions: Sequence[str] = (),
        on_message: Callable[[str, bytes, bool], None] | None = None,
        on_puback: Callable[[PubAck], None],
        on_change: Callable[[], None],
        pending: Callable[[], int],
        max_packet_bytes: int | None = None,
    ) -> None:
        if config.url is None:
            raise ValueError("mqtt.url is not set")
        self._config = config
        self._host, self._port, url_tls = parse_mqtt_url(config.url)
        # Built now so that a missing or bad certificate stops start-up instead of failing every reconnect.
        self._ssl_context = build_ssl_context(config.tls) if url_tls or config.tls is not None else None
        self._client_id = client_id
        self._status_topic = status_topic
        self._stop = stop
        self._backoff = backoff
        self._log = logger
        self._subscriptions = list(subscriptions)
        self._on_message_handler = on_message
        self._on_puback = on_puback
        self._on_change = on_change  # something for the serving thread to look at
        self._pending = pending  # events waiting, for the log lines
        self._max_packet_bytes = max_packet_bytes  # MQTT 5: the broker delivers no larger packet
        self.broker = f"{self._host}:{self._port}"
        self._connack = threading.Event()  # the CONNACK came (or the wait is pointless)
        self._link_lost = threading.Event()
        self._connected = False
        self._client: mqtt.Client | None = None
        self._connects = 0
        self._broker_max_packet_bytes: int | None = None  # the CONNACK's Maximum Packet Size (MQTT 5)
        self._too_large_topics: set[str] = set()  # logged once each

    @property
    def connected(self) -> bool:
        """Whether the broker accepted the current connection and it has not dropped."""
        return self._connected

    @property
    def link_lost(self) -> bool:
        """Whether the current connection dropped."""
        return self._link_lost.is_set()

    @property
    def reconnects(self) -> int:
        """Connections established after the first one."""
        return max(0, self._connects - 1)

    def interrupt(self) -> None:
        """Stop was asked: end a wait for the CONNACK now."""
        self._connack.set()

    def fits(self, topic: str, payload: bytes, *, qos: int) -> bool:
        """Whether the broker takes a message this large (MQTT 5: the CONNACK's Maximum Packet Size)."""
        limit = self._broker_max_packet_bytes
        return limit is None or publish_packet_bytes(topic, payload, qos) <= limit

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> int | None:
        """Hand a message to the current connection; its message id, or None when there is none or it is going."""
        client = self._client
        if not self._connected or client is None:
            return None
        limit = self._broker_max_packet_bytes
        if limit is not None and (size := publish_packet_bytes(topic, payload, qos)) > limit:
            # The broker would drop the connection over it (and again after every reconnect).
            if topic not in self._too_large_topics:
                self._too_large_topics.add(topic)
                self._log.error(
                    "message larger than the broker's Maximum Packet Size not sent",
                    topic=topic,
                    size_bytes=size,
                    broker_max_packet_bytes=limit,
                )
            return None
        info = client.publish(topic, payload, qos=qos, retain=retain)
        return info.mid if info.rc == mqtt.MQTT_ERR_SUCCESS else None

    def run(self, serve: Callable[[], None], closed: Callable[[], None], idle: Callable[[], None]) -> None:
        """Until stop: connect, ``serve`` (returns when the link drops or stop is asked), close, back off.

        ``closed`` runs after each connection's network loop has stopped, ``idle`` every ``IDLE_EVERY_S``
        while waiting to reconnect.
        """
        failures = 0
        while not self._stop.is_set():
            connected = False
            try:
                connected = self._connect(failures + 1)
                if connected:
                    up_since = time.monotonic()
                    serve()
                    # Only a connection that held for a while resets the backoff, so a broker that
                    # accepts and then drops us is not hammered.
                    if time.monotonic() - up_since >= self._config.reconnect_max_s:
                        failures = 0
            except Exception:
                self._log.exception("mqtt sender error; reconnecting")
            finally:
                if connected:
                    self._close(closed)
            if self._stop.is_set():
                break
            failures += 1
            delay_s = self._backoff.delay_s(failures)
            self._log.debug("mqtt reconnect scheduled", retry_in_s=round(delay_s, 3), failures=failures)
            deadline = time.monotonic() + delay_s
            while not self._stop.wait(min(IDLE_EVERY_S, max(0.0, deadline - time.monotonic()))):
                idle()
                if time.monotonic() >= deadline:
                    break

    def _new_client(self) -> mqtt.Client:
        # reconnect_on_failure=False: run() reconnects (with jitter) using a fresh client each time.
        protocol = PROTOCOLS[self._config.protocol]
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            # MQTT 5 has no clean session flag: connect() starts clean, and the session ends with the link.
            clean_session=True if protocol == mqtt.MQTTv311 else None,
            protocol=protocol,
            reconnect_on_failure=False,
        )
        client.connect_timeout = CONNECT_TIMEOUT_S
        if self._config.username is not None:
            password = self._config.password.get_secret_value() if self._config.password is not None else None
            client.username_pw_set(self._config.username, password)
        if self._ssl_context is not None:
            client.tls_set_context(self._ssl_context)
            client.tls_insecure_set(self._config.tls is not None and self._config.tls.insecure_skip_verify)
        client.will_set(self._status_topic, b"offline", qos=1, retain=True)
        client.max_inflight_messages_set(0)  # no paho limit: the sender bounds the events in flight
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _subscribe(self, client: mqtt.Client) -> None:
        """Subscribe at QoS 1; on MQTT 5 with "retain as published", so that a retained message published while
        connected still comes with its retain flag (without it, only the replay on subscribing has it)."""
        if self._config.protocol != "5":
            client.subscribe([(topic, 1) for topic in self._subscriptions])
            return
        options = SubscribeOptions(qos=1, retainAsPublished=True)  # type: ignore[no-untyped-call]
        client.subscribe([(topic, options) for topic in self._subscriptions])

    def _connect_properties(self) -> Properties | None:
        """MQTT 5 CONNECT properties: the largest packet this client takes (the broker drops larger messages)."""
        if self._config.protocol != "5" or self._max_packet_bytes is None:
            return None
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.MaximumPacketSize = self._max_packet_bytes
        return properties

    def _connect(self, attempt: int) -> bool:
        """Whether a connection was made and its CONNACK accepted (else logged, and nothing left to close)."""
        self._connack.clear()
        self._link_lost.clear()
        client = self._new_client()
        self._log.info(
            "mqtt connecting",
            broker=self.broker,
            attempt=attempt,
            tls=self._ssl_context is not None,
            protocol=self._config.protocol,
        )
        try:
            client.connect(
                self._host, self._port, keepalive=self._config.keepalive_s, properties=self._connect_properties()
            )
        except ssl.SSLError as exc:
            self._log.error(f"TLS handshake with {self.broker} failed: {exc}", attempt=attempt)
            return False
        except OSError as exc:
            self._log.warning(f"mqtt connect to {self.broker} failed: {exc}", attempt=attempt)
            return False
        client.loop_start()
        self._client = client
        if not self._connack.wait(CONNECT_TIMEOUT_S) and not self._stop.is_set():
            self._log.warning("mqtt broker sent no CONNACK in time", broker=self.broker, timeout_s=CONNECT_TIMEOUT_S)
            self._connack.set()  # the disconnect below needs no second log line
        if not self._connected:
            client.disconnect()
            client.loop_stop()
            return False
        self._connects += 1
        self._log.info("mqtt connected", broker=self.broker, reconnects=self.reconnects, pending=self._pending())
        return True

    def _close(self, closed: Callable[[], None]) -> None:
        """End a connection: on stop publish ``offline`` and disconnect cleanly; then ``closed``."""
        client = self._client
        if client is None:
            return
        if self._stop.is_set() and self._connected:
            info = client.publish(self._status_topic, b"offline", qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(OFFLINE_TIMEOUT_S)
        was_connected = self._connected
        self._connected = False
        client.disconnect()
        client.loop_stop()
        closed()
        if self._stop.is_set() and was_connected:
            self._log.info("mqtt disconnected", broker=self.broker, pending=self._pending())

    # ----- paho callbacks, on the network thread -----

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._log.error("mqtt broker refused the connection", broker=self.broker, reason=str(reason_code))
        else:
            self._broker_max_packet_bytes = getattr(properties, "MaximumPacketSize", None)
            # Birth first, so subscribers see 'online' before anything else from this connection.
            client.publish(self._status_topic, b"online", qos=1, retain=True)
            if self._subscriptions:
                self._subscribe(client)
            self._connected = True
        self._connack.set()
        self._on_change()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if self._stop.is_set():
            pass
        elif self._connected:
            self._log.warning(
                "mqtt connection lost",
                broker=self.broker,
                reason=str(reason_code),
                reason_string=getattr(properties, "ReasonString", None),
                pending=self._pending(),
            )
        elif not self._connack.is_set():
            # E.g. a TLS broker that wants a client certificate closes the link right after the handshake.
            self._log.warning(
                "mqtt connection closed before the broker accepted it", broker=self.broker, reason=str(reason_code)
            )
        self._connected = False
        self._link_lost.set()
        self._connack.set()
        self._on_change()

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        # Only hand it over: the sender thread owns the mid -> row map (and taking a lock here, inside
        # paho's own lock, could deadlock with a publish() on the sender thread).
        self._on_puback(PubAck(mid, reason_code.value, str(reason_code)))
        self._on_change()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        if self._on_message_handler is not None:
            self._on_message_handler(message.topic, bytes(message.payload), bool(message.retain))
