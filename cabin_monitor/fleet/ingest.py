"""``fleet ingest``: every vehicle's messages from the fleet broker into PostgreSQL, exactly once.

MQTT 5 shared subscriptions (``$share/<group>/cabin/+/events``, ``shadow/events``, ``health``,
``config/result``) spread the fleet over any number of ingest processes; each also subscribes to the retained
``rules/state`` and ``status`` itself, so the values vehicles published before it started arrive too. Shadow
events come at QoS 0 (nothing to acknowledge) and are stored like live ones, in ``shadow_events``.

Acknowledgement is manual: a message's PUBACK goes out only after the transaction holding it has committed,
so a process killed before that gets its messages again (here, or in a group member) and the store's
``event_id`` key makes the second copy a no-op: at-least-once from the vehicles, exactly once in the store.
Acknowledgements follow the order of arrival (as MQTT requires) and belong to one connection: those of
messages received before a reconnect are dropped, the broker sends those messages again.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import structlog
from psycopg_pool import ConnectionPool

from cabin_monitor.fleet.link import BrokerAddress, connect, make_client
from cabin_monitor.fleet.records import classify, subscription_topics
from cabin_monitor.fleet.store import PartitionCache, WriteCounts, write_records

log = structlog.get_logger("cabin_monitor.fleet.ingest")

STATS_INTERVAL_S = 10.0
DB_RETRY_S = 1.0


@dataclass(frozen=True, slots=True)
class Inbound:
    """One received message and the connection it came on (``generation``)."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int


@dataclass(frozen=True, slots=True)
class IngestSettings:
    """How ``Ingest`` subscribes and batches."""

    group: str = "cabin-fleet-ingest"
    client_id: str = "cabin-fleet-ingest"
    prefix: str = "cabin"
    batch_size: int = 500
    batch_wait_s: float = 0.2


class Ingest:
    """The MQTT side (paho's network thread fills a queue) and the store side (``run``: batch, commit, ack)."""

    def __init__(self, address: BrokerAddress, pool: ConnectionPool, settings: IngestSettings) -> None:
        self._address = address
        self._pool = pool
        self._settings = settings
        self._inbox: queue.Queue[Inbound] = queue.Queue()
        self._generation = 0
        self._partitions = PartitionCache()
        self.totals = WriteCounts()
        self._client = make_client(address, settings.client_id)
        self._client.manual_ack_set(True)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect

    def _on_connect(self, client: mqtt.Client, _u: object, flags: Any, reason: Any, _p: object) -> None:
        if reason.is_failure:
            log.warning("fleet broker refused the connection", broker=str(self._address), reason=str(reason))
            return
        self._generation += 1
        client.subscribe([(t, 1) for t in subscription_topics(self._settings.group, self._settings.prefix)])
        log.info(
            "connected to the fleet broker",
            broker=str(self._address),
            session_present=bool(flags.session_present),
            group=self._settings.group,
        )

    def _on_disconnect(self, _c: mqtt.Client, _u: object, _f: object, reason: Any, _p: object) -> None:
        log.warning("disconnected from the fleet broker", reason=str(reason))

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        self._inbox.put(Inbound(msg.topic, bytes(msg.payload), msg.mid, msg.qos, self._generation))

    def run(self, stop: threading.Event) -> int:
        """Take in messages until ``stop`` is set, then commit and acknowledge what came and return 0.

        Returns 1 when stopped while the store cannot be reached (what is not committed is not acknowledged:
        the broker keeps it for the next run).
        """
        connect(self._client, self._address, receive_maximum=max(2 * self._settings.batch_size, 20))
        self._client.loop_start()
        next_stats = time.monotonic() + STATS_INTERVAL_S
        ok = True
        try:
            while ok and not stop.is_set():
                batch = self._take(self._settings.batch_size, self._settings.batch_wait_s)
                ok = not batch or self._commit(batch, stop)
                if time.monotonic() >= next_stats:
                    next_stats = time.monotonic() + STATS_INTERVAL_S
                    self._log_totals("ingest totals")
            # Stopping: what has arrived so far is committed and acknowledged; later messages (the
            # connection is still up) wait on the broker for the next run.
            left = self._inbox.qsize()
            while ok and left > 0:
                batch = self._take(min(left, self._settings.batch_size), 0.0)
                left -= len(batch)
                ok = not batch or self._commit(batch, stop)
        finally:
            self._client.disconnect()
            self._client.loop_stop()
            self._log_totals("ingest stopped")
        return 0 if ok else 1

    def _take(self, size: int, wait_s: float) -> list[Inbound]:
        """Up to ``size`` messages, waiting ``wait_s`` at most for all of them."""
        batch: list[Inbound] = []
        deadline = time.monotonic() + wait_s
        while len(batch) < size:
            left = deadline - time.monotonic()
            try:
                batch.append(self._inbox.get(timeout=left) if left > 0 else self._inbox.get_nowait())
            except queue.Empty:
                break
        return batch

    def _commit(self, batch: list[Inbound], stop: threading.Event) -> bool:
        """Store the batch (retrying while PostgreSQL is away) and acknowledge it; False if stopped first."""
        records = [classify(m.topic, m.payload, self._settings.prefix) for m in batch]
        while True:
            try:
                with self._pool.connection() as conn:
                    counts = write_records(conn, records, self._partitions, self._settings.prefix)
                break
            except psycopg.OperationalError as exc:
                log.warning("batch not committed; kept unacknowledged, tried again", error=str(exc), batch=len(batch))
                if stop.wait(DB_RETRY_S):
                    return False
        self.totals.add(counts)
        for m in batch:
            if m.qos > 0 and m.generation == self._generation:
                self._client.ack(m.mid, m.qos)
        return True

    def _log_totals(self, message: str) -> None:
        t = self.totals
        log.info(
            message,
            events_new=t.events_new,
            events_duplicate=t.events_duplicate,
            shadow_events_new=t.shadow_events_new,
            shadow_events_duplicate=t.shadow_events_duplicate,
            other=t.other,
            quarantined=t.quarantined,
            quarantined_by_reason=t.quarantined_by_reason,
        )
