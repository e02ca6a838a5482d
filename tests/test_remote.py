"""Tests of operators' requests: the dispatch table, the checks of each payload, answers, the worker."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from structlog.testing import capture_logs

from cabin_monitor.bus.payloads import ConfigResultPayload, ConfigSetPayload
from cabin_monitor.bus.remote import (
    DISPATCH,
    Answer,
    RemoteRequests,
    RequestQueue,
    Route,
    RuleSets,
    TokenBucket,
    answer,
    check_request,
    encode_payload,
    request_topics,
)
from cabin_monitor.config import EMOTIONS_7, RemoteConfigConfig, RulesConfig
from cabin_monitor.messages import RemoteAction, RemoteRequest
from cabin_monitor.rules.in_force import PRECEDENCE, Outcome, RulesInForce
from cabin_monitor.rules.shadow import ShadowRules
from tests.support.helpers import wait_until

NOW = 1_700_000_000.0


def in_force(tmp_path: Path, base: RulesConfig | None = None) -> RulesInForce:
    """Rules in force persisting to tmp_path, for the 7-class model."""
    return RulesInForce(base or RulesConfig(), EMOTIONS_7, tmp_path / "override.json")


def sets(rules: RulesInForce, shadow_path: Path | None = None, shadow: RulesConfig | None = None) -> RuleSets:
    """The live rules with shadow rules beside them (the file's ``shadow``, none by default), for the 7-class model."""
    return RuleSets(rules, ShadowRules(shadow, lambda: rules.effective, EMOTIONS_7, shadow_path))


def request(action: RemoteAction, body: Any, retained: bool = False) -> RemoteRequest:
    """A request as the broker connection hands it over (``body`` as JSON, or bytes as they are)."""
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return RemoteRequest(action, payload, retained, received_s=0.0)


def ask(rules: RulesInForce, action: RemoteAction, body: Any, retained: bool = False) -> Answer:
    """The answer to one request through its DISPATCH row, with a 4096-byte limit."""
    return answer(request(action, body, retained), DISPATCH[action], sets(rules), 4096, NOW)


class Outlet:
    """Collects what the worker publishes (a fake broker side, for the worker's own logic)."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []
        self.states: list[dict[str, Any]] = []

    def publish_config_result(self, payload: bytes) -> None:
        self.results.append(json.loads(payload))

    def publish_rules_state(self, payload: bytes) -> None:
        self.states.append(json.loads(payload))


def worker_for(rules: RulesInForce, settings: RemoteConfigConfig, **kwargs: Any) -> tuple[RemoteRequests, Outlet]:
    """A worker over a fresh queue, answering into an Outlet."""
    outlet = Outlet()
    worker = RemoteRequests(RequestQueue(settings), sets(rules), outlet, settings, "car-1", **kwargs)
    return worker, outlet


def test_every_action_has_one_row_with_a_model_a_handler_and_a_cause() -> None:
    """The table covers exactly the actions; each row has a payload model and a handler; changes have a cause."""
    assert set(DISPATCH) == set(typing.get_args(RemoteAction))
    for action, route in DISPATCH.items():
        assert issubclass(route.model, BaseModel) and "request_id" in route.model.model_fields, action
        assert callable(route.handler) and callable(route.shadow_handler)
    assert {action: route.cause for action, route in DISPATCH.items()} == {
        "set": "config/set",
        "get": None,
        "reset": "config/reset",
    }


def test_the_subscriptions_are_the_tables_topics() -> None:
    """request_topics gives config/<action> under the vehicle's base for every row, and nothing else."""
    assert request_topics("cabin/car-1") == {
        "cabin/car-1/config/set": "set",
        "cabin/car-1/config/get": "get",
        "cabin/car-1/config/reset": "reset",
    }
    assert list(request_topics("x/y").values()) == list(DISPATCH)


def test_an_unknown_action_is_refused_without_an_answer(tmp_path: Path) -> None:
    """An action the table lacks is logged and not answered; nothing changes."""
    worker, outlet = worker_for(in_force(tmp_path), RemoteConfigConfig())
    with capture_logs() as logs:
        assert worker.handle(request(cast(RemoteAction, "tune"), {"rules": {"smoothing_s": 1}})) is None
    assert [e["event"] for e in logs] == ["operator request refused: unknown action"]
    assert outlet.results == outlet.states == [] and worker.stats().answered == 0


def test_payload_shape_refusals_name_the_field(tmp_path: Path) -> None:
    """A set without rules, or with rules that are no mapping, is refused with the field named; nothing moves."""
    rules = in_force(tmp_path)
    for body in ({"request_id": "x"}, {"rules": "all"}):
        refused = ask(rules, "set", body)
        assert refused.changed is None and [e.path for e in refused.payload.errors] == ["rules"]
    assert rules.effective == RulesConfig() and not (tmp_path / "override.json").exists()


def test_rule_problems_come_back_with_their_paths(tmp_path: Path) -> None:
    """A change the rules refuse is answered with each problem's path and message, and logged."""
    with capture_logs() as logs:
        refused = ask(in_force(tmp_path), "set", {"request_id": "b", "rules": {"stress": {"sustian_s": 2}}}).payload
    assert (refused.ok, refused.request_id) == (False, "b")
    assert [e.path for e in refused.errors] == ["rules.stress.sustian_s"]
    assert refused.errors[0].message == "unknown key (not a setting here; check the spelling)"
    (logged,) = [e for e in logs if e["event"] == "config/set refused"]
    assert logged["errors"] == [e.model_dump() for e in refused.errors]


def test_non_json_oversized_and_non_object_payloads_are_refused(tmp_path: Path) -> None:
    """Garbage bytes, payloads over the limit and JSON that is not an object get error results."""
    rules = in_force(tmp_path)
    assert not ask(rules, "set", b"\xff\xfe").payload.ok
    assert not ask(rules, "set", b"{" * 5000).payload.ok
    assert "at most 4096" in ask(rules, "set", b" " * 5000).payload.errors[0].message
    assert not ask(rules, "set", b"[1, 2]").payload.ok
    assert ask(rules, "get", []).payload.errors[0].message == "payload must be a JSON object"
    assert rules.effective == RulesConfig()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    """Any byte string yields an answer, never an exception."""
    rules = RulesInForce(RulesConfig(), EMOTIONS_7, None)
    assert ask(rules, "set", data).payload.ok in (True, False)


def test_requests_are_checked_before_anything_is_applied() -> None:
    """Size, JSON, shape and request_id are checked first: a refused request never becomes a request."""
    long_id = "x" * 129
    refused = [
        json.dumps({"rules": {"x": "y" * 300}}).encode(),
        b"{not json",
        b"[1, 2]",
        json.dumps({"request_id": long_id, "rules": {}}).encode(),
    ]
    answers = [check_request("set", ConfigSetPayload, body, 200, NOW) for body in refused]
    assert all(isinstance(a, ConfigResultPayload) and not a.ok for a in answers)
    last = cast(ConfigResultPayload, answers[3])
    assert last.request_id is None and last.errors[0].path == "request_id"
    checked = check_request("set", ConfigSetPayload, b'{"request_id": "ok", "rules": {}}', 200, NOW)
    assert isinstance(checked, ConfigSetPayload) and checked.request_id == "ok"


def test_a_handler_that_fails_is_answered_with_the_error(tmp_path: Path) -> None:
    """An exception in a handler becomes an error answer naming it, with the request_id, and is logged."""

    def fail(rules: RuleSets, req: ConfigSetPayload, wall_time_s: float) -> Outcome:
        raise RuntimeError("disk full")

    body = {"request_id": "r-9", "rules": {"smoothing_s": 1.0}}
    with capture_logs() as logs:
        route = Route(ConfigSetPayload, fail, "config/set", fail)
        result = answer(request("set", body), route, sets(in_force(tmp_path)), 4096, NOW)
    assert not result.payload.ok and result.payload.request_id == "r-9" and result.changed is None
    assert result.payload.errors[0].message == "the change could not be applied: RuntimeError: disk full"
    assert any(e["event"] == "config/set handler failed" and e["log_level"] == "error" for e in logs)


def test_a_retained_request_is_answered_and_never_applied(tmp_path: Path) -> None:
    """A retained config/set or config/reset (a broker replay) is refused with its request_id; nothing changes."""
    rules = in_force(tmp_path)
    rules.change({"occupant_lost": {"lost_after_s": 9}}, None, NOW)
    cases: list[tuple[RemoteAction, Any]] = [("set", {"request_id": "old", "rules": {"stress": {"sustain_s": 7}}})]
    for action, body in [*cases, ("reset", {})]:
        result = ask(rules, action, body, retained=True).payload
        assert not result.ok and result.action == action and result.errors[0].path == "(retained)"
        assert "never applied" in result.errors[0].message
    assert result.request_id is None and ask(rules, "set", {"request_id": "old"}, True).payload.request_id == "old"
    assert rules.effective.stress.sustain_s == 3.0 and rules.effective.occupant_lost.lost_after_s == 9


def test_a_lone_surrogate_request_id_is_answered_with_an_error_naming_it(tmp_path: Path) -> None:
    """JSON "\\ud800" as request_id: refused, the field named, the id echoed escaped; the answer encodes."""
    rules = in_force(tmp_path)
    result = ask(rules, "set", b'{"request_id": "a\\ud800", "rules": {"stress": {"sustain_s": 7}}}').payload
    assert not result.ok and result.errors[0].path == "request_id" and result.request_id == "a\\ud800"
    assert json.loads(encode_payload(result))["request_id"] == "a\\ud800"
    assert rules.effective == RulesConfig()
    odd_key = ask(rules, "set", b'{"rules": {"\\udfff": 1}}').payload
    assert not odd_key.ok and json.loads(encode_payload(odd_key))["errors"]


def test_get_answers_the_rules_with_their_sources(tmp_path: Path) -> None:
    """config/get answers the rules in force, which values are overrides, and the precedence; nothing changes."""
    rules = in_force(tmp_path, RulesConfig.model_validate({"stress": {"sustain_s": 4}}))
    rules.change({"stress": {"sustain_s": 7}}, None, NOW)
    rules.take_pending()
    got = ask(rules, "get", {"request_id": "g"})
    result = got.payload
    assert result.ok and result.action == "get" and result.request_id == "g" and got.changed is None
    assert result.rules == rules.effective.model_dump(mode="json")
    assert result.sources is not None and result.overrides is not None
    assert {p for p, source in result.sources.items() if source == "remote"} == {"stress.sustain_s"}
    assert [(o.path, o.remote, o.file) for o in result.overrides] == [("stress.sustain_s", 7, 4.0)]
    assert result.precedence == PRECEDENCE and rules.take_pending() is None
    assert ask(rules, "get", {}).payload.ok


def test_the_answer_and_rules_state_come_from_one_state(tmp_path: Path) -> None:
    """After a change, the answer and the rules/state published carry the same rules, sources and overrides."""
    worker, outlet = worker_for(in_force(tmp_path), RemoteConfigConfig(), wall_clock=lambda: NOW)
    worker.handle(request("set", {"request_id": "s", "rules": {"stress": {"sustain_s": 7}}}))
    worker.handle(request("reset", {"request_id": "r"}))
    assert len(outlet.results) == len(outlet.states) == 2
    for result, state in zip(outlet.results, outlet.states, strict=True):
        assert (result["rules"], result["sources"], result["overrides"], result["request_id"]) == (
            state["rules"], state["sources"], state["overrides"], state["request_id"]
        )  # fmt: skip
    assert [s["cause"] for s in outlet.states] == ["config/set", "config/reset"]


def test_an_older_state_never_replaces_a_newer_one(tmp_path: Path) -> None:
    """A state published late (a reload racing a change) is not sent over the newer one already out."""
    rules = in_force(tmp_path)
    worker, outlet = worker_for(rules, RemoteConfigConfig(), wall_clock=lambda: NOW)
    older = rules.reload(RulesConfig())
    worker.handle(request("set", {"rules": {"stress": {"sustain_s": 7}}}))
    worker.publish_state("reload", older)
    assert [s["cause"] for s in outlet.states] == ["config/set"]


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    """A bucket of 3 at 2/s: three at once, then one per half second."""
    bucket = TokenBucket(2.0, 3)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert [bucket.take(0.25), bucket.take(0.5), bucket.take(0.6), bucket.take(1.0)] == [False, True, False, True]
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]


def test_requests_over_the_rate_are_answered_busy_and_not_applied(tmp_path: Path) -> None:
    """Beyond the burst, requests get a 'busy' answer with their request_id; each change publishes rules/state."""
    now = [0.0]
    settings = RemoteConfigConfig(max_requests_per_s=1.0, burst_requests=2)
    rules = in_force(tmp_path)
    worker, outlet = worker_for(rules, settings, clock=lambda: now[0], wall_clock=lambda: NOW)
    for n in range(1, 5):
        worker.handle(request("set", {"request_id": f"r{n}", "rules": {"stress": {"sustain_s": n}}}))
    now[0] = 1.0
    worker.handle(request("get", {"request_id": "g"}))
    assert [(r["request_id"], r["ok"]) for r in outlet.results] == [
        ("r1", True), ("r2", True), ("r3", False), ("r4", False), ("g", True)
    ]  # fmt: skip
    assert outlet.results[2]["errors"][0]["path"] == "(busy)" and outlet.results[2]["action"] == "set"
    assert rules.effective.stress.sustain_s == 2
    assert [(s["cause"], s["request_id"], s["rules"]["stress"]["sustain_s"]) for s in outlet.states] == [
        ("config/set", "r1", 1), ("config/set", "r2", 2)
    ]  # fmt: skip
    stats = worker.stats()
    assert (stats.answered, stats.busy, stats.dropped) == (5, 2, 0)


def test_a_full_queue_drops_requests_and_counts_them(tmp_path: Path) -> None:
    """offer never blocks: with the queue full, requests are dropped and counted; queued ones are answered."""
    settings = RemoteConfigConfig(queue_size=3)
    requests = RequestQueue(settings)
    outlet = Outlet()
    worker = RemoteRequests(requests, sets(in_force(tmp_path)), outlet, settings, "car-1", wall_clock=lambda: NOW)
    for n in range(5):
        requests.offer(request("get", {"request_id": f"g{n}"}))
    assert (worker.stats().received, worker.stats().dropped, worker.stats().queued) == (5, 2, 3)
    worker.start()
    try:
        wait_until(lambda: len(outlet.results) == 3, what="three answers")
    finally:
        worker.stop()
    assert [r["request_id"] for r in outlet.results] == ["g0", "g1", "g2"]
    assert outlet.states[0]["cause"] == "start" and worker.stats().queued == 0


def test_shadow_requests_take_their_rows_shadow_handlers(tmp_path: Path) -> None:
    """ "shadow": true changes, reads and resets the shadow rules only, echoed in every answer; rules/state carries
    the shadow block while a set exists and is left out again after the reset."""
    live = in_force(tmp_path)
    outlet = Outlet()
    worker = RemoteRequests(
        RequestQueue(RemoteConfigConfig(queue_size=8)),
        sets(live, tmp_path / "shadow.json"),
        outlet,
        RemoteConfigConfig(),
        "car-1",
    )
    patch = {"stress": {"sustain_s": 7}}
    worker.handle(request("set", {"request_id": "s", "shadow": True, "rules": patch}))
    worker.handle(request("get", {"request_id": "g", "shadow": True}))
    worker.handle(request("reset", {"request_id": "r", "shadow": True}))
    worker.handle(request("get", {"request_id": "g2", "shadow": True}))
    assert live.effective == RulesConfig() and live.take_pending() is None
    set_, got, reset, empty = outlet.results
    assert all(a["shadow"] is True and a["ok"] for a in outlet.results)
    assert set_["rules"]["stress"]["sustain_s"] == got["rules"]["stress"]["sustain_s"] == 7
    assert set_["sources"]["stress.sustain_s"] == "remote" and set_["sources"]["stress.enter_score"] == "live"
    assert set_["overrides"] == [{"path": "stress.sustain_s", "remote": 7, "file": 3.0}]
    assert reset["rules"] is reset["sources"] is reset["overrides"] is empty["rules"] is None
    made, dropped = outlet.states
    assert (made["cause"], made["request_id"], made["rules"]) == ("config/set", "s", live.current().values)
    assert made["shadow"] == {k: set_[k] for k in ("rules", "sources", "overrides")}
    assert (dropped["cause"], dropped["request_id"], "shadow" in dropped) == ("config/reset", "r", False)


def test_answers_and_states_without_shadow_rules_keep_their_shape(tmp_path: Path) -> None:
    """Without "shadow": true and without a shadow set, answers and rules/state carry no shadow key."""
    worker, outlet = worker_for(in_force(tmp_path), RemoteConfigConfig())
    worker.start()
    worker.stop()
    worker.handle(request("set", {"request_id": "s", "rules": {"stress": {"sustain_s": 7}}}))
    worker.handle(request("set", {"request_id": "bad", "rules": {"stress": {"sustain_s": -1}}}))
    assert [a["ok"] for a in outlet.results] == [True, False]
    assert not any("shadow" in a for a in outlet.results) and not any("shadow" in s for s in outlet.states)
    assert [s["cause"] for s in outlet.states] == ["start", "config/set"]


def test_shadow_refusals_name_rules_paths_and_a_non_boolean_flag(tmp_path: Path) -> None:
    """A bad shadow patch names rules.… like a live one, echoing shadow; "shadow" must be a JSON boolean."""
    rules = in_force(tmp_path)
    bad = ask(rules, "set", {"request_id": "b", "shadow": True, "rules": {"stress": {"sustian_s": 1}}}).payload
    assert (bad.ok, bad.shadow, [e.path for e in bad.errors]) == (False, True, ["rules.stress.sustian_s"])
    assert json.loads(encode_payload(bad))["shadow"] is True
    for flag in ("yes", 1):
        odd = ask(rules, "set", {"request_id": "f", "shadow": flag, "rules": {}}).payload
        assert not odd.ok and [e.path for e in odd.errors] == ["shadow"]
    assert rules.effective == RulesConfig()


def test_the_queue_is_bounded_in_bytes_and_keeps_no_oversized_payload(tmp_path: Path) -> None:
    """Requests over queue_max_bytes are dropped; one over max_payload_bytes holds no bytes and is refused by size."""
    settings = RemoteConfigConfig(queue_size=100, max_payload_bytes=1000, queue_max_bytes=2500)
    worker, outlet = worker_for(in_force(tmp_path), settings)
    requests = worker._requests  # the queue the worker reads
    padded = {"request_id": "p", "rules": {}, "pad": "x" * 900}
    for _ in range(3):
        requests.offer(request("set", padded))
    huge = request("set", {"request_id": "huge", "rules": {}, "pad": "x" * 5_000_000})
    requests.offer(huge)
    assert (worker.stats().received, worker.stats().dropped, worker.stats().queued) == (4, 1, 3)
    worker.start()
    try:
        wait_until(lambda: len(outlet.results) == 3, what="three answers")
    finally:
        worker.stop()
    assert outlet.results[-1]["request_id"] is None
    assert (
        outlet.results[-1]["errors"][0]["message"] == f"payload is {len(huge.payload)} bytes; at most 1000 are accepted"
    )


def test_an_oversized_request_is_never_parsed_on_the_retained_or_busy_path(tmp_path: Path) -> None:
    """A retained or busy request over the limit is answered without its request_id: its JSON is never read."""
    body = {"request_id": "big", "rules": {}, "pad": "x" * 5000}
    retained = ask(in_force(tmp_path), "set", body, retained=True).payload
    assert retained.errors[0].path == "(retained)" and retained.request_id is None
    settings = RemoteConfigConfig(max_requests_per_s=0.001, burst_requests=1, max_payload_bytes=4096)
    worker, outlet = worker_for(in_force(tmp_path), settings, clock=lambda: 0.0, wall_clock=lambda: NOW)
    worker.handle(request("get", {"request_id": "first"}))
    worker.handle(request("get", body))
    worker.handle(request("get", {"request_id": "small"}))
    assert [(r["errors"] or [{}])[0].get("path") for r in outlet.results] == [None, "(busy)", "(busy)"]
    assert [r["request_id"] for r in outlet.results] == ["first", None, "small"]


def test_set_refuses_what_the_yaml_loader_refuses(tmp_path: Path) -> None:
    """A class named twice, "yes" for a boolean and a key given twice are refused, and nothing changes."""
    rules = in_force(tmp_path)
    twice = ask(rules, "set", {"request_id": "c", "rules": {"stress": {"classes": ["anger", "anger", "fear"]}}})
    assert [(e.path, e.message) for e in twice.payload.errors] == [
        ("rules.stress.classes", "names a class more than once: anger")
    ]
    yes = ask(rules, "set", {"request_id": "y", "rules": {"occupant_lost": {"enabled": "yes"}}}).payload
    assert not yes.ok and [e.path for e in yes.errors] == ["rules.occupant_lost.enabled"]
    duplicated = b'{"request_id": "d", "rules": {"smoothing_s": 1, "smoothing_s": 2}}'
    answer_ = answer(
        RemoteRequest("set", duplicated, retained=False, received_s=0.0), DISPATCH["set"], sets(rules), 4096, NOW
    )
    assert not answer_.payload.ok and "the key 'smoothing_s' is given twice" in answer_.payload.errors[0].message
    assert rules.effective == RulesConfig()
