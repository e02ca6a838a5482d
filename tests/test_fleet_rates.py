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

from cabin_monitor.bus.payloads import ChangeCause
from cabin_monitor.config import RulesConfig
from cabin_monitor.fleet.records import classify
from cabin_monitor.fleet.store import PartitionCache, write_records
from cabin_monitor.messages import RemoteRequest
from tests.support.browser import open_offline
from tests.support.fleet import (
    FleetCommand,
    event_json,
    fleet_database,
    health_at,
    requires_postgres,
    shadow_event_json,
)
from tests.support.vehicle_rules import VehicleRules

pytestmark = requires_postgres()


def rules_state(vehicle_id: str, change: dict[str, Any] | None) -> bytes:
    """The rules/state a daemon publishes after ``change`` (a config/set rules mapping), or at start."""
    control = VehicleRules(RulesConfig())
    if change is not None:
        request = RemoteRequest("set", json.dumps({"rules": change}).encode(), retained=False, received_s=0.0)
        assert control.handle(request).ok
    return control.state(vehicle_id, "start").model_dump_json().encode()


def request(action: str, body: dict[str, Any]) -> RemoteRequest:
    """A config request as the daemon receives it."""
    return RemoteRequest(action, json.dumps(body).encode(), retained=False, received_s=0.0)  # type: ignore[arg-type]


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
    with fleet_database() as dsn:
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


def test_report_page_loads_offline_in_a_browser_and_draws_both_plots(tmp_path: Path, store: str) -> None:
    """fleet report's page opens in headless Chromium with the network off: no console error, no request beyond
    its own folder, both plots drawn with their data."""
    command = FleetCommand(tmp_path, ["report", "--db", store, "--since", "1d", "--out", str(tmp_path / "report")])
    assert command.wait(60) == 0, command.output()
    plots = "[...document.querySelectorAll('.js-plotly-plot')]"
    with open_offline(
        tmp_path / "report" / "index.html", f"{plots}.length == 2 && {plots}.every(d => d._fullLayout)"
    ) as tab:
        drawn = tab.page.evaluate(f"{plots}.map(d => d.querySelectorAll('g.trace').length)")
    assert tab.errors == []
    assert [url for url in tab.requests if not url.startswith("file:")] == []
    assert len(drawn) == 2 and all(traces >= 1 for traces in drawn)


def state_message(rules: VehicleRules, vehicle_id: str, cause: ChangeCause, ts_s: float) -> tuple[str, bytes]:
    """The rules/state message of ``vehicle_id`` with the rules (and shadow rules) in force, stamped ``ts_s``."""
    return f"cabin/{vehicle_id}/rules/state", rules.state(
        vehicle_id, cause, wall_time_s=ts_s
    ).model_dump_json().encode()


@pytest.fixture
def shadow_store() -> Iterator[str]:
    """car-1 runs shadow rules (stress.sustain_s 1.5) from an hour H - 30 min on, car-2 from H for 30 min, car-3
    never; health from H - 1 h to H + 1 h for car-1, over hour H for the others."""
    hour = math.floor(time.time() / 3600 - 3) * 3600.0
    car1, car2, car3 = (VehicleRules(RulesConfig()) for _ in range(3))
    messages = [state_message(car1, "car-1", "start", hour - 3600)]
    assert car1.handle(request("set", {"rules": {"stress": {"sustain_s": 1.5}}, "shadow": True})).ok
    messages.append(state_message(car1, "car-1", "config/set", hour - 1800))
    assert car2.handle(request("set", {"rules": {"stress": {"enter_score": 0.5}}, "shadow": True})).ok
    messages.append(state_message(car2, "car-2", "config/set", hour))
    assert car2.handle(request("reset", {"shadow": True})).ok
    messages.append(state_message(car2, "car-2", "config/reset", hour + 1800))
    messages.append(state_message(car3, "car-3", "start", time.time()))
    messages += [("cabin/car-1/health", health_at("car-1", t)) for t in (hour - 3600, hour - 1, hour, hour + 3599)]
    for vehicle in ("car-2", "car-3"):
        messages += [(f"cabin/{vehicle}/health", health_at(vehicle, t)) for t in (hour, hour + 3599)]
    # car-1: live alerts 1 before its shadow set (not counted) and 3 while it ran; 6 shadow starts and an end.
    messages += [("cabin/car-1/events", event_json("car-1", ts_s=hour - 2400 + 1000 * i)) for i in range(4)]
    messages += [("cabin/car-1/shadow/events", shadow_event_json("car-1", hour - 1500 + 300 * i)) for i in range(6)]
    messages.append(("cabin/car-1/shadow/events", shadow_event_json("car-1", hour + 600, phase="end")))
    # car-2: 1 live and 2 shadow alerts while its shadow set ran, 1 of each after; car-3: 5 live alerts.
    messages += [("cabin/car-2/events", event_json("car-2", ts_s=t)) for t in (hour + 600, hour + 2400)]
    messages += [
        ("cabin/car-2/shadow/events", shadow_event_json("car-2", t)) for t in (hour + 100, hour + 200, hour + 2000)
    ]
    messages += [("cabin/car-3/events", event_json("car-3", ts_s=hour + 60 * i)) for i in range(5)]
    with fleet_database() as dsn:
        with psycopg.connect(dsn) as conn:
            write_records(conn, [classify(t, p) for t, p in messages], PartitionCache())
        yield dsn


def test_shadow_comparison_counts_only_the_hours_each_vehicle_ran_shadow_rules(
    tmp_path: Path, shadow_store: str
) -> None:
    """rates --shadow: car-1 3 live / 6 shadow alerts in 5398 s, car-2 1 / 2 in 1800 s, car-3 left out; what differs."""
    command = FleetCommand(tmp_path, ["rates", "--db", shadow_store, "--since", "1d", "--shadow", "--json"])
    assert command.wait(60) == 0, command.output()
    data = json.loads(command.output())
    car1_h, car2_h = 5398 / 3600, 1800 / 3600
    assert [v["vehicle_id"] for v in data["vehicles"]] == ["car-1", "car-2"]
    car1, car2 = data["vehicles"]
    assert (car1["live"]["alerts"], car1["shadow"]["alerts"], car2["live"]["alerts"], car2["shadow"]["alerts"]) == (
        3,
        6,
        1,
        2,
    )
    assert car1["live"]["vehicle_hours"] == pytest.approx(car1_h, abs=1e-4)
    assert car1["shadow"]["per_vehicle_hour"] == pytest.approx(6 / car1_h, rel=1e-9)
    assert car2["live"]["per_vehicle_hour"] == pytest.approx(1 / car2_h, rel=1e-9)
    fleet = data["fleet"]
    assert fleet["vehicles"] == 2 and fleet["live"]["vehicle_hours"] == pytest.approx(car1_h + car2_h, abs=1e-4)
    assert fleet["live"]["per_vehicle_hour"] == pytest.approx(4 / (car1_h + car2_h), rel=1e-9)
    assert fleet["shadow"]["per_vehicle_hour"] == pytest.approx(8 / (car1_h + car2_h), rel=1e-9)
    assert car1["shadow_differs"] == {"stress.sustain_s": {"live": 3.0, "shadow": 1.5}}
    assert car2["shadow_differs"] is None  # its shadow set is gone since
    text = FleetCommand(tmp_path, ["rates", "--db", shadow_store, "--since", "1d", "--shadow"])
    assert text.wait(60) == 0, text.output()
    assert "stress.sustain_s = 1.5 (live 3.0)" in text.output() and "car-2" in text.output()
    assert "no shadow set now" in text.output() and "car-3" not in text.output()
