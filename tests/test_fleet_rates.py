"""fleet rates: alerts per vehicle-hour and unusual rules from a real store, through the command line."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cabin_monitor.config import RulesConfig
from cabin_monitor.fleet.db import upgrade
from cabin_monitor.fleet.records import classify
from cabin_monitor.fleet.store import PartitionCache, write_records
from cabin_monitor.messages import RemoteRequest
from tests.support.fleet import FleetCommand, event_json, fresh_database, health_json, pg_unreachable_reason
from tests.support.vehicle_rules import VehicleRules

pytestmark = pytest.mark.skipif(pg_unreachable_reason() is not None, reason=str(pg_unreachable_reason()))


def rules_state(vehicle_id: str, change: dict[str, Any] | None) -> bytes:
    """The rules/state a daemon publishes after ``change`` (a config/set rules mapping), or at start."""
    control = VehicleRules(RulesConfig())
    if change is not None:
        request = RemoteRequest("set", json.dumps({"rules": change}).encode(), retained=False, received_s=0.0)
        assert control.handle(request).ok
    return control.state(vehicle_id, "start").model_dump_json().encode()


def health_at(vehicle_id: str, ts_s: float) -> bytes:
    """A health payload stamped ``ts_s``."""
    data = json.loads(health_json(vehicle_id))
    data["ts"] = json.loads(event_json(vehicle_id, ts_s=ts_s))["ts"]
    return json.dumps(data).encode()


@pytest.fixture
def store() -> Iterator[str]:
    """A store holding three vehicles' hour: car-1 6 alerts and its own stress.sustain_s, car-2 1 alert, car-3 none."""
    hour = math.floor(time.time() / 3600 - 3) * 3600.0
    messages = []
    for vehicle in ("car-1", "car-2", "car-3"):
        messages += [(f"cabin/{vehicle}/health", health_at(vehicle, t)) for t in (hour, hour + 3599)]
        change = {"stress": {"sustain_s": 5.0}} if vehicle == "car-1" else None
        messages.append((f"cabin/{vehicle}/rules/state", rules_state(vehicle, change)))
    messages += [("cabin/car-1/events", event_json("car-1", ts_s=hour + 60 * i)) for i in range(6)]
    messages.append(("cabin/car-2/events", event_json("car-2", ts_s=hour + 100, rule="unexpected_expression")))
    with fresh_database() as dsn:
        upgrade(dsn)
        with psycopg.connect(dsn) as conn:
            write_records(conn, [classify(t, p) for t, p in messages], PartitionCache())
        yield dsn


def test_rates_per_vehicle_hour_top_vehicles_and_rules_that_differ(tmp_path: Path, store: str) -> None:
    """car-1: 6 alerts in its hour, car-2: 1 in its hour; car-1's stress.sustain_s differs from the fleet's usual."""
    command = FleetCommand(tmp_path, ["rates", "--db", store, "--since", "1d", "--json"])
    assert command.wait(60) == 0, command.output()
    data = json.loads(command.output())
    by_rule = FleetCommand(tmp_path, ["rates", "--db", store, "--since", "1d", "--by", "rule"])
    assert by_rule.wait(60) == 0
    assert data["fleet"]["alerts"] == 7 and data["fleet"]["vehicle_hours"] == pytest.approx(3 * 3599 / 3600, abs=1e-3)
    assert [t["vehicle_id"] for t in data["top_vehicles"]] == ["car-1", "car-2", "car-3"]
    assert data["groups"]["car-1"]["per_vehicle_hour"] == pytest.approx(6 * 3600 / 3599, rel=1e-3)
    assert data["rules_differing"] == {"car-1": {"stress.sustain_s": 5.0}}
    assert data["usual_rules"]["stress.sustain_s"] == 3.0
    text = by_rule.output()
    assert "stress" in text and "unexpected_expression" in text and "car-1" in text and "(usually 3.0)" in text


def test_report_is_an_html_page_with_its_plots_and_the_differing_rules(tmp_path: Path, store: str) -> None:
    """fleet report --out DIR: index.html with two plots, car-1's differing value, plotly.min.js beside it."""
    command = FleetCommand(tmp_path, ["report", "--db", store, "--since", "1d", "--out", str(tmp_path / "report")])
    assert command.wait(60) == 0, command.output()
    page = (tmp_path / "report" / "index.html").read_text()
    assert page.count("Plotly.newPlot") == 2 and '<script src="plotly.min.js">' in page
    assert "<td>car-1</td><td>stress.sustain_s</td><td>5.0</td><td>3.0</td>" in page
    assert "7 alerts" in page and "unexpected_expression" in page
    assert (tmp_path / "report" / "plotly.min.js").stat().st_size > 1_000_000
