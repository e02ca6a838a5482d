"""Tests of the shadow rules: made from the live rules or the file's rules_shadow, changed, persisted, reset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from cabin_monitor.config import EMOTIONS_7, RulesConfig, rule_paths_from_environment
from cabin_monitor.rules.in_force import RulesInForce
from cabin_monitor.rules.shadow import ShadowChange, ShadowRules

NOW = 1_700_000_000.0


def live_rules(tmp_path: Path) -> RulesInForce:
    """Live rules in force persisting to tmp_path, for the 7-class model."""
    return RulesInForce(RulesConfig(), EMOTIONS_7, tmp_path / "override.json")


def shadow_rules(tmp_path: Path, live: RulesInForce, file_rules: RulesConfig | None = None) -> ShadowRules:
    """Shadow rules beside ``live``, persisting to tmp_path."""
    return ShadowRules(file_rules, lambda: live.effective, EMOTIONS_7, tmp_path / "shadow.json")


def test_a_first_change_makes_the_shadow_set_from_the_live_rules_and_leaves_them_alone(tmp_path: Path) -> None:
    """No shadow set, a change: the live rules in force plus the patch, sources 'live'/'remote'; live unchanged."""
    live = live_rules(tmp_path)
    live.change({"smoothing_s": 2.0}, None, NOW)
    shadow = shadow_rules(tmp_path, live)
    assert shadow.current() is None and shadow.take_pending() is None
    outcome = shadow.change({"stress": {"enter_score": 0.9}}, "s1", NOW)
    assert outcome.ok and outcome.in_force is shadow.current() and outcome.in_force is not None
    assert outcome.in_force.rules.stress.enter_score == 0.9 and outcome.in_force.rules.smoothing_s == 2.0
    assert outcome.in_force.sources["stress.enter_score"] == "remote"
    assert outcome.in_force.sources["smoothing_s"] == outcome.in_force.sources["stress.sustain_s"] == "live"
    assert [(o.path, o.remote, o.file) for o in outcome.in_force.overrides] == [("stress.enter_score", 0.9, 0.6)]
    assert shadow.take_pending() == ShadowChange(outcome.in_force.rules) and shadow.take_pending() is None
    assert live.effective.stress.enter_score == 0.6


def test_the_shadow_set_survives_a_restart_as_it_was_made(tmp_path: Path) -> None:
    """A new ShadowRules over the same file runs the same set, even after the live rules moved on."""
    live = live_rules(tmp_path)
    shadow_rules(tmp_path, live).change({"stress": {"sustain_s": 9}}, None, NOW)
    saved = json.loads((tmp_path / "shadow.json").read_text())
    assert saved["patch"] == {"stress": {"sustain_s": 9}} and saved["live"]["smoothing_s"] == 0.7
    live.change({"smoothing_s": 3.0}, None, NOW)
    restarted = shadow_rules(tmp_path, live).current()
    assert restarted is not None
    assert (restarted.rules.stress.sustain_s, restarted.rules.smoothing_s) == (9, 0.7)
    assert restarted.sources["stress.sustain_s"] == "remote" and restarted.sources["smoothing_s"] == "live"


def test_reset_goes_back_to_the_files_rules_shadow_or_to_none(tmp_path: Path) -> None:
    """Reset drops the overrides and their file: the file's rules_shadow again, or no shadow set at all."""
    live = live_rules(tmp_path)
    shadow = shadow_rules(tmp_path, live)
    shadow.change({"stress": {"sustain_s": 9}}, None, NOW)
    shadow.take_pending()
    outcome = shadow.reset("r1", NOW)
    assert outcome.ok and outcome.in_force is None and shadow.current() is None
    assert shadow.take_pending() == ShadowChange(None) and not (tmp_path / "shadow.json").exists()

    file_rules = RulesConfig.model_validate({"stress": {"enter_score": 0.8}})
    from_file = shadow_rules(tmp_path, live, file_rules)
    first = from_file.current()
    assert first is not None and first.sources["stress.enter_score"] == "file"
    assert first.sources["stress.sustain_s"] == "default"
    changed = from_file.change({"stress": {"sustain_s": 9}}, None, NOW).in_force
    assert changed is not None and changed.rules.stress.enter_score == 0.8 and changed.rules.stress.sustain_s == 9
    assert [(o.path, o.file) for o in changed.overrides] == [("stress.sustain_s", 3.0)]
    back = from_file.reset(None, NOW).in_force
    assert back is not None and back.rules == file_rules and back.overrides == ()


def test_an_invalid_shadow_change_is_refused_with_rules_paths_and_changes_nothing(tmp_path: Path) -> None:
    """Problems name rules.… paths (as the request's key); no file is written and no shadow set appears."""
    live = live_rules(tmp_path)
    shadow = shadow_rules(tmp_path, live)
    typo = shadow.change({"stress": {"sustian_s": 1}}, "t", NOW)
    inverted = shadow.change({"stress": {"enter_score": 0.1}}, "i", NOW)
    unknown_class = shadow.change({"stress": {"classes": ["contempt"]}}, "c", NOW)
    assert [p.path for p in typo.problems] == ["rules.stress.sustian_s"]
    assert [p.path for p in inverted.problems] == ["rules.stress"]
    assert [p.path for p in unknown_class.problems] == ["rules"] and "contempt" in unknown_class.problems[0].message
    assert shadow.current() is None and shadow.take_pending() is None and not (tmp_path / "shadow.json").exists()
    assert shadow.change({"stress": {"sustain_s": 1}}, "t", NOW).ok  # a refused request_id is not spent


def test_a_change_is_applied_at_most_once_per_request_id(tmp_path: Path) -> None:
    """The same request_id again is refused as already applied; the first change stays."""
    shadow = shadow_rules(tmp_path, live_rules(tmp_path))
    assert shadow.change({"stress": {"sustain_s": 4}}, "same", NOW).ok
    again = shadow.change({"stress": {"sustain_s": 5}}, "same", NOW)
    assert [p.path for p in again.problems] == ["request_id"] and "already applied" in again.problems[0].message
    current = shadow.current()
    assert current is not None and current.rules.stress.sustain_s == 4


def test_a_damaged_shadow_override_file_is_ignored_and_logged(tmp_path: Path) -> None:
    """An override file that is not the expected object leaves the file's shadow rules (here none) in force."""
    (tmp_path / "shadow.json").write_text('{"stress": {"sustain_s": 4}}')
    with capture_logs() as logs:
        shadow = shadow_rules(tmp_path, live_rules(tmp_path))
    assert shadow.current() is None
    assert [e["event"] for e in logs] == ["ignoring shadow rules override file"]


def test_values_set_by_the_environment_are_named_so(tmp_path: Path) -> None:
    """A CABIN_MONITOR__RULES_SHADOW__… variable's value has the source 'environment', not 'file'."""
    environ = {"CABIN_MONITOR__RULES_SHADOW__STRESS__SUSTAIN_S": "5", "CABIN_MONITOR__RULES__SMOOTHING_S": "1"}
    paths = rule_paths_from_environment(environ, "rules_shadow")
    assert paths == {"stress.sustain_s"}
    file_rules = RulesConfig.model_validate({"stress": {"sustain_s": 5, "enter_score": 0.8}})
    live = live_rules(tmp_path)
    shadow = ShadowRules(file_rules, lambda: live.effective, EMOTIONS_7, None, environment_paths=paths).current()
    assert shadow is not None
    assert (shadow.sources["stress.sustain_s"], shadow.sources["stress.enter_score"]) == ("environment", "file")


def test_sighup_reload_puts_the_files_new_rules_shadow_under_the_overrides(tmp_path: Path) -> None:
    """A new rules_shadow: the override still wins; the engine is told; a class the model lacks changes nothing."""
    live = live_rules(tmp_path)
    shadow = shadow_rules(tmp_path, live, RulesConfig.model_validate({"stress": {"sustain_s": 5}}))
    shadow.change({"stress": {"enter_score": 0.9}}, None, NOW)
    shadow.take_pending()
    reloaded = shadow.reload(RulesConfig.model_validate({"stress": {"sustain_s": 7, "enter_score": 0.7}}))
    assert reloaded is not None and (reloaded.rules.stress.sustain_s, reloaded.rules.stress.enter_score) == (7, 0.9)
    assert reloaded.sources["stress.sustain_s"] == "file" and reloaded.sources["stress.enter_score"] == "remote"
    assert shadow.take_pending() == ShadowChange(reloaded.rules)
    again = shadow.reload(RulesConfig.model_validate({"stress": {"sustain_s": 7, "enter_score": 0.7}}))
    assert again is not None and shadow.take_pending() is None  # the same rules: the engine keeps its state
    with pytest.raises(ValueError, match="rage"):
        shadow.reload(RulesConfig.model_validate({"stress": {"classes": ["rage"]}}))
    assert shadow.current() is again


def test_sighup_reload_without_rules_shadow_keeps_overrides_on_the_live_rules(tmp_path: Path) -> None:
    """rules_shadow gone: with overrides they go on the live rules of now (saved for a restart); without, no set."""
    live = live_rules(tmp_path)
    with_overrides = shadow_rules(tmp_path, live, RulesConfig.model_validate({"stress": {"sustain_s": 5}}))
    with_overrides.change({"stress": {"enter_score": 0.9}}, None, NOW)
    live.change({"smoothing_s": 2.0}, None, NOW)
    reloaded = with_overrides.reload(None)
    assert reloaded is not None and (reloaded.rules.stress.enter_score, reloaded.rules.smoothing_s) == (0.9, 2.0)
    assert reloaded.rules.stress.sustain_s == RulesConfig().stress.sustain_s
    restarted = shadow_rules(tmp_path, live).current()
    assert restarted is not None and restarted.rules == reloaded.rules
    plain = ShadowRules(RulesConfig(), lambda: live.effective, EMOTIONS_7, tmp_path / "other.json")
    assert plain.reload(None) is None and plain.take_pending() == ShadowChange(None)
