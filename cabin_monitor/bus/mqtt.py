"""The broker's sink: events through a durable outbox, occupant states, health, and operators' requests.

``MqttSink`` composes the parts of delivery: ``bus.intake`` (each event into the outbox, durable before
``submit_event`` returns, in step with the open-event ledger), ``bus.sender`` (outbox rows out in order,
removed on the broker's PUBACK: at-least-once, held back after a refusal), ``bus.client`` (the connection,
paho behind it), ``bus.retained`` (the latest health and rules state) and ``bus.outbox_watch`` (the
outbox's condition in the log). One sender thread owns the connection. Events of the shadow rules skip
all of that: published at QoS 0 straight to the connection on ``shadow/events``, dropped while offline.
``config/set``, ``config/get`` and ``config/reset`` requests are handed, as bytes with their retain flag,
to a queue (``bus.remote``) whose worker answers through ``publish_config_result`` and
``publish_rules_state``: the network thread never waits for a request, so acknowledgements never queue
behind one.

Imports the ``bus`` modules above, ``config``, ``messages`` and ``rules`` (``OccupantState``).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence

import structlog
from structlog.typing import FilteringBoundLogger

from cabin_monitor.bus.backoff import Backoff
from cabin_monitor.bus.client import STOP_S, BrokerClient, TlsSetupError, build_ssl_context
from cabin_monitor.bus.intake import EventIntake
from cabin_monitor.bus.ledger import OpenEventLedger
from cabin_monitor.bus.outbox import Outbox
from cabin_monitor.bus.outbox_watch import OutboxWatch
from cabin_monitor.bus.payloads import event_payload, health_payload, state_payloads
from cabin_monitor.bus.remote import request_topics
from cabin_monitor.bus.retained import LatestValues
from cabin_monitor.bus.sender import OutboxSender
from cabin_monitor.config import MqttConfig
from cabin_monitor.messages import Event, HealthSnapshot, RemoteAction, RemoteRequest, SinkStats
from cabin_monitor.rules import OccupantState

__all__ = ["MqttSink", "TlsSetupError", "build_ssl_context"]

log = structlog.get_logger("cabin_monitor.bus.mqtt")

WAKE_S = 0.5  # the sender looks at the stop flag at least this often
# Room for a request's topic, header and properties beyond its payload in the MQTT 5 Maximum Packet Size.
PACKET_OVERHEAD_BYTES = 4096


class MqttSink:
    """Publishes events (QoS 1, through the outbox), occupant states (QoS 0) and health (retained).

    Topics are ``<topic_prefix>/<vehicle_id>/...``: ``status`` (retained ``online``/``offline``, also
    the last will), ``events``, ``occupants/<occupant_id>/state``, ``health``, and, when
    ``on_remote_request`` is given, ``config/set``, ``config/get`` and ``config/reset`` in,
    ``config/result`` and the retained ``rules/state`` out. ``on_remote_request`` runs on the MQTT
    network thread and must only queue the request (``RequestQueue.offer``); answers come back
    through ``publish_config_result``, the rules state through ``publish_rules_state``. With
    ``max_request_bytes`` (MQTT 5) the broker is told never to deliver a larger request.
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
        max_request_bytes: int | None = None,
    ) -> None:
        if config.url is None:
            raise ValueError("mqtt.url is not set; use StdoutSink to print events instead")
        self._vehicle_id = vehicle_id
        self._outbox = outbox
        self._protocol = config.protocol
        # Not bound here: binding the module's lazy logger would freeze the logging set-up of this moment.
        self._log: FilteringBoundLogger = logger or log
        base = f"{config.topic_prefix}/{vehicle_id}"
        self.status_topic = f"{base}/status"
        self.events_topic = f"{base}/events"
        self.shadow_events_topic = f"{base}/shadow/events"
        self.shadow_dropped_total = 0  # shadow events dropped while not connected
        self.health_topic = f"{base}/health"
        self.config_set_topic = f"{base}/config/set"
        self.config_result_topic = f"{base}/config/result"
        self.rules_state_topic = f"{base}/rules/state"
        self._state_topic_prefix = f"{base}/occupants"
        self._on_remote_request = on_remote_request
        self._request_topics: dict[str, RemoteAction] = request_topics(base)

        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # something to do for the sender
        backoff = Backoff(config.reconnect_min_s, config.reconnect_max_s, rng)
        self._watch = OutboxWatch(outbox, self._log)
        self._intake = EventIntake(outbox, self._watch, vehicle_id, self.events_topic, ledger, self._log)
        self._sender = OutboxSender(outbox, self._watch, config.max_inflight, backoff, self._log)
        self._retained = LatestValues([self.health_topic, self.rules_state_topic])
        self._client = BrokerClient(
            config,
            config.client_id or f"cabin-monitor-{vehicle_id}",
            self.status_topic,
            self._stop,
            backoff,
            self._log,
            subscriptions=list(self._request_topics) if on_remote_request is not None else [],
            on_message=self._on_message,
            on_puback=self._sender.note_ack,
            on_change=self._wake.set,
            pending=outbox.depth,
            max_packet_bytes=None if max_request_bytes is None else max_request_bytes + PACKET_OVERHEAD_BYTES,
        )

    def state_topic(self, occupant_id: str) -> str:
        """Topic of one occupant's state."""
        return f"{self._state_topic_prefix}/{occupant_id}/state"

    # ----- the pipeline's side -----

    def start(self) -> None:
        """Start the sender thread; it connects in the background."""
        if self._thread is not None:
            raise RuntimeError("MqttSink already started")
        if self._protocol == "3.1.1":
            self._log.warning(
                "mqtt 3.1.1: a PUBACK cannot refuse an event, so events the broker's ACL denies are lost without a "
                "trace; set mqtt.protocol to 5 to keep and retry them",
                protocol=self._protocol,
            )
        self._thread = threading.Thread(target=self._run, name="mqtt-sender", daemon=True)
        self._thread.start()

    def submit_event(self, event: Event) -> None:
        """Write the event to the outbox (durable on return) and the open-event ledger, then wake the sender."""
        self._intake.submit(event)
        self._wake.set()

    def submit_shadow_event(self, event: Event) -> None:
        """Publish a shadow-rules event on ``shadow/events`` at QoS 0 if connected, never through the outbox;
        dropped otherwise (counted in ``shadow_dropped_total``): a trial, not an alert. Never blocks."""
        payload = event_payload(event, self._vehicle_id).model_dump_json().encode()
        if self._client.publish(self.shadow_events_topic, payload, qos=0) is None:
            self.shadow_dropped_total += 1

    def publish_state(self, occupants: Sequence[OccupantState], wall_time_s: float) -> None:
        """Publish each occupant's state at QoS 0 if connected; dropped otherwise (a newer state follows soon)."""
        if not self._client.connected:
            return
        for state in state_payloads(occupants, self._vehicle_id, wall_time_s):
            self._client.publish(self.state_topic(state.occupant_id), state.model_dump_json().encode(), qos=0)

    def publish_health(self, health: HealthSnapshot) -> None:
        """Hand the latest health to the sender; published retained at QoS 1 now or after reconnecting."""
        self._retained.set(self.health_topic, health_payload(health, self._vehicle_id).model_dump_json().encode())
        self._wake.set()

    def publish_config_result(self, payload: bytes) -> None:
        """Answer an operator's request on ``config/result`` (QoS 1, not retained); lost if not connected."""
        if not self._client.connected:
            self._log.warning("config/result not sent: not connected to the broker", broker=self._client.broker)
            return
        self._client.publish(self.config_result_topic, payload, qos=1)

    def publish_rules_state(self, payload: bytes) -> None:
        """Hand the latest rules state to the sender; published retained at QoS 1 now and after every connect."""
        self._retained.set(self.rules_state_topic, payload)
        self._wake.set()

    def stop(self, flush_timeout_s: float) -> None:
        """Wait up to ``flush_timeout_s`` for the outbox to drain, publish ``offline``, disconnect."""
        thread = self._thread
        if thread is None:
            return
        deadline = time.monotonic() + flush_timeout_s
        while thread.is_alive() and self._outbox.depth() > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        self._watch.log_left_behind()
        self._stop.set()
        self._client.interrupt()
        self._wake.set()
        thread.join(STOP_S + 2 * WAKE_S)
        if thread.is_alive():
            self._log.warning("mqtt sender did not stop in time")

    def stats(self) -> SinkStats:
        """Connection and outbox counters."""
        return SinkStats(
            connected=self._client.connected,
            reconnects=self._client.reconnects,
            outbox_depth=self._outbox.depth(),
            dropped_total=self._outbox.dropped_total,
            dropped_by_reason=self._outbox.dropped_by_reason,
            dropped_by_type=self._outbox.dropped_by_type,
            published_total=self._sender.published_total,
            outbox_state=self._outbox.state,
            outbox_memory_depth=self._outbox.memory_depth,
            outbox_memory_unkept=len(self._outbox.unkept_event_ids),
            outbox_error=self._outbox.write_error,
            refused_total=self._sender.refused_total,
            last_refusal=self._sender.last_refusal,
            refusing=self._sender.refusing,
            refusals_detectable=self._protocol != "3.1.1",
        )

    # ----- the sender thread -----

    def _run(self) -> None:
        # Space may come back while the broker is away: retry the outbox's writes meanwhile too.
        self._client.run(self._serve, self._sender.link_closed, self._watch.retry_writes_if_due)

    def _serve(self) -> None:
        """Send retained values and outbox rows until the link drops or stop is asked."""
        self._retained.all_due()  # the broker may hold old ones
        self._sender.restart()
        while True:
            self._wake.clear()
            self._sender.drain_acks()
            self._watch.retry_writes_if_due()
            self._sender.expire_if_due()
            for topic, payload in self._retained.take_due():
                self._client.publish(topic, payload, qos=1, retain=True)
            self._sender.send(self._client)
            if self._stop.is_set() or self._client.link_lost:
                return
            self._wake.wait(WAKE_S)

    # ----- the network thread -----

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        # Only hand the request over: handling it here would hold up every PUBACK behind it.
        action = self._request_topics.get(topic)
        if action is None or self._on_remote_request is None:
            return
        if not payload:
            # An empty message is how a retained request is cleared: nothing was asked.
            self._log.info("empty operator request ignored (clears a retained one)", topic=topic, retained=retained)
            return
        try:
            self._on_remote_request(RemoteRequest(action, payload, retained=retained, received_s=time.monotonic()))
        except Exception:
            # An exception here would end paho's network thread.
            self._log.exception("operator request could not be queued", topic=topic)
