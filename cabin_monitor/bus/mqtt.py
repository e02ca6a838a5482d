"""The broker connection: events through a durable outbox, occupant states, health, and operators' requests.

It only transports: payloads come from ``bus.payloads``; ``config/set``, ``config/get`` and
``config/reset`` requests are handed, as bytes with their retain flag, to a queue (``bus.remote``)
whose worker answers them through ``publish_config_result`` and ``publish_rules_state``. The
network thread never waits for a request to be handled, so event acknowledgements never queue
behind requests.

``MqttSink`` writes every event to the ``Outbox`` before ``submit_event`` returns and removes it
only on the broker's PUBACK, so delivery is at-least-once across lost connections, broker restarts
and daemon crashes; subscribers de-duplicate on ``event_id``. One sender thread owns the connection:
it connects (reconnecting with jittered exponential backoff), sends outbox rows in order with at
most ``max_inflight`` unacknowledged, and re-sends unacknowledged rows after a reconnect. Each
connection is a fresh paho client, so paho never re-sends anything on its own and the outbox is
the single source of what goes out.

MQTT 5 by default: a PUBACK can then refuse an event (e.g. 0x87 "Not authorized" when the ACL denies
the topic, 0x97 "Quota exceeded"). A refused event stays in the outbox, is logged and counted, and
the sender holds back the events after it: once those already in flight are answered, it retries the
oldest pending event alone after a backoff (``reconnect_min_s`` doubling to ``reconnect_max_s``, with
jitter) and resumes the full window once one is accepted. So order is kept, except that events
already in flight when the refusal came (at most ``max_inflight``) may be delivered before it.

When the outbox file cannot be written (disk full, read-only), the outbox holds events in memory
and hands them out after the rows on disk, so they are sent (and acknowledged, refused and retried)
like any row while the disk stays full; one acknowledged from memory is forgotten. The sender retries
writing those still held every ``WRITE_RETRY_S`` and logs the state changes.
"""

from __future__ import annotations

import collections
import contextlib
import json
import random
import ssl
import threading
import time
from collections.abc import Callable, Sequence

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from structlog.typing import FilteringBoundLogger

from cabin_monitor.bus.ledger import LedgerError, OpenEventLedger
from cabin_monitor.bus.outbox import DroppedEvent, Outbox, OutboxItem
from cabin_monitor.bus.payloads import event_payload, health_payload, state_payloads
from cabin_monitor.bus.remote import request_topics
from cabin_monitor.config import MqttConfig, TlsConfig, parse_mqtt_url
from cabin_monitor.errors import ConfigurationError, RuntimeFault
from cabin_monitor.messages import Event, HealthSnapshot, Phase, Refusal, RemoteAction, RemoteRequest, SinkStats
from cabin_monitor.rules import OccupantState

log = structlog.get_logger("cabin_monitor.bus.mqtt")

CONNECT_TIMEOUT_S = 5.0  # TCP connect, TLS handshake, and again for the CONNACK
OFFLINE_TIMEOUT_S = 2.0  # wait for the PUBACK of the 'offline' status on stop
WAKE_S = 0.5  # the sender looks at the stop flag at least this often
EXPIRE_EVERY_S = 60.0
WRITE_RETRY_S = 1.0  # how often the sender retries writing what the outbox holds in memory
PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}


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


def _type_and_phase(payload: bytes) -> dict[str, str]:
    """The ``type`` and ``phase`` of an event payload, for the delivery log line."""
    try:
        body = json.loads(payload)
    except ValueError:
        return {}
    return {k: str(body[k]) for k in ("type", "phase") if isinstance(body, dict) and k in body}


class MqttSink:
    """Publishes events (QoS 1, through the outbox), occupant states (QoS 0) and health (retained).

    Topics are ``<topic_prefix>/<vehicle_id>/...``: ``status`` (retained ``online``/``offline``, also
    the last will), ``events``, ``occupants/<occupant_id>/state``, ``health``, and, when
    ``on_remote_request`` is given, ``config/set``, ``config/get`` and ``config/reset`` in,
    ``config/result`` and the retained ``rules/state`` out. ``on_remote_request`` runs on the MQTT
    network thread and must only queue the request (``RequestQueue.offer``); answers come back
    through ``publish_config_result``, the rules state through ``publish_rules_state``.
    """

    def __init__(
        self,
        config: MqttConfig,
        vehicle_id: str,
        outbox: Outbox,
        on_remote_request: Callable[[RemoteRequest], None] | None = None,
        logger: FilteringBoundLogger | None = None,
        *,
        rng: random.Random | None = None,
        ledger: OpenEventLedger | None = None,
    ) -> None:
        if config.url is None:
            raise ValueError("mqtt.url is not set; use StdoutSink to print events instead")
        self._config = config
        self._host, self._port, url_tls = parse_mqtt_url(config.url)
        # Built now so that a missing or bad certificate stops start-up instead of failing every reconnect.
        self._ssl_context = build_ssl_context(config.tls) if url_tls or config.tls is not None else None
        self._vehicle_id = vehicle_id
        self._client_id = config.client_id or f"cabin-monitor-{vehicle_id}"
        self._outbox = outbox
        self._ledger = ledger
        self._on_remote_request = on_remote_request
        self._rng = rng or random.Random()
        # Not bound here: binding the module's lazy logger would freeze the logging set-up of this moment.
        self._log: FilteringBoundLogger = logger or log
        self._broker = f"{self._host}:{self._port}"
        base = f"{config.topic_prefix}/{vehicle_id}"
        self.status_topic = f"{base}/status"
        self.events_topic = f"{base}/events"
        self.health_topic = f"{base}/health"
        self.config_set_topic = f"{base}/config/set"
        self.config_result_topic = f"{base}/config/result"
        self.rules_state_topic = f"{base}/rules/state"
        self._request_topics: dict[str, RemoteAction] = request_topics(base)
        self._rules_state: bytes | None = None  # guarded by _health_lock, sent like health
        self._rules_state_dirty = False
        self._state_topic_prefix = f"{base}/occupants"

        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # something to do for the sender
        self._connack = threading.Event()  # the CONNACK came (or the wait is pointless)
        self._link_lost = threading.Event()
        self._connected = False
        self._client: mqtt.Client | None = None
        # (mid, reason code) of each PUBACK, from the network thread
        self._pubacks: collections.deque[tuple[int, ReasonCode]] = collections.deque()
        self._inflight: dict[int, OutboxItem] = {}  # mid -> row; sender thread only
        self._health_lock = threading.Lock()
        self._health: bytes | None = None
        self._health_dirty = False
        self._connects = 0
        self._published_total = 0
        self._next_expiry_s = 0.0
        self._next_write_retry_s = 0.0
        self._outbox_state_lock = threading.Lock()
        self._outbox_state = "ok"  # as last logged
        # Refusals (sender thread; read by stats()).
        self._refused_total = 0
        self._last_refusal: Refusal | None = None
        self._refusal_streak = 0  # probe rounds refused in a row; 0 = sending normally
        self._retry_refused_at_s: float | None = None  # hold new sends until then, then probe one
        self._probing = False  # one event in flight to see whether the broker accepts again

    def state_topic(self, occupant_id: str) -> str:
        """Topic of one occupant's state."""
        return f"{self._state_topic_prefix}/{occupant_id}/state"

    # ----- the pipeline's side -----

    def start(self) -> None:
        """Start the sender thread; it connects in the background."""
        if self._thread is not None:
            raise RuntimeError("MqttSink already started")
        self._thread = threading.Thread(target=self._run, name="mqtt-sender", daemon=True)
        self._thread.start()

    def submit_event(self, event: Event) -> None:
        """Write the event to the outbox (durable on return) and the open-event ledger, then wake the sender.

        A ``start`` enters the ledger before the outbox and an ``end`` leaves it after, so a crash at any
        point leaves no start without an end: at worst the next start ends a start that was never sent,
        or sends again, under the same ``event_id``, an end that was (see ``end_event_id``).
        """
        payload = event_payload(event, self._vehicle_id).model_dump_json().encode()
        if event.phase is Phase.START:
            self._record_in_ledger(event)
        dropped = self._outbox.put(event.event_id, self.events_topic, payload, event.severity, event.wall_time_s)
        # One line per accepted and per delivered event: losses can be checked from the log alone.
        self._log.info("event accepted", event_id=event.event_id, type=event.type, phase=event.phase)
        if event.phase is Phase.END:
            self._record_in_ledger(event)
        self._log_dropped(dropped)
        self._log_outbox_state()
        self._wake.set()

    def _record_in_ledger(self, event: Event) -> None:
        if self._ledger is None:
            return
        try:
            self._ledger.record(event)
        except LedgerError as exc:
            # The event itself goes to the outbox either way; only its end after a crash is at stake.
            self._log.error("open-event ledger not updated", event_id=event.event_id, error=str(exc))

    def publish_state(self, occupants: Sequence[OccupantState], wall_time_s: float) -> None:
        """Publish each occupant's state at QoS 0 if connected; dropped otherwise (a newer state follows soon)."""
        client = self._client
        if not self._connected or client is None:
            return
        for state in state_payloads(occupants, self._vehicle_id, wall_time_s):
            client.publish(self.state_topic(state.occupant_id), state.model_dump_json().encode(), qos=0)

    def publish_health(self, health: HealthSnapshot) -> None:
        """Hand the latest health to the sender; published retained at QoS 1 now or after reconnecting."""
        payload = health_payload(health, self._vehicle_id).model_dump_json().encode()
        with self._health_lock:
            self._health = payload
            self._health_dirty = True
        self._wake.set()

    def publish_config_result(self, payload: bytes) -> None:
        """Answer an operator's request on ``config/result`` (QoS 1, not retained); lost if not connected."""
        client = self._client
        if not self._connected or client is None:
            self._log.warning("config/result not sent: not connected to the broker", broker=self._broker)
            return
        client.publish(self.config_result_topic, payload, qos=1)

    def publish_rules_state(self, payload: bytes) -> None:
        """Hand the latest rules state to the sender; published retained at QoS 1 now and after every connect."""
        with self._health_lock:
            self._rules_state = payload
            self._rules_state_dirty = True
        self._wake.set()

    def stop(self, flush_timeout_s: float) -> None:
        """Wait up to ``flush_timeout_s`` for the outbox to drain, publish ``offline``, disconnect."""
        thread = self._thread
        if thread is None:
            return
        deadline = time.monotonic() + flush_timeout_s
        while thread.is_alive() and self._outbox.depth() > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        self._log_dropped(self._outbox.retry_writes())  # a last chance to write what waits in memory
        pending = self._outbox.depth()
        if pending:
            self._log.warning("mqtt stopping with events pending; they stay in the outbox", pending=pending)
        unkept = self._outbox.unkept_event_ids
        kept = [event_id for event_id in self._outbox.memory_event_ids if event_id not in unkept]
        if kept:
            self._log.warning(
                "mqtt stopping with events the outbox file could not take; the fallback file keeps them "
                "for the next start",
                event_ids=kept,
                fallback=str(self._outbox.fallback_path),
                state=self._outbox.state,
                error=self._outbox.write_error,
            )
        if unkept:
            # Nowhere left to keep them: say which, so the loss can be traced.
            self._log.error(
                "mqtt stopping with events the outbox file could not take; they are lost",
                event_ids=unkept,
                state=self._outbox.state,
                error=self._outbox.write_error,
                fallback_error=self._outbox.fallback_error,
            )
        self._stop.set()
        self._connack.set()
        self._wake.set()
        thread.join(CONNECT_TIMEOUT_S + OFFLINE_TIMEOUT_S + 2 * WAKE_S)
        if thread.is_alive():
            self._log.warning("mqtt sender did not stop in time")

    def stats(self) -> SinkStats:
        """Connection and outbox counters."""
        return SinkStats(
            connected=self._connected,
            reconnects=max(0, self._connects - 1),
            outbox_depth=self._outbox.depth(),
            dropped_total=self._outbox.dropped_total,
            dropped_by_reason=self._outbox.dropped_by_reason,
            published_total=self._published_total,
            outbox_state=self._outbox.state,
            outbox_memory_depth=self._outbox.memory_depth,
            outbox_memory_unkept=len(self._outbox.unkept_event_ids),
            outbox_error=self._outbox.write_error,
            refused_total=self._refused_total,
            last_refusal=self._last_refusal,
            refusing=self._refusal_streak > 0,
        )

    # ----- the sender thread -----

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            client: mqtt.Client | None = None
            try:
                client = self._connect(failures + 1)
                if client is not None:
                    up_since = time.monotonic()
                    self._serve(client)
                    # Only a connection that held for a while resets the backoff, so a broker that
                    # accepts and then drops us is not hammered.
                    if time.monotonic() - up_since >= self._config.reconnect_max_s:
                        failures = 0
            except Exception:
                self._log.exception("mqtt sender error; reconnecting")
            finally:
                if client is not None:
                    self._close(client)
            if self._stop.is_set():
                break
            failures += 1
            delay_s = self._backoff_s(failures)
            self._log.debug("mqtt reconnect scheduled", retry_in_s=round(delay_s, 3), failures=failures)
            deadline = time.monotonic() + delay_s
            while not self._stop.wait(min(WRITE_RETRY_S, max(0.0, deadline - time.monotonic()))):
                self._retry_outbox_writes()  # space may come back while the broker is away
                if time.monotonic() >= deadline:
                    break

    def _backoff_s(self, failures: int) -> float:
        """Exponential backoff with full jitter: uniform between min and a cap that doubles per failure."""
        low, high = self._config.reconnect_min_s, self._config.reconnect_max_s
        return self._rng.uniform(low, min(high, low * 2.0 ** min(failures, 32)))

    def _new_client(self) -> mqtt.Client:
        # reconnect_on_failure=False: this class reconnects (with jitter) using a fresh client each time.
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
        client.will_set(self.status_topic, b"offline", qos=1, retain=True)
        client.max_inflight_messages_set(0)  # no paho limit: the sender bounds the events in flight
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _connect(self, attempt: int) -> mqtt.Client | None:
        """A connected client whose CONNACK was accepted, or None (logged)."""
        self._connack.clear()
        self._link_lost.clear()
        client = self._new_client()
        self._log.info(
            "mqtt connecting",
            broker=self._broker,
            attempt=attempt,
            tls=self._ssl_context is not None,
            protocol=self._config.protocol,
        )
        try:
            client.connect(self._host, self._port, keepalive=self._config.keepalive_s)
        except ssl.SSLError as exc:
            self._log.error(f"TLS handshake with {self._broker} failed: {exc}", attempt=attempt)
            return None
        except OSError as exc:
            self._log.warning(f"mqtt connect to {self._broker} failed: {exc}", attempt=attempt)
            return None
        client.loop_start()
        self._client = client
        if not self._connack.wait(CONNECT_TIMEOUT_S) and not self._stop.is_set():
            self._log.warning("mqtt broker sent no CONNACK in time", broker=self._broker, timeout_s=CONNECT_TIMEOUT_S)
            self._connack.set()  # the disconnect below needs no second log line
        if not self._connected:
            self._close(client)
            return None
        self._connects += 1
        self._log.info(
            "mqtt connected", broker=self._broker, reconnects=max(0, self._connects - 1), pending=self._outbox.depth()
        )
        return client

    def _serve(self, client: mqtt.Client) -> None:
        """Send health and outbox rows until the link drops or stop is asked."""
        with self._health_lock:
            self._health_dirty = self._health is not None  # the broker may hold an old one
            self._rules_state_dirty = self._rules_state is not None
        cursor = 0  # re-send from the oldest unacknowledged row: at-least-once, in order
        while True:
            self._wake.clear()
            self._drain_acks()
            self._retry_outbox_writes()
            self._expire_if_due()
            self._send_health(client)
            cursor = self._send_events(client, cursor)
            if self._stop.is_set() or self._link_lost.is_set():
                return
            self._wake.wait(WAKE_S)

    def _send_events(self, client: mqtt.Client, cursor: int) -> int:
        window = self._config.max_inflight
        if self._retry_refused_at_s is not None:
            # After a refusal: nothing new until every event in flight is answered and the backoff is
            # over; then the oldest pending event goes alone, so order is kept.
            if self._inflight or time.monotonic() < self._retry_refused_at_s:
                return cursor
            self._retry_refused_at_s = None
            self._probing = True
            cursor = 0
        if self._probing:
            window = 1
        free = window - len(self._inflight)
        if free <= 0:
            return cursor
        for item in self._outbox.pending(free, after_row_id=cursor):
            info = client.publish(item.topic, item.payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                break  # the link is going down; the row is sent again after reconnecting
            self._inflight[info.mid] = item
            cursor = item.row_id
        return cursor

    def _send_health(self, client: mqtt.Client) -> None:
        with self._health_lock:
            payload, self._health_dirty = (self._health if self._health_dirty else None), False
            rules_state, self._rules_state_dirty = (self._rules_state if self._rules_state_dirty else None), False
        if payload is not None:
            client.publish(self.health_topic, payload, qos=1, retain=True)
        if rules_state is not None:
            client.publish(self.rules_state_topic, rules_state, qos=1, retain=True)

    def _drain_acks(self) -> None:
        while self._pubacks:
            mid, reason = self._pubacks.popleft()
            item = self._inflight.pop(mid, None)
            if item is None:  # birth, health or a config result
                continue
            if reason.is_failure:
                self._refused(item, reason)
                continue
            # A delete that cannot be written (disk full) is retried by the outbox, and the row is not
            # sent again meanwhile: never a reason to drop the connection.
            self._outbox.ack(item.row_id)
            self._published_total += 1
            self._log.info("event delivered", event_id=item.event_id, **_type_and_phase(item.payload))
            if self._refusal_streak and self._retry_refused_at_s is None:
                self._log.info("mqtt broker accepts events again", refused_total=self._refused_total)
                self._refusal_streak = 0
                self._probing = False
        self._log_outbox_state()

    def _refused(self, item: OutboxItem, reason: ReasonCode) -> None:
        """A PUBACK refused an event: it stays in the outbox; hold back the rest and retry after a backoff."""
        self._refused_total += 1
        self._last_refusal = Refusal(item.event_id, str(reason), reason.value, time.time())
        if self._retry_refused_at_s is None:  # once per round: the events in flight share the backoff
            self._refusal_streak += 1
            self._probing = False
            self._retry_refused_at_s = time.monotonic() + self._backoff_s(self._refusal_streak)
        self._log.warning(
            "mqtt broker refused an event; it stays in the outbox",
            event_id=item.event_id,
            reason=str(reason),
            reason_code=f"0x{reason.value:02x}",
            retry_in_s=round(max(0.0, self._retry_refused_at_s - time.monotonic()), 3),
            refused_total=self._refused_total,
        )

    def _retry_outbox_writes(self) -> None:
        """Every ``WRITE_RETRY_S`` while the outbox holds events in memory: try writing them."""
        now = time.monotonic()
        if now < self._next_write_retry_s or self._outbox.state == "ok":
            return
        self._next_write_retry_s = now + WRITE_RETRY_S
        self._log_dropped(self._outbox.retry_writes())
        self._log_outbox_state()

    def _log_outbox_state(self) -> None:
        """One line when the outbox file stops or starts being writable again."""
        state = self._outbox.state
        with self._outbox_state_lock:
            previous, self._outbox_state = self._outbox_state, state
        if state == previous:
            return
        if state == "ok":
            self._log.info("outbox file writable again; events held in memory are written", path=str(self._outbox.path))
        else:
            self._log.error(
                "outbox file cannot be written; events are held in memory until it can",
                path=str(self._outbox.path),
                state=state,
                error=self._outbox.write_error,
                memory_depth=self._outbox.memory_depth,
                memory_max_events=self._outbox.memory_max_events,
                fallback=None if self._outbox.fallback_path is None else str(self._outbox.fallback_path),
                fallback_error=self._outbox.fallback_error,
            )

    def _expire_if_due(self) -> None:
        now = time.monotonic()
        if now >= self._next_expiry_s:
            self._next_expiry_s = now + EXPIRE_EVERY_S
            self._log_dropped(self._outbox.expire())

    def _close(self, client: mqtt.Client) -> None:
        """End a connection: on stop publish ``offline`` and disconnect cleanly; forget what was in flight."""
        if self._stop.is_set() and self._connected:
            info = client.publish(self.status_topic, b"offline", qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(OFFLINE_TIMEOUT_S)
        was_connected = self._connected
        self._connected = False
        client.disconnect()
        client.loop_stop()
        self._drain_acks()
        self._inflight.clear()
        if self._stop.is_set() and was_connected:
            self._log.info("mqtt disconnected", broker=self._broker, pending=self._outbox.depth())

    def _log_dropped(self, dropped: list[DroppedEvent]) -> None:
        for d in dropped:
            self._log.warning(
                "outbox dropped an event",
                reason=d.reason,
                event_id=d.event_id,
                severity=d.severity,
                age_s=round(time.time() - d.created_wall_s, 1),
                max_events=self._outbox.memory_max_events if d.reason == "memory_full" else self._outbox.max_events,
            )

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
            self._log.error("mqtt broker refused the connection", broker=self._broker, reason=str(reason_code))
        else:
            # Birth first, so subscribers see 'online' before anything else from this connection.
            client.publish(self.status_topic, b"online", qos=1, retain=True)
            if self._on_remote_request is not None:
                client.subscribe([(topic, 1) for topic in self._request_topics])
            self._connected = True
        self._connack.set()
        self._wake.set()

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
                "mqtt connection lost", broker=self._broker, reason=str(reason_code), pending=self._outbox.depth()
            )
        elif not self._connack.is_set():
            # E.g. a TLS broker that wants a client certificate closes the link right after the handshake.
            self._log.warning(
                "mqtt connection closed before the broker accepted it", broker=self._broker, reason=str(reason_code)
            )
        self._connected = False
        self._link_lost.set()
        self._connack.set()
        self._wake.set()

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        # Only note it: the sender thread owns the mid -> row map (and taking a lock here, inside
        # paho's own lock, could deadlock with a publish() on the sender thread).
        self._pubacks.append((mid, reason_code))
        self._wake.set()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        # Only hand the request over: handling it here would hold up every PUBACK behind it.
        action = self._request_topics.get(message.topic)
        if action is None or self._on_remote_request is None:
            return
        try:
            self._on_remote_request(
                RemoteRequest(
                    action, bytes(message.payload), retained=bool(message.retain), received_s=time.monotonic()
                )
            )
        except Exception:
            # An exception here would end paho's network thread.
            self._log.exception("operator request could not be queued", topic=message.topic)
