"""The whole chain with the real daemon: daemon -> vehicle broker -> bridge -> fleet broker -> ingest -> PostgreSQL,
and a roll-out back the same way."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import yaml

from cabin_monitor.assets import sample_path
from tests.support.daemon import DaemonProcess, clean_environment
from tests.support.fleet import (
    BridgedVehicleBroker,
    FleetCommand,
    account_url,
    fleet_broker,
    fleet_database,
    ingest,
    query,
    requires_postgres,
)
from tests.support.helpers import wait_until
from tests.support.pki import make_test_pki

pytestmark = requires_postgres()


@pytest.mark.slow
def test_a_rollout_reaches_the_real_daemon_through_the_bridge(tmp_path: Path) -> None:
    """The daemon's health and rules reach the store; a roll-out reaches it, is applied; an aborted one restores it."""
    pki = make_test_pki(tmp_path / "pki")
    config = tmp_path / "cabin-monitor.yaml"
    with (
        fleet_database() as dsn,
        fleet_broker(tmp_path / "fleet", ["car-1"], pki=pki) as fleet,
        BridgedVehicleBroker(tmp_path / "vehicle", fleet, "car-1") as vehicle,
    ):
        worker = ingest(tmp_path, fleet.url, dsn, "ingest-a")
        config.write_text(
            yaml.safe_dump(
                {
                    "vehicle_id": "car-1",
                    "state_dir": str(tmp_path / "state"),
                    "mqtt": {
                        "url": vehicle.url,
                        "reconnect_min_s": 0.1,
                        "reconnect_max_s": 0.5,
                        "health_interval_s": 1,
                    },
                    "logging": {"format": "json"},
                }
            )
        )
        clip = str(sample_path("single_face.mp4"))
        daemon = DaemonProcess(tmp_path, ["--config", str(config), "--source", clip, "--loop"], env=clean_environment())
        try:
            stored = "SELECT count(*) FROM health_latest h JOIN rules_state r USING (vehicle_id)"
            wait_until(lambda: query(dsn, stored)[0][0] == 1, 120, "the daemon's health and rules stored")
            (tmp_path / "vehicles").write_text("car-1\n")
            args = ["rollout", "--broker", account_url(fleet.url, "fleet-rollout"), "--db", dsn, "--id", "e2e"]
            args += ["--vehicles", str(tmp_path / "vehicles"), "--canary", "100%", "--set", "stress.sustain_s=4.5"]
            rollout = FleetCommand(tmp_path, args)
            assert rollout.wait(120) == 0, rollout.output()
            cause = "SELECT cause, request_id, payload #> '{rules,stress,sustain_s}' FROM rules_state"
            wait_until(lambda: query(dsn, cause)[0][0] == "config/set", 30, "the new rules/state stored")
            assert query(dsn, cause) == [("config/set", "e2e/set/car-1", 4.5)]
            assert query(dsn, "SELECT ok FROM config_results WHERE request_id = 'e2e/set/car-1'") == [(True,)]

            # car-9 never answers: with half the canary silent the roll-out aborts, and car-1 gets its 4.5 back.
            (tmp_path / "vehicles").write_text("car-1\ncar-9\n")
            args[args.index("e2e")] = "e2e-abort"
            args[args.index("stress.sustain_s=4.5")] = "stress.sustain_s=6"
            args += ["--answer-timeout", "5s", "--max-failures-percent", "40", "--min-answered", "2"]
            aborted = FleetCommand(tmp_path, args)
            assert aborted.wait(120) == 1, aborted.output()
            restored = "SELECT request_id, payload #> '{rules,stress,sustain_s}' FROM rules_state"
            wait_until(lambda: query(dsn, restored)[0][0] == "e2e-abort/restore/car-1", 30, "the restore stored")
            assert query(dsn, restored) == [("e2e-abort/restore/car-1", 4.5)]
            states = "SELECT vehicle_id, state FROM rollout_vehicles WHERE rollout_id = 'e2e-abort' ORDER BY 1"
            assert query(dsn, states) == [("car-1", "restored"), ("car-9", "restore_failed")]
            daemon.proc.send_signal(signal.SIGTERM)
            assert daemon.wait(60) == 0, daemon.logs()[-3000:]
            assert worker.terminate() == 0
            assert query(dsn, "SELECT topic, reason, detail FROM quarantine") == []  # every payload understood
        finally:
            if daemon.proc.poll() is None:
                daemon.kill()
