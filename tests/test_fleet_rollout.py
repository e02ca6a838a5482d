"""fleet rollout end to end: ten vehicles answering as the daemon does, ingest, PostgreSQL, the CLI."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from cabin_monitor.config import RulesConfig
from tests.support.broker import MosquittoBroker
from tests.support.fleet import (
    FleetCommand,
    SimulatedVehicle,
    account_url,
    fleet_broker,
    fleet_database,
    ingest,
    query,
    requires_postgres,
)
from tests.support.helpers import wait_until

pytestmark = requires_postgres()

VEHICLES = [f"car-{i}" for i in range(10)]
WAIT_S = 4.0
# A stress start every sustain_s: 2 alerts per second per vehicle before any change.
BASE = RulesConfig.model_validate({"stress": {"sustain_s": 0.5}})


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[MosquittoBroker, str, list[SimulatedVehicle]]]:
    """Fleet broker, a fresh store fed by one ingest process, and ten vehicles reporting for WAIT_S already."""
    with fleet_database() as dsn, fleet_broker(tmp_path / "fleet", [*VEHICLES, "car-late"]) as broker:
        worker = ingest(tmp_path, broker.url, dsn, "ingest-a")
        wait_until(lambda: "connected to the fleet broker" in worker.output(), 30, "ingest connected")
        cars = [SimulatedVehicle(broker.url, v, BASE) for v in VEHICLES]
        try:
            seen = "SELECT count(*) FROM rules_state"
            wait_until(lambda: query(dsn, seen)[0][0] == len(VEHICLES), 30, "every vehicle's rules stored")
            time.sleep(WAIT_S + 0.5)  # a 'before' window for the canary
            yield broker, dsn, cars
        finally:
            for car in cars:
                car.close()
            worker.terminate()


def rollout(tmp_path: Path, broker: MosquittoBroker, dsn: str, rollout_id: str, *options: str) -> FleetCommand:
    """``fleet rollout`` over every vehicle in the store as the rollout identity: 10 % canary, 3 waves."""
    url = account_url(broker.url, "fleet-rollout")
    args = ["rollout", "--broker", url, "--db", dsn, "--all", "--id", rollout_id, "--canary", "10%", "--waves", "3"]
    args += ["--wait", f"{WAIT_S}s", "--answer-timeout", "5s", "--max-per-minute", "600", *options]
    return FleetCommand(tmp_path, args)


def test_canary_then_waves_then_done(
    tmp_path: Path, fleet: tuple[MosquittoBroker, str, list[SimulatedVehicle]]
) -> None:
    """A change that leaves alert rates alone reaches every vehicle: canary, wait, three waves, done, all stored."""
    broker, dsn, cars = fleet
    command = rollout(tmp_path, broker, dsn, "ok-1", "--set", "stress.cooldown_s=45", "--abort-if-rate-above", "3")
    assert command.wait(90) == 0, command.output()
    assert all(car.overrides() == {"stress.cooldown_s": 45.0} for car in cars)
    states = query(dsn, "SELECT state, count(*) FROM rollout_vehicles WHERE rollout_id = 'ok-1' GROUP BY 1")
    assert states == [("applied", 10)]
    steps = [r[0] for r in query(dsn, "SELECT step FROM rollout_steps WHERE rollout_id = 'ok-1' ORDER BY id")]
    assert steps[:4] == ["planned", "wave answered", "observing canary", "rates"] and steps[-1] == "done"
    assert steps.count("wave started") == 3
    status = FleetCommand(tmp_path, ["rollout", "status", "ok-1", "--db", dsn])
    assert status.wait(60) == 0
    assert "rollout ok-1: done" in status.output() and "applied" in status.output()
    again = FleetCommand(tmp_path, ["rollout", "resume", "ok-1", "--broker", broker.url, "--db", dsn])
    assert again.wait(60) == 2 and "has ended (done); nothing to resume" in again.output()


def test_canary_alerting_far_more_aborts_and_is_restored(
    tmp_path: Path, fleet: tuple[MosquittoBroker, str, list[SimulatedVehicle]]
) -> None:
    """A change that makes the canary alert ten times as often: abort after the wait, canary reset, nobody else."""
    broker, dsn, cars = fleet
    command = rollout(tmp_path, broker, dsn, "bad-1", "--set", "stress.sustain_s=0.05", "--abort-if-rate-above", "3")
    assert command.wait(90) == 1, command.output()
    assert "rollout bad-1: aborted" in command.output()
    assert [car.overrides() for car in cars] == [{}] * 10
    rows = query(dsn, "SELECT vehicle_id, state FROM rollout_vehicles WHERE rollout_id = 'bad-1' ORDER BY vehicle_id")
    assert rows == [("car-0", "restored")] + [(v, "waiting") for v in VEHICLES[1:]]
    (detail,) = [r[0] for r in query(dsn, "SELECT detail FROM rollout_steps WHERE step = 'rates'")]
    assert detail["decision"] == "abort"
    assert detail["canary_after"]["per_hour"] > 3 * detail["canary_before"]["per_hour"]


def test_a_rollout_killed_mid_wave_is_resumed_and_held_by_one_process(
    tmp_path: Path, fleet: tuple[MosquittoBroker, str, list[SimulatedVehicle]]
) -> None:
    """SIGKILLed in its first wave, `rollout resume` goes on from the store (refused while another holds it)."""
    broker, dsn, cars = fleet
    command = rollout(tmp_path, broker, dsn, "kill-1", "--set", "stress.cooldown_s=45", "--max-per-minute", "60")
    started = "SELECT count(*) FROM rollout_steps WHERE rollout_id = 'kill-1' AND step = 'wave started'"
    wait_until(lambda: query(dsn, started)[0][0] == 1, 60, "the first wave started")
    command.kill()
    url = account_url(broker.url, "fleet-rollout")
    resume = ["rollout", "resume", "kill-1", "--broker", url, "--db", dsn]
    with psycopg.connect(dsn, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(hashtext('kill-1'))")
        busy = FleetCommand(tmp_path, resume)
        assert busy.wait(60) == 1 and "being run by another process" in busy.output()
    resumed = FleetCommand(tmp_path, resume)
    assert resumed.wait(90) == 0, resumed.output()
    assert "rollout kill-1: done" in resumed.output()
    assert all(car.overrides() == {"stress.cooldown_s": 45.0} for car in cars)
    assert query(dsn, "SELECT state, count(*) FROM rollout_vehicles WHERE rollout_id = 'kill-1' GROUP BY 1") == [
        ("applied", 10)
    ]
    steps = [r[0] for r in query(dsn, "SELECT step FROM rollout_steps WHERE rollout_id = 'kill-1' ORDER BY id")]
    assert steps.count("resumed") == 1 and steps.count("wave started") == 3 and steps[-1] == "done"


def test_a_vehicle_offline_during_a_rollout_is_pending_until_it_answers(
    tmp_path: Path, fleet: tuple[MosquittoBroker, str, list[SimulatedVehicle]]
) -> None:
    """Offline through its wave, a vehicle shows as pending; back online, it applies the queued change."""
    broker, dsn, _ = fleet
    stored = "SELECT count(*) FROM health_latest WHERE vehicle_id = 'car-late'"
    late = SimulatedVehicle(broker.url, "car-late", BASE, persistent=True)
    wait_until(lambda: query(dsn, stored)[0][0] == 1, 30, "car-late's health stored")
    late.close()  # offline; the broker keeps its session and queues what comes for it
    command = rollout(tmp_path, broker, dsn, "late-1", "--set", "stress.cooldown_s=45")
    assert command.wait(90) == 0, command.output()
    answers = "SELECT state, count(*) FROM rollout_vehicles WHERE rollout_id = 'late-1' GROUP BY 1 ORDER BY 1"
    assert query(dsn, answers) == [("applied", 10), ("no_answer", 1)]
    status = FleetCommand(tmp_path, ["rollout", "status", "late-1", "--db", dsn])
    assert status.wait(60) == 0 and "  pending         1" in status.output()
    back = SimulatedVehicle(broker.url, "car-late", BASE, persistent=True)
    try:
        result = "SELECT ok FROM config_results WHERE request_id = 'late-1/set/car-late'"
        wait_until(lambda: query(dsn, result) == [(True,)], 30, "car-late's answer stored")
        assert back.overrides() == {"stress.cooldown_s": 45.0}
    finally:
        back.close()
    status = FleetCommand(tmp_path, ["rollout", "status", "late-1", "--db", dsn])
    assert status.wait(60) == 0 and "  applied         1" in status.output() and "pending" not in status.output()
