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

from cabin_monitor.bus.payloads import ConfigResultPayload, ConfigSetPayload, utc_iso
from cabin_monitor.bus.remote import RulesControl, answer_config_set
from cabin_monitor.config import EMOTIONS_7, RulesConfig

NOW = 1_700_000_000.0


def control(tmp_path: Path, base: RulesConfig | None = None) -> RulesControl:
    """A rules control persisting to tmp_path, for the 7-class model."""
    return RulesControl(base or RulesConfig(), EMOTIONS_7, tmp_path / "override.json", 4096, wall_clock=lambda: NOW)


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


def test_reload_keeps_overrides_on_top_of_new_file_rules(tmp_path: Path) -> None:
    """SIGHUP's new base rules still carry the operator's overrides."""
    ctl = control(tmp_path)
    send(ctl, {"rules": {"stress": {"sustain_s": 7}}})
    new_base = RulesConfig.model_validate({"stress": {"cooldown_s": 99}})
    effective = ctl.reload_base(new_base)
    assert effective.stress.sustain_s == 7 and effective.stress.cooldown_s == 99


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
