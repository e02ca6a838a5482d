"""Tests of the rules in force: overrides over the file's rules, sources, persistence, request ids, reload."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from cabin_monitor.config import EMOTIONS_7, Problem, RulesConfig, parse_config_text, rule_paths_from_environment
from cabin_monitor.rules.in_force import Outcome, Override, RulesInForce, describe_overrides, flatten

NOW = 1_700_000_000.0


def in_force(
    tmp_path: Path, base: RulesConfig | None = None, environment_paths: frozenset[str] = frozenset()
) -> RulesInForce:
    """Rules in force persisting to tmp_path, for the 7-class model."""
    return RulesInForce(
        base or RulesConfig(), EMOTIONS_7, tmp_path / "override.json", environment_paths=environment_paths
    )


def change(rules: RulesInForce, patch: Any, request_id: str | None = None) -> Outcome:
    """Apply a patch at NOW."""
    return rules.change(patch, request_id, NOW)


def test_a_valid_change_is_put_in_force_persisted_and_handed_to_the_engine(tmp_path: Path) -> None:
    """A partial change merges over the rules, is saved, and is offered once to the inference thread."""
    rules = in_force(tmp_path)
    outcome = change(rules, {"stress": {"sustain_s": 7}}, "a")
    assert outcome.ok and outcome.in_force is rules.current()
    assert outcome.in_force.values["stress"]["sustain_s"] == 7 and rules.effective.stress.sustain_s == 7
    assert outcome.in_force.overrides == (Override("stress.sustain_s", 7, 3.0),)
    assert rules.take_pending() == rules.effective
    assert rules.take_pending() is None
    assert json.loads((tmp_path / "override.json").read_text()) == {"stress": {"sustain_s": 7}}


def test_changes_accumulate_and_survive_a_restart(tmp_path: Path) -> None:
    """Two changes add up, and new rules in force on the same file start with both (and say so)."""
    rules = in_force(tmp_path)
    change(rules, {"stress": {"sustain_s": 7}})
    change(rules, {"occupant_lost": {"lost_after_s": 9}})
    with capture_logs() as logs:
        again = in_force(tmp_path)
    assert again.effective.stress.sustain_s == 7 and again.effective.occupant_lost.lost_after_s == 9
    (loaded,) = [e for e in logs if e["event"] == "rules overrides loaded"]
    assert loaded["remote_overrides_win"] == describe_overrides(again.current().overrides)


def test_refusals_name_the_exact_problem_and_change_nothing(tmp_path: Path) -> None:
    """Typos, bad values, broken hysteresis and unknown classes are refused with their paths; nothing moves."""
    rules = in_force(tmp_path)
    cases = {
        "typo": ({"stres": {}}, "rules.stres"),
        "range": ({"stress": {"enter_score": 2}}, "rules.stress.enter_score"),
        "hysteresis": ({"stress": {"enter_score": 0.2}}, "rules.stress"),
        "class": ({"stress": {"classes": ["rage"]}}, "rules"),
        "boolean": ({"stress": {"sustain_s": True}}, "rules.stress.sustain_s"),
    }
    for name, (patch, path) in cases.items():
        outcome = change(rules, patch, name)
        assert not outcome.ok and outcome.in_force is None, name
        assert outcome.problems[0].path == path and outcome.problems[0].message, (name, outcome.problems)
    assert "rage" in change(rules, {"stress": {"classes": ["rage"]}}).problems[0].message
    assert rules.effective == RulesConfig()
    assert rules.take_pending() is None
    assert not (tmp_path / "override.json").exists()
    assert change(rules, {"stress": {"sustain_s": 2}}, "typo").ok  # a refused request_id may be sent again


def test_a_change_that_cannot_be_saved_is_refused(tmp_path: Path) -> None:
    """An override file that cannot be written refuses the change under '(state)'; the rules stay."""
    (tmp_path / "blocked").write_text("a file where the folder should be")
    rules = RulesInForce(RulesConfig(), EMOTIONS_7, tmp_path / "blocked" / "override.json")
    outcome = change(rules, {"stress": {"sustain_s": 7}})
    assert [p.path for p in outcome.problems] == ["(state)"]
    assert outcome.problems[0].message.startswith("cannot save the override file: ")
    assert rules.effective == RulesConfig() and rules.take_pending() is None


def test_a_broken_override_file_is_ignored_at_start(tmp_path: Path) -> None:
    """A corrupt override file does not stop start-up: the file's rules are used as they are."""
    for text in ("{not json", "[1]", json.dumps({"stress": {"classes": ["rage"]}})):
        (tmp_path / "override.json").write_text(text)
        with capture_logs() as logs:
            assert in_force(tmp_path).effective == RulesConfig()
        assert [e["event"] for e in logs] == ["ignoring rules override file"]


def test_reload_keeps_overrides_on_top_of_new_file_rules_and_names_them(tmp_path: Path) -> None:
    """SIGHUP's new file rules still carry the operator's overrides, which are named with the file's values."""
    rules = in_force(tmp_path)
    change(rules, {"stress": {"sustain_s": 7}})
    before = rules.current()
    after = rules.reload(RulesConfig.model_validate({"stress": {"cooldown_s": 99, "sustain_s": 4}}))
    assert rules.effective.stress.sustain_s == 7 and rules.effective.stress.cooldown_s == 99
    assert after.overrides == (Override("stress.sustain_s", 7, 4.0),) and after is rules.current()
    assert after.generation > before.generation
    assert rules.take_pending() == rules.effective
    assert after.sources["stress.sustain_s"] == "remote" and after.sources["stress.cooldown_s"] == "file"
    assert after.sources["stress.enter_score"] == after.sources["smoothing_s"] == "default"


def test_a_reload_that_does_not_fit_changes_nothing(tmp_path: Path) -> None:
    """New file rules that break the hysteresis under the overrides, or name a missing class, raise; nothing moves."""
    rules = in_force(tmp_path)
    change(rules, {"stress": {"exit_score": 0.5}})
    before = rules.current()
    rules.take_pending()
    with pytest.raises(ValueError):
        rules.reload(RulesConfig.model_validate({"stress": {"enter_score": 0.45, "exit_score": 0.4}}))
    with pytest.raises(ValueError, match="rage"):
        rules.reload(RulesConfig.model_validate({"stress": {"classes": ["rage"]}}))
    assert rules.current() is before and rules.take_pending() is None


def test_sources_tell_the_configuration_from_the_defaults_and_the_overrides(tmp_path: Path) -> None:
    """A value the file sets is 'file' (also when it equals the default), one its environment sets
    'environment', an untouched one 'default', an override 'remote'; a reset and a reload that drops a
    value change them accordingly."""
    text = "rules:\n  smoothing_s: 0.7\n  stress:\n    classes: [anger]\n    sustain_s: 4\n"
    environ = {"CABIN_MONITOR__RULES__OCCUPANT_LOST__LOST_AFTER_S": "9", "CABIN_MONITOR__LOGGING__LEVEL": "info"}
    from_environment = rule_paths_from_environment(environ)
    assert from_environment == {"occupant_lost.lost_after_s"}
    rules = in_force(tmp_path, parse_config_text(text, environ=environ).rules, from_environment)
    change(rules, {"stress": {"sustain_s": 7, "cooldown_s": 60}}, "s")
    sources = rules.current().sources
    assert set(sources) == set(flatten(RulesConfig().model_dump(mode="json")))
    assert {p: source for p, source in sources.items() if source != "default"} == {
        "smoothing_s": "file",
        "stress.classes": "file",
        "stress.sustain_s": "remote",
        "stress.cooldown_s": "remote",
        "occupant_lost.lost_after_s": "environment",
    }
    reset = rules.reset("r", NOW).in_force
    assert reset is not None
    assert (reset.sources["stress.sustain_s"], reset.sources["stress.cooldown_s"]) == ("file", "default")
    after = rules.reload(parse_config_text("rules:\n  stress:\n    sustain_s: 4\n", environ=environ).rules).sources
    assert {p: source for p, source in after.items() if source != "default"} == {
        "stress.sustain_s": "file",
        "occupant_lost.lost_after_s": "environment",
    }


def test_a_section_set_from_the_environment_is_environment_under_any_override(tmp_path: Path) -> None:
    """A whole section set by one variable makes each of its values 'environment' until an override wins."""
    environ = {"CABIN_MONITOR__RULES__STRESS": '{"sustain_s": 3, "cooldown_s": 30}'}
    rules = in_force(tmp_path, parse_config_text("", environ=environ).rules, rule_paths_from_environment(environ))
    change(rules, {"stress": {"sustain_s": 7}})
    sources = rules.current().sources
    assert {p: source for p, source in sources.items() if p.startswith("stress.")} == {
        p: "remote" if p == "stress.sustain_s" else "environment" for p in sources if p.startswith("stress.")
    }
    assert sources["smoothing_s"] == "default"


def test_three_class_model_checks_classes() -> None:
    """With a 3-class model the default 7-class groups are refused and grouped classes accepted."""
    base = RulesConfig.model_validate(
        {"stress": {"classes": ["negative"]}, "unexpected_expression": {"classes": ["negative"]}}
    )
    rules = RulesInForce(base, ("neutral", "positive", "negative"), None)
    assert not change(rules, {"stress": {"classes": ["anger"]}}).ok
    assert change(rules, {"stress": {"enter_score": 0.7}}).ok
    with pytest.raises(ValueError):
        RulesInForce(RulesConfig(), ("neutral", "positive", "negative"), None)


def test_a_change_is_applied_at_most_once_per_request_id(tmp_path: Path) -> None:
    """A repeated request_id is refused 'already applied', with when, and not applied again."""
    rules = in_force(tmp_path)
    assert change(rules, {"stress": {"sustain_s": 7}}, "a").ok
    assert change(rules, {"stress": {"sustain_s": 8}}, "b").ok
    again = rules.change({"stress": {"sustain_s": 7}}, "a", NOW + 5)
    assert again.problems == (
        Problem(
            "request_id", "already applied at 2023-11-14T22:13:20.000Z; a change is applied at most once per request_id"
        ),
    )
    assert rules.effective.stress.sustain_s == 8  # the later change is not reverted
    assert rules.reset("r", NOW).ok and not rules.reset("r", NOW).ok and not change(rules, {}, "r").ok


def test_remembered_request_ids_are_bounded() -> None:
    """Only the most recent request_ids are remembered: the oldest is forgotten first."""
    rules = RulesInForce(RulesConfig(), EMOTIONS_7, None, remembered_request_ids=2)
    for n, request_id in enumerate(["a", "b", "c"], start=1):
        assert change(rules, {"stress": {"sustain_s": n}}, request_id).ok
    assert not change(rules, {}, "c").ok
    assert change(rules, {}, "a").ok


def test_reset_drops_the_persisted_overrides(tmp_path: Path) -> None:
    """A reset removes the override file and goes back to the file's rules, for this run and the next."""
    base = RulesConfig.model_validate({"stress": {"sustain_s": 4}})
    rules = in_force(tmp_path, base)
    change(rules, {"stress": {"sustain_s": 7}})
    rules.take_pending()
    with capture_logs() as logs:
        reset = rules.reset("r", NOW)
    assert reset.in_force is not None and reset.in_force.overrides == () and reset.in_force.rules == base
    (dropped,) = [e for e in logs if e["event"].startswith("rules overrides dropped")]
    assert dropped["dropped"] == "stress.sustain_s (file 4.0, remote 7)"
    assert rules.effective == base and rules.take_pending() == base
    assert not (tmp_path / "override.json").exists()
    assert in_force(tmp_path, base).effective == base
    assert rules.reset(None, NOW).ok and rules.take_pending() is None  # nothing to drop: still accepted


def test_every_change_is_a_newer_generation(tmp_path: Path) -> None:
    """Each change, reset and reload makes a newer state; a refusal and a read do not."""
    rules = in_force(tmp_path)
    seen = [rules.current().generation]
    change(rules, {"stress": {"sustain_s": 7}})
    seen.append(rules.current().generation)
    change(rules, {"stress": {"sustain_s": -1}})
    assert rules.current().generation == seen[-1]
    rules.reset(None, NOW)
    seen.append(rules.current().generation)
    rules.reload(RulesConfig())
    seen.append(rules.current().generation)
    assert seen == sorted(set(seen))


def test_the_override_file_is_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    """Persisted overrides are written mode 0600 even under umask 000."""
    old = os.umask(0)
    try:
        change(in_force(tmp_path), {"stress": {"sustain_s": 7}})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "override.json").stat().st_mode) == 0o600


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
@given(patch=rules_patches)
def test_any_patch_is_applied_whole_or_not_at_all(tmp_path_factory: Any, patch: Any) -> None:
    """For arbitrary patches the rules in force are the new ones, or refused with problems and unchanged."""
    rules = in_force(tmp_path_factory.mktemp("in_force"))
    before = rules.current()
    outcome = change(rules, patch)
    if outcome.ok:
        assert outcome.in_force is rules.current() and not outcome.problems
        assert outcome.in_force.values == rules.effective.model_dump(mode="json")
    else:
        assert all(p.path.startswith("rules") and p.message for p in outcome.problems)
        assert rules.current() is before and rules.take_pending() is None
