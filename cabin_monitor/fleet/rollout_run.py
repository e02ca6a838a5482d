"""``fleet rollout``: the I/O around ``fleet.rollout.Rollout``: MQTT requests and answers, rates and steps in the store.

A roll-out is stored before its first request (``create_rollout``) and after every step, so one whose process
ended (killed, the machine restarted) is taken up again with ``load_rollout``: the answers that came meanwhile
are read from ``config_results``, where ingest stored them. A PostgreSQL advisory lock keeps a roll-out to
one process at a time.

Requests go to ``cabin/<vehicle>/config/set`` (QoS 1, not retained) with request ids ``<rollout>/set/<vehicle>``;
answers come from ``cabin/+/config/result``. A restore sends back the values the changed paths had in the
vehicle's last ``rules/state`` before the roll-out, or ``config/reset`` when it had no override then (or no
``rules/state`` is stored).
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from cabin_monitor.fleet.link import BrokerAddress, connect, make_client
from cabin_monitor.fleet.rates import alert_rate
from cabin_monitor.fleet.records import ConfigResultRecord, classify
from cabin_monitor.fleet.rollout import MeasureRates, Phase, Plan, Rollout, Send, VehicleProgress, VehicleState

log = structlog.get_logger("cabin_monitor.fleet.rollout")
TICK_S = 0.2
Answer = tuple[str, str | None, bool, list[dict[str, Any]]]


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted path -> value of a nested mapping."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """The nested mapping of dotted paths."""
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = nested
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return nested


def restore_request(changes: dict[str, Any], previous: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """(action, payload without request_id) that undoes ``changes`` on a vehicle whose rules/state was ``previous``."""
    if previous is None or not previous.get("overrides"):
        return "reset", {}
    rules = flatten(previous["rules"])
    return "set", {"rules": nest({path: rules[path] for path in flatten(changes) if path in rules})}


class RolloutRunner:
    """Publishes what the state machine asks, feeds it answers and rates, stores every step; one roll-out.

    ``previous`` is each vehicle's ``rules/state`` payload before the roll-out (what a restore goes back to).
    """

    def __init__(
        self,
        address: BrokerAddress,
        pool: ConnectionPool,
        machine: Rollout,
        previous: dict[str, dict[str, Any] | None],
        prefix: str = "cabin",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pool = pool
        self._prefix = prefix
        self._clock = clock
        self._address = address
        self.machine = machine
        self._previous = previous
        self._answers: queue.Queue[Answer] = queue.Queue()
        self._subscribed = threading.Event()
        self._read_stored_answers = threading.Event()
        self._client = make_client(address, f"rollout-{machine.rollout_id}"[:64])
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def _on_connect(self, client: mqtt.Client, _u: object, _f: object, reason: Any, _p: object) -> None:
        if reason.is_failure:
            log.warning("fleet broker refused the connection", reason=str(reason))
            return
        client.subscribe(f"{self._prefix}/+/config/result", qos=1)

    def _on_subscribe(self, *_: object) -> None:
        # Answers that came while not subscribed (before a start or a resume, during a lost connection)
        # are in the store: ingest keeps every config/result.
        self._subscribed.set()
        self._read_stored_answers.set()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        record = classify(msg.topic, bytes(msg.payload), self._prefix)
        if isinstance(record, ConfigResultRecord):
            errors = [e.model_dump() for e in record.payload.errors]
            self._answers.put((record.vehicle_id, record.payload.request_id, record.payload.ok, errors))

    def run(self, stop: threading.Event) -> Phase:
        """Until done or aborted (or ``stop``): the final phase. One process per roll-out at a time: a second one
        (a resume while the first still runs) gets ``RolloutBusy``."""
        with self._pool.connection() as lock:
            held = lock.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (self.machine.rollout_id,)).fetchone()
            if held is None or not held[0]:
                raise RolloutBusy(f"roll-out {self.machine.rollout_id!r} is being run by another process")
            lock.commit()  # the lock is the session's: nothing stays open in a transaction meanwhile
            try:
                self._run(stop)
            finally:
                lock.execute("SELECT pg_advisory_unlock(hashtext(%s))", (self.machine.rollout_id,))
        return self.machine.phase

    def _run(self, stop: threading.Event) -> None:
        connect(self._client, self._address, persistent=False)  # answers while away come from the store
        self._client.loop_start()
        try:
            if not self._subscribed.wait(30):
                raise TimeoutError(f"could not subscribe to config/result on {self._address}")
            while self.machine.phase not in (Phase.DONE, Phase.ABORTED) and not stop.is_set():
                self._step()
                stop.wait(TICK_S)
            self._store()
        finally:
            self._client.disconnect()
            self._client.loop_stop()

    def _answers_stored(self) -> None:
        """Feed the answers ingest stored for this roll-out's requests (the machine ignores those it has)."""
        open_ids = [p.request_id for p in self.machine.vehicles.values() if p.request_id is not None]
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT vehicle_id, request_id, ok, coalesce(payload->'errors', '[]'::jsonb), extract(epoch FROM ts) "
                "FROM config_results WHERE request_id = ANY(%s) ORDER BY ts",
                (open_ids,),
            ).fetchall()
        for vehicle, request_id, ok, errors, ts in rows:
            self.machine.answer(vehicle, request_id, ok, errors, float(ts))

    def _step(self) -> None:
        if self._read_stored_answers.is_set():
            self._read_stored_answers.clear()
            self._answers_stored()
        now = self._clock()
        while not self._answers.empty():
            vehicle, request_id, ok, errors = self._answers.get_nowait()
            self.machine.answer(vehicle, request_id, ok, errors, now)
        for action in self.machine.tick(now):
            if isinstance(action, Send):
                self._send(action)
            else:
                self._measure(action, now)
        self._store()

    def _send(self, send: Send) -> None:
        if send.kind == "set":
            action, body = "set", {"rules": self.machine.plan.changes}
        else:
            action, body = restore_request(self.machine.plan.changes, self._previous.get(send.vehicle_id))
        payload = json.dumps({"schema_version": 1, "request_id": send.request_id, **body})
        self._client.publish(f"{self._prefix}/{send.vehicle_id}/config/{action}", payload, qos=1)
        log.info("request sent", vehicle_id=send.vehicle_id, request_id=send.request_id, action=action)

    def _measure(self, m: MeasureRates, now: float) -> None:
        with self._pool.connection() as conn:
            before = alert_rate(conn, m.canary, *m.before)
            after = alert_rate(conn, m.canary, *m.after)
            rest = alert_rate(conn, m.rest, *m.after)
        self.machine.rates(before, after, rest, now)

    # -- the store --

    def _store(self) -> None:
        changed, steps = self.machine.take_changes()
        if not changed and not steps:
            return
        rid = self.machine.rollout_id
        with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            cur.executemany(
                "UPDATE rollout_vehicles SET wave = %s, state = %s, request_id = %s, errors = %s, "
                "sent_at = to_timestamp(%s), answered_at = to_timestamp(%s) WHERE rollout_id = %s AND vehicle_id = %s",
                [
                    (p.wave, p.state.value, p.request_id, Jsonb(p.errors), p.sent_s, p.answered_s, rid, v)
                    for v in changed
                    if (p := self.machine.vehicles[v])
                ],
            )
            cur.executemany(
                "INSERT INTO rollout_steps (rollout_id, step, detail) VALUES (%s, %s, %s)",
                [(rid, name, Jsonb(detail)) for name, detail in steps],
            )
            cur.execute(
                "UPDATE rollouts SET state = %s, updated_at = now() WHERE rollout_id = %s",
                (self.machine.phase.value, rid),
            )
        for name, detail in steps:
            log.info(f"rollout {name}", rollout_id=rid, **{k: v for k, v in detail.items() if k != "groups"})


class RolloutBusy(RuntimeError):
    """Another process holds the roll-out."""


def create_rollout(
    pool: ConnectionPool, rollout_id: str, plan: Plan, vehicles: Sequence[str], now_s: float
) -> tuple[Rollout, dict[str, dict[str, Any] | None]]:
    """A new roll-out, stored with each vehicle's ``rules/state`` before it; and those states."""
    machine = Rollout(rollout_id, plan, vehicles, now_s)
    with pool.connection() as conn, conn.transaction():
        rows = conn.execute(
            "SELECT vehicle_id, payload FROM rules_state WHERE vehicle_id = ANY(%s)", (list(machine.vehicles),)
        ).fetchall()
        previous: dict[str, dict[str, Any] | None] = {v: None for v in machine.vehicles} | {r[0]: r[1] for r in rows}
        conn.execute(
            "INSERT INTO rollouts (rollout_id, state, changes, plan) VALUES (%s, %s, %s, %s)",
            (rollout_id, machine.phase.value, Jsonb(plan.changes), Jsonb(asdict(plan))),
        )
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO rollout_vehicles (rollout_id, vehicle_id, wave, state, previous) "
                "VALUES (%s, %s, %s, %s, %s)",
                [(rollout_id, v, p.wave, p.state.value, Jsonb(previous[v])) for v, p in machine.vehicles.items()],
            )
    return machine, previous


def load_rollout(
    pool: ConnectionPool, rollout_id: str, now_s: float
) -> tuple[Rollout, dict[str, dict[str, Any] | None]] | None:
    """The stored roll-out ``rollout_id`` as it was when its process ended, and the vehicles' states before it;
    None if unknown."""
    with pool.connection() as conn:
        head = conn.execute("SELECT state, plan FROM rollouts WHERE rollout_id = %s", (rollout_id,)).fetchone()
        if head is None:
            return None
        rows = conn.execute(
            "SELECT vehicle_id, wave, state, request_id, coalesce(errors, '[]'::jsonb), extract(epoch FROM sent_at), "
            "extract(epoch FROM answered_at), previous FROM rollout_vehicles WHERE rollout_id = %s",
            (rollout_id,),
        ).fetchall()
        steps = conn.execute(
            "SELECT step, detail FROM rollout_steps WHERE rollout_id = %s ORDER BY id", (rollout_id,)
        ).fetchall()
    vehicles = {
        v: VehicleProgress(wave, VehicleState(state), request_id, _seconds(sent), _seconds(answered), errors)
        for v, wave, state, request_id, errors, sent, answered, _ in rows
    }
    machine = Rollout.resumed(rollout_id, Plan(**head[1]), Phase(head[0]), vehicles, steps, now_s)
    return machine, {r[0]: r[7] for r in rows}


def _seconds(epoch: Any) -> float | None:
    return None if epoch is None else float(epoch)


def status_text(pool: ConnectionPool, rollout_id: str) -> str | None:
    """``fleet rollout status``: the roll-out, its vehicles per wave and state, and its steps; None if unknown."""
    with pool.connection() as conn:
        head = conn.execute(
            "SELECT state, created_at, updated_at, changes, plan FROM rollouts WHERE rollout_id = %s", (rollout_id,)
        ).fetchone()
        if head is None:
            return None
        counts = conn.execute(
            "SELECT wave, state, count(*) FROM rollout_vehicles WHERE rollout_id = %s GROUP BY 1, 2 ORDER BY 1, 2",
            (rollout_id,),
        ).fetchall()
        refused = conn.execute(
            "SELECT vehicle_id, errors FROM rollout_vehicles WHERE rollout_id = %s AND state IN ('refused', "
            "'restore_failed') ORDER BY vehicle_id",
            (rollout_id,),
        ).fetchall()
        steps = conn.execute(
            "SELECT at, step, detail FROM rollout_steps WHERE rollout_id = %s ORDER BY id", (rollout_id,)
        ).fetchall()
        # Vehicles left without an answer (offline): their request waits in the broker's queue for them, and
        # the answer they give when back is stored by ingest; pending until then.
        late = conn.execute(
            "SELECT CASE WHEN r.ok IS NULL THEN 'pending' WHEN r.ok THEN 'applied' ELSE 'refused' END, count(*) "
            "FROM rollout_vehicles v LEFT JOIN config_results r ON r.request_id = v.request_id "
            "AND r.vehicle_id = v.vehicle_id WHERE v.rollout_id = %s AND v.state IN ('sent', 'no_answer', "
            "'restoring', 'restore_failed') GROUP BY 1 ORDER BY 1",
            (rollout_id,),
        ).fetchall()
    state, created, updated, changes, plan = head
    lines = [
        f"rollout {rollout_id}: {state} (started {created:%Y-%m-%d %H:%M:%S}, last change {updated:%H:%M:%S})",
        f"changes: {json.dumps(changes)}",
        f"plan: {json.dumps({k: v for k, v in plan.items() if k != 'changes'})}",
        "vehicles:",
    ]
    lines += [f"  wave {wave:>2}  {st:<15} {n}" for wave, st, n in counts]
    lines += [f"  {v}: {json.dumps(errors)}" for v, errors in refused]
    if late:
        lines.append("without an answer in the roll-out, since (answers stored by ingest):")
        lines += [f"  {what:<15} {n}" for what, n in late]
    lines.append("steps:")
    lines += [f"  {at:%H:%M:%S} {step}: {json.dumps(detail)}" for at, step, detail in steps]
    return "\n".join(lines)
