"""Tests of operator rule changes (config/set): validation, atomicity and persistence."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from cabin_monitor.bus.payloads import PRECEDENCE, ConfigResultPayload, ConfigSetPayload, utc_iso
from cabin_monitor.bus.remote import (
    RemoteRequests,
    RulesControl,
    TokenBucket,
    answer_config_set,
    encode_payload,
    flatten,
)
from cabin_monitor.config import (
    EMOTIONS_7,
    RemoteConfigConfig,
    RulesConfig,
    parse_config_text,
    rule_paths_from_environment,
)
from cabin_monitor.messages import RemoteAction, RemoteRequest
from tests.support.helpers import wait_until

NOW = 1_700_000_000.0


def control(
    tmp_path: Path, base: RulesConfig | None = None, environment_paths: frozenset[str] = frozenset()
) -> RulesControl:
    """A rules control persisting to tmp_path, for the 7-class model."""
    return RulesControl(
        base or RulesConfig(),
        EMOTIONS_7,
        tmp_path / "override.json",
        4096,
        wall_clock=lambda: NOW,
        environment_paths=environment_paths,
    )


def send(ctl: RulesControl, body: Any) -> dict[str, Any]:
    """Send a JSON body and return the result as a dict."""
    return ctl.handle_set(json.dumps(body).encode()).model_dump(mode="json")


def test_a_valid_change_is_applied_persisted_and_handed_to_the_engine(tmp_path: Path) -> None:
    """A partial change merges over the rules, is saved, and is offered once to the inference thread."""
    ctl = control(tmp_path)
    result = send(ctl, {"request_id": "a", "rules": {"stress": {"sustain_s": 7}}})
    assert result["ok"] and result["request_id"] == "a" and result["rules"]["stress"]["sustain_s"] == 7
    assert ctl.effective.stress.sustain_s == 7
    assert ctl.take_pending() == ctl.effective
    assert ctl.take_pending() is None
    assert json.loads((tmp_path / "override.json").read_text()) == {"stress": {"sustain_s": 7}}


def test_changes_accumulate_and_survive_a_restart(tmp_path: Path) -> None:
    """Two changes add up, and a new control on the same file starts with both."""
    ctl = control(tmp_path)
    send(ctl, {"rules": {"stress": {"sustain_s": 7}}})
    send(ctl, {"rules": {"occupant_lost": {"lost_after_s": 9}}})
    again = control(tmp_path)
    assert again.effective.stress.sustain_s == 7 and again.effective.occupant_lost.lost_after_s == 9


def test_refusals_name_the_exact_problem_and_change_nothing(tmp_path: Path) -> None:
    """Typos, bad values, broken hysteresis and unknown classes are refused with paths; nothing moves."""
    ctl = control(tmp_path)
    cases = {
        "typo": ({"rules": {"stres": {}}}, "rules.stres"),
        "range": ({"rules": {"stress": {"enter_score": 2}}}, "rules.stress.enter_score"),
        "hysteresis": ({"rules": {"stress": {"enter_score": 0.2}}}, "rules.stress"),
        "class": ({"rules": {"stress": {"classes": ["rage"]}}}, "rules"),
        "shape": ({"rules": "all"}, "rules"),
        "missing": ({"request_id": "x"}, "rules"),
    }
    for name, (body, path) in cases.items():
        result = send(ctl, body)
        assert not result["ok"], name
        assert result["errors"][0]["path"] == path, (name, result["errors"])
    assert ctl.effective == RulesConfig()
    assert ctl.take_pending() is None
    assert not (tmp_path / "override.json").exists()


def test_non_json_oversized_and_non_object_payloads_are_refused(tmp_path: Path) -> None:
    """Garbage bytes, payloads over the limit and JSON that is not an object get error results."""
    ctl = control(tmp_path)
    assert not ctl.handle_set(b"\xff\xfe").ok
    assert not ctl.handle_set(b"{" * 5000).ok
    assert "at most 4096" in ctl.handle_set(b" " * 5000).errors[0].message
    assert not ctl.handle_set(b"[1, 2]").ok
    assert ctl.effective == RulesConfig()


def test_a_broken_override_file_is_ignored_at_start(tmp_path: Path) -> None:
    """A corrupt override file does not stop start-up: the file's rules are used as they are."""
    (tmp_path / "override.json").write_text("{not json")
    assert control(tmp_path).effective == RulesConfig()
    (tmp_path / "override.json").write_text(json.dumps({"stress": {"classes": ["rage"]}}))
    assert control(tmp_path).effective == RulesConfig()


def test_reload_keeps_overrides_on_top_of_new_file_rules_and_names_them(tmp_path: Path) -> None:
    """SIGHUP's new base rules still carry the operator's overrides, which are named with the file's values."""
    ctl = control(tmp_path)
    send(ctl, {"rules": {"stress": {"sustain_s": 7}}})
    new_base = RulesConfig.model_validate({"stress": {"cooldown_s": 99, "sustain_s": 4}})
    winning = ctl.reload_base(new_base)
    assert ctl.effective.stress.sustain_s == 7 and ctl.effective.stress.cooldown_s == 99
    assert [(o.path, o.remote, o.file) for o in winning] == [("stress.sustain_s", 7, 4.0)]
    assert ctl.take_pending() == ctl.effective
    state = ctl.state("car-1", "reload")
    assert state.sources["stress.sustain_s"] == "remote" and state.sources["stress.cooldown_s"] == "file"
    assert state.sources["stress.enter_score"] == state.sources["smoothing_s"] == "default"
    assert state.rules["stress"]["cooldown_s"] == 99 and state.precedence == PRECEDENCE


def test_sources_tell_the_configuration_from_the_defaults_and_the_overrides(tmp_path: Path) -> None:
    """A value the file sets is 'file' (also when it equals the default), one its environment sets
    'environment', an untouched one 'default', an override 'remote'; a reset and a reload that drops a
    value change them accordingly."""
    text = "rules:\n  smoothing_s: 0.7\n  stress:\n    classes: [anger]\n    sustain_s: 4\n"
    environ = {"CABIN_MONITOR__RULES__OCCUPANT_LOST__LOST_AFTER_S": "9", "CABIN_MONITOR__LOGGING__LEVEL": "info"}
    from_environment = rule_paths_from_environment(environ)
    assert from_environment == {"occupant_lost.lost_after_s"}
    ctl = control(tmp_path, parse_config_text(text, environ=environ).rules, from_environment)
    send(ctl, {"request_id": "s", "rules": {"stress": {"sustain_s": 7, "cooldown_s": 60}}})
    sources = ctl.state("car-1", "config/set").sources
    assert set(sources) == set(flatten(RulesConfig().model_dump(mode="json")))
    assert {p: source for p, source in sources.items() if source != "default"} == {
        "smoothing_s": "file",
        "stress.classes": "file",
        "stress.sustain_s": "remote",
        "stress.cooldown_s": "remote",
        "occupant_lost.lost_after_s": "environment",
    }
    reset = ctl.handle(request("reset", {"request_id": "r"}))
    assert reset.sources is not None
    assert (reset.sources["stress.sustain_s"], reset.sources["stress.cooldown_s"]) == ("file", "default")
    ctl.reload_base(parse_config_text("rules:\n  stress:\n    sustain_s: 4\n", environ=environ).rules)
    after = ctl.state("car-1", "reload").sources
    assert {p: source for p, source in after.items() if source != "default"} == {
        "stress.sustain_s": "file",
        "occupant_lost.lost_after_s": "environment",
    }


def test_a_section_set_from_the_environment_is_environment_under_any_override(tmp_path: Path) -> None:
    """A whole section set by one variable makes each of its values 'environment' until an override wins."""
    environ = {"CABIN_MONITOR__RULES__STRESS": '{"sustain_s": 3, "cooldown_s": 30}'}
    ctl = control(tmp_path, parse_config_text("", environ=environ).rules, rule_paths_from_environment(environ))
    send(ctl, {"rules": {"stress": {"sustain_s": 7}}})
    sources = ctl.state("car-1", "config/set").sources
    assert {p: source for p, source in sources.items() if p.startswith("stress.")} == {
        p: "remote" if p == "stress.sustain_s" else "environment" for p in sources if p.startswith("stress.")
    }
    assert sources["smoothing_s"] == "default"


def test_three_class_model_checks_classes(tmp_path: Path) -> None:
    """With a 3-class model the default 7-class groups are refused and grouped classes accepted."""
    base = RulesConfig.model_validate(
        {"stress": {"classes": ["negative"]}, "unexpected_expression": {"classes": ["negative"]}}
    )
    ctl = RulesControl(base, ("neutral", "positive", "negative"), None)
    assert not send(ctl, {"rules": {"stress": {"classes": ["anger"]}}})["ok"]
    assert send(ctl, {"rules": {"stress": {"enter_score": 0.7}}})["ok"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=12), children, max_size=3),
    max_leaves=10,
)
rule_keys = st.sampled_from(["smoothing_s", "stress", "unexpected_expression", "occupant_lost", "bogus"])
field_keys = st.sampled_from(["enabled", "classes", "enter_score", "exit_score", "sustain_s", "cooldown_s", "x"])
rules_patches = st.dictionaries(
    rule_keys, st.dictionaries(field_keys, json_values, max_size=3) | json_values, max_size=3
)


@settings(max_examples=200, deadline=None)
@given(patch=rules_patches, request_id=st.none() | st.text(max_size=20) | st.integers())
def test_any_payload_is_applied_whole_or_not_at_all(tmp_path_factory: Any, patch: Any, request_id: Any) -> None:
    """For arbitrary patches the result is ok with the new rules in force, or refused with the rules unchanged."""
    ctl = control(tmp_path_factory.mktemp("remote"))
    before = ctl.effective
    result = send(ctl, {"request_id": request_id, "rules": patch})
    if result["ok"]:
        assert result["rules"] == ctl.effective.model_dump(mode="json")
        assert not result["errors"]
    else:
        assert result["errors"] and all(e["path"] and e["message"] for e in result["errors"])
        assert ctl.effective == before
        assert ctl.take_pending() is None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    """Any byte string yields a result object, never an exception."""
    ctl = RulesControl(RulesConfig(), EMOTIONS_7, None)
    result = ctl.handle_set(data)
    assert result.ok in (True, False)


def test_a_change_that_fails_to_apply_is_answered_with_the_error() -> None:
    """An exception while applying becomes an error answer naming it, with the request_id, and is logged."""

    def apply(request: ConfigSetPayload, now: float) -> ConfigResultPayload:
        raise RuntimeError("disk full")

    body = json.dumps({"request_id": "r-9", "rules": {"smoothing_s": 1.0}}).encode()
    with capture_logs() as logs:
        result = answer_config_set(body, 4096, apply, NOW)
    assert not result.ok and result.request_id == "r-9"
    assert result.errors[0].message == "the change could not be applied: RuntimeError: disk full"
    assert any(e["event"] == "config/set handler failed" and e["log_level"] == "error" for e in logs)


def test_requests_are_checked_before_anything_is_applied() -> None:
    """Size, JSON, shape and request_id are checked first: a refused request never reaches apply."""
    applied: list[ConfigSetPayload] = []

    def apply(request: ConfigSetPayload, now: float) -> ConfigResultPayload:
        applied.append(request)
        return ConfigResultPayload(ts=utc_iso(now), request_id=request.request_id, ok=True, rules=request.rules)

    long_id = "x" * 129
    refused = [
        json.dumps({"rules": {"x": "y" * 300}}).encode(),
        b"{not json",
        b"[1, 2]",
        json.dumps({"request_id": long_id, "rules": {}}).encode(),
    ]
    answers = [answer_config_set(body, 200, apply, NOW) for body in refused]
    assert [a.ok for a in answers] == [False] * 4 and applied == []
    assert answers[3].request_id is None and answers[3].errors[0].path == "request_id"
    assert answer_config_set(b'{"request_id": "ok", "rules": {}}', 200, apply, NOW).ok
    assert [r.request_id for r in applied] == ["ok"]


def test_the_override_file_is_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    """Persisted overrides are written mode 0600 even under umask 000."""
    old = os.umask(0)
    try:
        send(control(tmp_path), {"rules": {"stress": {"sustain_s": 7}}})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "override.json").stat().st_mode) == 0o600


def request(action: RemoteAction, body: Any, retained: bool = False) -> RemoteRequest:
    """A request as the broker connection hands it over."""
    return RemoteRequest(action, json.dumps(body).encode(), retained, received_s=0.0)


def test_a_retained_request_is_answered_and_never_applied(tmp_path: Path) -> None:
    """A retained config/set or config/reset (a broker replay) is refused with its request_id; nothing changes."""
    ctl = control(tmp_path)
    send(ctl, {"rules": {"occupant_lost": {"lost_after_s": 9}}})
    cases: list[tuple[RemoteAction, Any]] = [("set", {"request_id": "old", "rules": {"stress": {"sustain_s": 7}}})]
    for action, body in [*cases, ("reset", {})]:
        answer = ctl.handle(request(action, body, retained=True))
        assert not answer.ok and answer.action == action and answer.errors[0].path == "(retained)"
        assert "never applied" in answer.errors[0].message
    assert answer.request_id is None and ctl.handle(request("set", {"request_id": "old"}, True)).request_id == "old"
    assert ctl.effective.stress.sustain_s == 3.0 and ctl.effective.occupant_lost.lost_after_s == 9


def test_a_change_is_applied_at_most_once_per_request_id(tmp_path: Path) -> None:
    """A repeated request_id is answered 'already applied' and not applied again; refused ids may be re-sent."""
    ctl = control(tmp_path)
    assert send(ctl, {"request_id": "a", "rules": {"stress": {"sustain_s": 7}}})["ok"]
    assert send(ctl, {"request_id": "b", "rules": {"stress": {"sustain_s": 8}}})["ok"]
    again = send(ctl, {"request_id": "a", "rules": {"stress": {"sustain_s": 7}}})
    assert not again["ok"] and again["errors"][0]["path"] == "request_id"
    assert "already applied" in again["errors"][0]["message"]
    assert ctl.effective.stress.sustain_s == 8  # the later change is not reverted
    assert not send(ctl, {"request_id": "c", "rules": {"stress": {"sustain_s": -1}}})["ok"]
    assert send(ctl, {"request_id": "c", "rules": {"stress": {"sustain_s": 5}}})["ok"]
    reset = ctl.handle(request("reset", {"request_id": "r"}))
    assert reset.ok and not ctl.handle(request("reset", {"request_id": "r"})).ok


def test_remembered_request_ids_are_bounded(tmp_path: Path) -> None:
    """Only the most recent request_ids are remembered: the oldest is forgotten first."""
    ctl = RulesControl(RulesConfig(), EMOTIONS_7, None, remembered_request_ids=2)
    for n, request_id in enumerate(["a", "b", "c"], start=1):
        assert send(ctl, {"request_id": request_id, "rules": {"stress": {"sustain_s": n}}})["ok"]
    assert not send(ctl, {"request_id": "c", "rules": {}})["ok"]
    assert send(ctl, {"request_id": "a", "rules": {}})["ok"]


def test_a_lone_surrogate_request_id_is_answered_with_an_error_naming_it(tmp_path: Path) -> None:
    """JSON "\\ud800" as request_id: refused, the field named, the id echoed escaped; the answer encodes."""
    ctl = control(tmp_path)
    answer = ctl.handle_set(b'{"request_id": "a\\ud800", "rules": {"stress": {"sustain_s": 7}}}')
    assert not answer.ok and answer.errors[0].path == "request_id" and answer.request_id == "a\\ud800"
    assert json.loads(encode_payload(answer))["request_id"] == "a\\ud800"
    assert ctl.effective == RulesConfig()
    odd_key = ctl.handle_set(b'{"rules": {"\\udfff": 1}}')
    assert not odd_key.ok and json.loads(encode_payload(odd_key))["errors"]


def test_booleans_are_not_numbers(tmp_path: Path) -> None:
    """true as sustain_s or smoothing_s is refused with the field named, not read as 1.0."""
    ctl = control(tmp_path)
    for rules, path in (
        ({"stress": {"sustain_s": True}}, "rules.stress.sustain_s"),
        ({"smoothing_s": False}, "rules.smoothing_s"),
        ({"occupant_lost": {"lost_after_s": True}}, "rules.occupant_lost.lost_after_s"),
    ):
        answer = send(ctl, {"rules": rules})
        assert not answer["ok"] and answer["errors"][0]["path"] == path
        assert "not true" in answer["errors"][0]["message"] or "not false" in answer["errors"][0]["message"]
    assert send(ctl, {"rules": {"stress": {"sustain_s": 2}}})["ok"]  # an integer is still a number


def test_get_answers_the_rules_with_their_sources(tmp_path: Path) -> None:
    """config/get answers the effective rules, which values are overrides, and the precedence; nothing changes."""
    ctl = control(tmp_path, RulesConfig.model_validate({"stress": {"sustain_s": 4}}))
    send(ctl, {"rules": {"stress": {"sustain_s": 7}}})
    answer = ctl.handle(request("get", {"request_id": "g"}))
    assert answer.ok and answer.action == "get" and answer.request_id == "g"
    assert answer.rules == ctl.effective.model_dump(mode="json")
    assert answer.sources is not None and answer.overrides is not None
    assert {p for p, source in answer.sources.items() if source == "remote"} == {"stress.sustain_s"}
    assert answer.sources["stress.classes"] == answer.sources["occupant_lost.severity"] == "default"
    assert [(o.path, o.remote, o.file) for o in answer.overrides] == [("stress.sustain_s", 7, 4.0)]
    assert answer.precedence == PRECEDENCE and ctl.take_pending() is not None  # (from the set)
    assert ctl.handle(request("get", {})).ok and ctl.take_pending() is None
    assert ctl.handle(request("get", [])).errors[0].message == "payload must be a JSON object"


def test_reset_drops_the_persisted_overrides(tmp_path: Path) -> None:
    """config/reset removes the override file and goes back to the file's rules, for this run and the next."""
    base = RulesConfig.model_validate({"stress": {"sustain_s": 4}})
    ctl = control(tmp_path, base)
    send(ctl, {"rules": {"stress": {"sustain_s": 7}}})
    ctl.take_pending()
    answer = ctl.handle(request("reset", {"request_id": "r"}))
    assert answer.ok and answer.action == "reset" and answer.overrides == []
    assert {p: source for p, source in (answer.sources or {}).items() if source != "default"} == {
        "stress.sustain_s": "file"
    }
    assert ctl.effective == base and ctl.take_pending() == base
    assert not (tmp_path / "override.json").exists()
    assert control(tmp_path, base).effective == base
    assert ctl.handle(request("reset", {})).ok and ctl.take_pending() is None  # nothing to drop: still answered


class Outlet:
    """Collects what the worker publishes (a fake broker side, for the worker's own logic)."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []
        self.states: list[dict[str, Any]] = []

    def publish_config_result(self, payload: bytes) -> None:
        self.results.append(json.loads(payload))

    def publish_rules_state(self, payload: bytes) -> None:
        self.states.append(json.loads(payload))


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
    worker = RemoteRequests(control(tmp_path), settings, "car-1", clock=lambda: now[0], wall_clock=lambda: NOW)
    outlet = Outlet()
    worker.attach(outlet)
    for n in range(1, 5):
        worker.handle(request("set", {"request_id": f"r{n}", "rules": {"stress": {"sustain_s": n}}}))
    now[0] = 1.0
    worker.handle(request("get", {"request_id": "g"}))
    assert [(r["request_id"], r["ok"]) for r in outlet.results] == [
        ("r1", True), ("r2", True), ("r3", False), ("r4", False), ("g", True)
    ]  # fmt: skip
    assert outlet.results[2]["errors"][0]["path"] == "(busy)" and outlet.results[2]["action"] == "set"
    assert worker.control.effective.stress.sustain_s == 2
    assert [(s["cause"], s["request_id"], s["rules"]["stress"]["sustain_s"]) for s in outlet.states] == [
        ("config/set", "r1", 1), ("config/set", "r2", 2)
    ]  # fmt: skip
    stats = worker.stats()
    assert (stats.answered, stats.busy, stats.dropped) == (5, 2, 0)


def test_a_full_queue_drops_requests_and_counts_them(tmp_path: Path) -> None:
    """offer never blocks: with the queue full, requests are dropped and counted; queued ones are answered."""
    settings = RemoteConfigConfig(queue_size=3)
    worker = RemoteRequests(control(tmp_path), settings, "car-1", wall_clock=lambda: NOW)
    outlet = Outlet()
    worker.attach(outlet)
    for n in range(5):
        worker.offer(request("get", {"request_id": f"g{n}"}))
    assert (worker.stats().received, worker.stats().dropped, worker.stats().queued) == (5, 2, 3)
    worker.start()
    try:
        wait_until(lambda: len(outlet.results) == 3, what="three answers")
    finally:
        worker.stop()
    assert [r["request_id"] for r in outlet.results] == ["g0", "g1", "g2"]
    assert outlet.states[0]["cause"] == "start" and worker.stats().queued == 0
