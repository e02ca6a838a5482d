"""Tests of configuration loading, validation messages and overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cabin_monitor.assets import SAMPLE_VIDEO
from cabin_monitor.config import (
    Config,
    ConfigError,
    Problem,
    RulesConfig,
    apply_env_overrides,
    load_config,
    merge_rules,
    parse_config_text,
    parse_mqtt_url,
    paths_set,
    redacted,
    validation_problems,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "cabin-monitor.example.yaml"


def test_defaults_are_valid() -> None:
    """An empty file gives the documented defaults."""
    cfg = parse_config_text("", environ={})
    assert cfg.camera.source == "sample"
    assert cfg.emotion.providers == ("cpu",)
    assert cfg.rules.stress.enter_score > cfg.rules.stress.exit_score


def test_annotated_example_is_valid() -> None:
    """The example shipped in deploy/ passes validation and names the five seats of a full car."""
    cfg = load_config(EXAMPLE, environ={})
    seats = ["rear_left", "rear_middle", "rear_right", "driver", "front_passenger"]
    assert [s.name for s in cfg.tracker.seats] == seats


def test_unknown_key_is_reported_with_path_and_line() -> None:
    """A misspelt key names its YAML path and line."""
    with pytest.raises(ConfigError) as err:
        parse_config_text("camera:\n  sorce: 0\n", "x.yaml", environ={})
    assert err.value.problems == ["camera.sorce (line 2): unknown key (not a setting here; check the spelling)"]


def test_every_problem_is_listed() -> None:
    """Several bad values produce one line each."""
    text = "rules:\n  stress:\n    enter_score: 0.3\n    exit_score: 0.5\nmqtt:\n  url: http://x\n  keepalive_s: 1\n"
    with pytest.raises(ConfigError) as err:
        parse_config_text(text, environ={})
    joined = "\n".join(err.value.problems)
    assert "rules.stress (line 2): exit_score (0.5) must be below enter_score (0.3)" in joined
    assert "mqtt.url (line 6)" in joined
    assert "mqtt.keepalive_s (line 7)" in joined


def test_a_boolean_is_not_a_rules_number() -> None:
    """`sustain_s: true` in the file is refused with its path and line, not read as one second."""
    with pytest.raises(ConfigError) as err:
        parse_config_text("rules:\n  smoothing_s: 1\n  stress:\n    sustain_s: true\n", environ={})
    assert err.value.problems == ["rules.stress.sustain_s (line 4): a number is required, not true"]
    assert parse_config_text("rules:\n  stress:\n    sustain_s: 2\n", environ={}).rules.stress.sustain_s == 2.0


def test_broken_yaml_names_the_line() -> None:
    """A YAML syntax error names the line where the broken construct starts, not only where it was noticed."""
    with pytest.raises(ConfigError) as err:
        parse_config_text("vehicle_id: car-1\ncamera:\n  source: [unclosed\nmqtt:\n  url: null\n", environ={})
    problem = err.value.problems[0]
    assert problem.startswith("not valid YAML: while parsing a flow sequence at line 3")


def test_duplicate_keys_are_errors() -> None:
    """A key given twice in one mapping is refused with both lines, instead of the last one silently winning."""
    with pytest.raises(ConfigError) as err:
        parse_config_text(
            "rules:\n  stress: {sustain_s: 3}\nvehicle_id: a\nrules:\n  stress: {sustain_s: 9}\n", environ={}
        )
    assert "line 4, column 1: duplicate key 'rules' (first at line 1)" in err.value.problems[0]


def test_validation_problems_carry_the_path_apart_from_where_the_value_came_from() -> None:
    """Each problem has its dotted path and message as values; the file's line and a variable's name are kept
    apart, and the text line of check-config is made from them."""
    text = "rules:\n  stress:\n    sustian_s: 3\n    enter_score: 2\n"
    environ = {"CABIN_MONITOR__RULES__SMOOTHING_S": "-1"}
    with pytest.raises(ConfigError) as err:
        parse_config_text(text, environ=environ)
    assert "rules.stress.sustian_s (line 3): unknown key (not a setting here; check the spelling)" in err.value.problems
    with pytest.raises(ValidationError) as invalid:
        RulesConfig.model_validate({"stress": {"enter_score": 2, "sustian_s": 3}, "smoothing_s": -1})
    problems = validation_problems(invalid.value)
    assert {(p.path, p.location) for p in problems} == {
        ("stress.enter_score", None),
        ("stress.sustian_s", None),
        ("smoothing_s", None),
    }
    typo = next(p for p in problems if p.path == "stress.sustian_s")
    assert typo.under("rules.") == Problem("rules.stress.sustian_s", typo.message)
    assert Problem("a.b", "bad", "line 4").line() == "a.b (line 4): bad"
    assert any("CABIN_MONITOR__RULES__SMOOTHING_S" in line for line in err.value.problems)


def test_an_alias_bomb_is_refused_at_once() -> None:
    """A kilobyte of nested YAML aliases (gigabytes once expanded) is refused without being expanded."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    with pytest.raises(ConfigError, match="refused"):
        parse_config_text("\n".join(lines) + "\n", environ={})


def bomb(levels: int, fan_out: int, under: str = "tracker: {seats: *a%d}") -> str:
    """Nested aliases: each level a list of ``fan_out`` aliases to the one before, used ``under`` a setting."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fan_out)}]" for i in range(1, levels + 1)]
    return "\n".join([*lines, under % levels]) + "\n"


@pytest.mark.parametrize(("levels", "fan_out"), [(7, 9), (12, 2), (21, 3)])
def test_an_alias_bomb_within_the_alias_limit_is_refused_unexpanded(levels: int, fan_out: int) -> None:
    """Fewer than 64 aliases that would expand to millions of values are refused by their expanded size."""
    text = bomb(levels, fan_out)
    assert len(text) < 1000 and text.count("*") <= 64
    with pytest.raises(ConfigError) as err:
        parse_config_text(text, environ={})
    (problem,) = err.value.problems
    assert "more than 20000 values once aliases are expanded: refused" in problem


def test_a_small_alias_tree_still_loads_and_names_its_lines() -> None:
    """Aliases within the bounds still work, and a problem inside one is reported with a line."""
    ok = "zone: &front [0, 0, 0.5, 1]\n"
    with pytest.raises(ConfigError) as err:
        parse_config_text(
            ok + "tracker: {seats: [{name: driver, zone: *front}, {name: x, zone: *front}]}\n", environ={}
        )
    assert err.value.problems == ["zone (line 1): unknown key (not a setting here; check the spelling)"]
    cfg = parse_config_text("tracker: {seats: [{name: a, zone: &z [0, 0, 0.5, 1]}, {name: b, zone: *z}]}\n", environ={})
    assert [s.zone for s in cfg.tracker.seats] == [(0, 0, 0.5, 1)] * 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("camera: " + "[" * 5000 + "\n", "not valid YAML"),
        ("camera: " + "[" * 40 + "]" * 40 + "\n", "nested more than 32 levels deep: refused"),
        ("a: &a [b, *a]\n", "alias *a inside the node it names: refused"),
    ],
)
def test_deep_nesting_and_self_reference_are_one_problem(text: str, expected: str) -> None:
    """Thousands of brackets or an alias inside its own anchor give one problem, not a RecursionError."""
    with pytest.raises(ConfigError) as err:
        parse_config_text(text, environ={})
    (problem,) = err.value.problems
    assert expected in problem


def test_a_deeply_nested_environment_value_is_one_problem() -> None:
    """100,000 brackets in a JSON override, and 40 well-formed levels, are refused naming the variable."""
    for text in ("[" * 100_000, "[" * 40 + "]" * 40):
        with pytest.raises(ConfigError) as err:
            parse_config_text("", environ={"CABIN_MONITOR__EMOTION__PROVIDERS": text})
        (problem,) = err.value.problems
        assert "CABIN_MONITOR__EMOTION__PROVIDERS" in problem and "refused" in problem, problem


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_hostile_files_stop_both_commands_with_one_line_and_exit_code_2(tmp_path: Path, command: str) -> None:
    """A 63-alias bomb and 5,000 brackets: check-config and run exit 2 with one problem line, no traceback."""
    for text in (bomb(7, 9), "camera: " + "[" * 5000 + "\n"):
        path = tmp_path / "cabin-monitor.yaml"
        path.write_text(text)
        args = [command, str(path)] if command == "check-config" else [command, "--config", str(path)]
        proc = subprocess.run(
            [sys.executable, "-m", "cabin_monitor", *args], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        problems = [line for line in proc.stderr.splitlines() if line.startswith("  ")]
        assert len(problems) == 1 and "not valid YAML" in problems[0], proc.stderr
        assert "Traceback" not in proc.stderr


def test_an_oversized_file_is_refused() -> None:
    """A configuration over a mebibyte is refused before it is parsed."""
    with pytest.raises(ConfigError, match="larger than"):
        parse_config_text("# " + "x" * (1 << 20) + "\n", environ={})


def test_top_level_must_be_a_mapping() -> None:
    """A list at the top level is refused clearly."""
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_config_text("- a\n- b\n", environ={})


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """An unreadable path gives a ConfigError naming it."""
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "nope.yaml", environ={})


def test_environment_overrides_single_values() -> None:
    """CABIN_MONITOR__A__B=value sets one nested value, read by the field's type."""
    cfg = parse_config_text(
        "mqtt:\n  keepalive_s: 60\n",
        environ={"CABIN_MONITOR__MQTT__KEEPALIVE_S": "15", "CABIN_MONITOR__RULES__STRESS__ENABLED": "false"},
    )
    assert cfg.mqtt.keepalive_s == 15
    assert cfg.rules.stress.enabled is False


def test_environment_override_is_validated() -> None:
    """A bad value from the environment is reported like one from the file."""
    with pytest.raises(ConfigError, match=r"mqtt\.keepalive_s"):
        parse_config_text("", environ={"CABIN_MONITOR__MQTT__KEEPALIVE_S": "soon"})


def test_a_bad_environment_value_names_the_variable_not_the_file_line() -> None:
    """A value the environment overrode is blamed on the variable, even where the file sets the key too."""
    with pytest.raises(ConfigError) as err:
        parse_config_text("mqtt:\n  url: mqtt://bus:1883\n", environ={"CABIN_MONITOR__MQTT__URL": "garbage"})
    (problem,) = err.value.problems
    assert problem.startswith("mqtt.url (from the environment variable CABIN_MONITOR__MQTT__URL):")
    assert "line" not in problem


@pytest.mark.parametrize("text", ["#secret", "null", "yes", "007", "'quoted'", "[x", "a: b", " spaced ", "&anchor"])
def test_environment_text_values_are_taken_as_they_are(text: str) -> None:
    """A password or user name from the environment is its exact text, never read as YAML (a comment, null, true)."""
    cfg = parse_config_text("", environ={"CABIN_MONITOR__MQTT__PASSWORD": text, "CABIN_MONITOR__MQTT__USERNAME": text})
    assert cfg.mqtt.password is not None and cfg.mqtt.password.get_secret_value() == text
    assert cfg.mqtt.username == text


def test_environment_numbers_and_flags_are_parsed_by_the_field_type() -> None:
    """Integers, decimals and true/false words become the field's type; text fields that look like numbers stay text."""
    cfg = parse_config_text(
        "",
        environ={
            "CABIN_MONITOR__MQTT__KEEPALIVE_S": " 15 ",
            "CABIN_MONITOR__CAMERA__READ_TIMEOUT_S": "2.5",
            "CABIN_MONITOR__RULES__STRESS__SUSTAIN_S": "5",
            "CABIN_MONITOR__CAMERA__LOOP": "Yes",
            "CABIN_MONITOR__RULES__STRESS__ENABLED": "off",
            "CABIN_MONITOR__CAMERA__SOURCE": "0",
            "CABIN_MONITOR__VEHICLE_ID": "007",
        },
    )
    assert (cfg.mqtt.keepalive_s, cfg.camera.read_timeout_s, cfg.rules.stress.sustain_s) == (15, 2.5, 5.0)
    assert cfg.camera.loop is True and cfg.rules.stress.enabled is False
    assert (cfg.camera.source, cfg.vehicle_id) == ("0", "007")


def test_environment_lists_and_sections_are_json() -> None:
    """A list or a whole section from the environment is JSON; an empty value clears a field that may be empty."""
    cfg = parse_config_text(
        "mqtt:\n  url: mqtt://bus:1883\n",
        environ={
            "CABIN_MONITOR__EMOTION__PROVIDERS": '["cuda", "cpu"]',
            "CABIN_MONITOR__RULES__STRESS__CLASSES": '["anger"]',
            "CABIN_MONITOR__MQTT__TLS": '{"ca_file": "/etc/ca.crt"}',
            "CABIN_MONITOR__MQTT__URL": "",
        },
    )
    assert cfg.emotion.providers == ("cuda", "cpu")
    assert cfg.rules.stress.classes == ("anger",)
    assert cfg.mqtt.tls is not None and cfg.mqtt.tls.ca_file == Path("/etc/ca.crt")
    assert cfg.mqtt.url is None


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("CABIN_MONITOR__MQTT__KEEPALIVE_S", "[x", "valid integer"),
        ("CABIN_MONITOR__CAMERA__LOOP", "maybe", "valid boolean"),
        ("CABIN_MONITOR__EMOTION__PROVIDERS", "[x", "not valid JSON"),
        ("CABIN_MONITOR__EMOTION__PROVIDERS", "cuda,cpu", "not valid JSON"),
        ("CABIN_MONITOR__MQTT__TLS", "{ca_file: x}", "not valid JSON"),
        ("CABIN_MONITOR__MQTT__PASWORD", "x", "unknown key"),
    ],
)
def test_an_unreadable_environment_value_is_one_problem_naming_the_variable(name: str, text: str, message: str) -> None:
    """A value that does not fit its field (or names no field) is one problem line, blamed on the variable."""
    with pytest.raises(ConfigError) as err:
        parse_config_text("mqtt:\n  keepalive_s: 30\n", "x.yaml", environ={name: text})
    (problem,) = err.value.problems
    assert f"(from the environment variable {name}):" in problem and message in problem, problem


def test_a_bad_environment_value_stops_run_with_exit_code_2_and_no_traceback(tmp_path: Path) -> None:
    """``run`` with an unreadable override prints the variable and the problem, no traceback, and exits 2."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CABIN_MONITOR__")}
    env |= {"CABIN_MONITOR__MQTT__KEEPALIVE_S": "[x", "CABIN_MONITOR__EMOTION__PROVIDERS": "[x"}
    proc = subprocess.run(
        [sys.executable, "-m", "cabin_monitor", "run"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "cabin-monitor: <defaults>: invalid configuration", proc.stderr
    assert len(lines) == 3, proc.stderr
    assert any("CABIN_MONITOR__MQTT__KEEPALIVE_S" in line and "mqtt.keepalive_s" in line for line in lines[1:])
    assert any("CABIN_MONITOR__EMOTION__PROVIDERS" in line and "not valid JSON" in line for line in lines[1:])


def test_env_override_does_not_touch_the_input() -> None:
    """Applying overrides returns a copy."""
    raw = {"mqtt": {"keepalive_s": 30}}
    apply_env_overrides(raw, {"CABIN_MONITOR__MQTT__KEEPALIVE_S": "5"})
    assert raw == {"mqtt": {"keepalive_s": 30}}


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker:1884", ("broker", 1884, False)),
        ("mqtts://broker", ("broker", 8883, True)),
        ("mqtt://127.0.0.1", ("127.0.0.1", 1883, False)),
    ],
)
def test_mqtt_urls(url: str, expected: tuple[str, int, bool]) -> None:
    """Scheme, host and port are parsed, with scheme-specific default ports."""
    assert parse_mqtt_url(url) == expected


@pytest.mark.parametrize("url", ["broker:1883", "http://x", "mqtt://:1883", "mqtt://x:99999", "mqtt://x:port"])
def test_bad_mqtt_urls(url: str) -> None:
    """Malformed broker URLs are refused."""
    with pytest.raises(ValueError, match="MQTT URL"):
        parse_mqtt_url(url)


def test_merge_rules_applies_a_partial_patch() -> None:
    """A partial rules mapping changes only what it names."""
    merged = merge_rules(RulesConfig(), {"stress": {"sustain_s": 9}})
    assert merged.stress.sustain_s == 9
    assert merged.stress.enter_score == RulesConfig().stress.enter_score


def test_paths_set_names_the_values_the_file_and_the_environment_give() -> None:
    """Values written in the file (even at their default) and environment overrides are named; defaults are not."""
    text = "rules:\n  smoothing_s: 0.7\n  stress:\n    classes: [anger]\n  occupant_lost: {}\n"
    cfg = parse_config_text(text, environ={"CABIN_MONITOR__RULES__STRESS__SUSTAIN_S": "5"})
    assert paths_set(cfg.rules) == {"smoothing_s", "stress.classes", "stress.sustain_s"}
    assert paths_set(cfg) == {"rules.smoothing_s", "rules.stress.classes", "rules.stress.sustain_s"}
    assert paths_set(parse_config_text("", environ={})) == set()


def test_seat_zones_are_checked() -> None:
    """An inverted seat zone is refused."""
    with pytest.raises(ConfigError, match=r"tracker\.seats\.0\.zone"):
        parse_config_text("tracker:\n  seats:\n    - {name: driver, zone: [0.5, 0, 0.2, 1]}\n", environ={})


def test_check_config_command_exit_codes(tmp_path: Path) -> None:
    """check-config exits 0 on a good file and, like run, 2 with one line per problem on a bad one."""
    good = subprocess.run(
        [sys.executable, "-m", "cabin_monitor", "check-config", str(EXAMPLE)], capture_output=True, text=True
    )
    assert good.returncode == 0, good.stderr
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text("camera:\n  sorce: 0\nemotion:\n  providers: [opencl]\n")
    bad = subprocess.run(
        [sys.executable, "-m", "cabin_monitor", "check-config", str(bad_file)], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert "camera.sorce (line 2)" in bad.stderr
    assert "emotion.providers.0 (line 4)" in bad.stderr


# Any YAML-representable value, nested a little.
yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
section_names = st.sampled_from([*Config.model_fields.keys(), "bogus"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(section_names, yaml_values, max_size=4))
def test_arbitrary_documents_give_a_config_or_clean_errors(doc: dict[str, object]) -> None:
    """Whatever the document holds, the result is a Config or a ConfigError with one line per problem."""
    text = yaml.safe_dump(doc)
    try:
        cfg = parse_config_text(text, environ={})
    except ConfigError as exc:
        assert exc.problems
        assert all(isinstance(p, str) and ":" in p for p in exc.problems)
    else:
        assert isinstance(cfg, Config)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_the_loader(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    """Random file contents (binary, broken UTF-8, broken YAML) give a ConfigError or a Config."""
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_bytes(data)
    try:
        load_config(path, environ={})
    except ConfigError as exc:
        assert exc.problems


TLS_CASE = "mqtt: {url: mqtts://bus:8883, tls: {ca_file: /nonexistent/ca.crt}}\n"


def test_check_config_runs_the_checks_run_runs(tmp_path: Path) -> None:
    """check-config refuses a missing model, rules naming classes the model lacks, and an unreadable TLS file,
    with the exit code run gives for the first problem (which run stops at)."""
    cases = {
        "emotion:\n  model_path: /nonexistent/model.onnx\n": "emotion model not found: /nonexistent/model.onnx",
        "rules:\n  stress:\n    classes: [sadnes]\n": "rules.stress.classes has ['sadnes']",
        f"camera: {{source: {SAMPLE_VIDEO}}}\n" + TLS_CASE: "cannot read /nonexistent/ca.crt",
    }
    for text, expected in cases.items():
        path = tmp_path / "cabin-monitor.yaml"
        path.write_text("vehicle_id: car-1\n" + text)
        check = subprocess.run(
            [sys.executable, "-m", "cabin_monitor", "check-config", str(path)], capture_output=True, text=True
        )
        run = subprocess.run(
            [sys.executable, "-m", "cabin_monitor", "run", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert check.returncode == run.returncode != 0, (text, check.stderr[-1500:], run.stderr[-1500:])
        assert expected in check.stderr and expected in run.stderr, (text, check.stderr[-1500:])
        assert "Traceback" not in check.stderr and "Exception ignored" not in check.stderr


def test_relative_paths_in_a_file_mean_beside_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ca_file: ca.crt` is the file beside the configuration wherever the daemon runs from; a bare model
    name that is no file there still names a bundled model; a path from the environment is left as given."""
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "ca.crt").write_text("x")
    path = folder / "cabin-monitor.yaml"
    path.write_text(
        "mqtt:\n  url: mqtts://bus:8883\n  tls:\n    ca_file: ca.crt\n"
        "emotion:\n  model_path: emotionaldan-3.onnx\n  trt_cache_dir: cache/trt\n"
        "outbox:\n  path: state/outbox.sqlite\n"
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path, environ={"CABIN_MONITOR__STATE_DIR": "var/state"})
    assert cfg.mqtt.tls is not None and cfg.mqtt.tls.ca_file == folder / "ca.crt"
    assert cfg.emotion.model_path == Path("emotionaldan-3.onnx")
    assert cfg.emotion.trt_cache_dir == folder / "cache" / "trt"
    assert cfg.outbox.path == folder / "state" / "outbox.sqlite"
    assert cfg.state_dir == Path("var/state")


@pytest.mark.parametrize(
    ("text", "expected"), [("", "5"), ("mqtt:\n  protocol: 5\n", "5"), ("mqtt: {protocol: 3.1.1}\n", "3.1.1")]
)
def test_mqtt_protocol_defaults_to_5_and_3_1_1_stays_selectable(text: str, expected: str) -> None:
    """mqtt.protocol is MQTT 5 unless set to 3.1.1; YAML's number 5 means "5"."""
    assert parse_config_text(text, environ={}).mqtt.protocol == expected


def test_other_mqtt_protocols_are_refused() -> None:
    """Only 5 and 3.1.1 are spoken; 3.1 and true are errors naming the key."""
    for value in ("3.1", "4", "true"):
        with pytest.raises(ConfigError, match=r"mqtt\.protocol"):
            parse_config_text(f"mqtt:\n  protocol: {value}\n", environ={})


def test_regions_and_a_single_model_path_are_checked() -> None:
    """Detector regions must lie inside the image and have unique names; a model path needs one BlazeFace range."""
    with pytest.raises(ConfigError) as err:
        parse_config_text("detector:\n  regions:\n    - {name: a, zone: [0.5, 0, 0.2, 1]}\n", "x.yaml", environ={})
    assert "detector.regions.0.zone" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config_text(
            "detector:\n  regions:\n    - {name: a, zone: [0, 0, 1, 1]}\n    - {name: a, zone: [0, 0, 1, 1]}\n",
            "x.yaml",
            environ={},
        )
    assert "unique" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config_text("detector:\n  model_path: my.tflite\n", "x.yaml", environ={})
    assert "range" in str(err.value)
    assert parse_config_text("detector:\n  range: short\n  model_path: my.tflite\n", "x.yaml", environ={})


def test_the_outbox_fallback_file_is_the_setting_else_systemds_runtime_folder_else_none(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """outbox.fallback_path wins; without it $RUNTIME_DIRECTORY (its first folder) holds it; elsewhere none."""
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    assert Config().resolved_fallback_path() is None
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/cabin-monitor:/run/other")
    assert Config().resolved_fallback_path() == Path("/run/cabin-monitor/held-events.sqlite")
    chosen = tmp_path / "held.sqlite"
    assert Config.model_validate({"outbox": {"fallback_path": str(chosen)}}).resolved_fallback_path() == chosen


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("mqtt://car-a:hunter2@bus:1883", "mqtt://car-a:***@bus:1883"),
        ("rtsp://admin:p@ss:w@cam.local/stream", "rtsp://admin:***@cam.local/stream"),
        ("car-a:hunter2@bus:1883", "car-a:***@bus:1883"),
        ("mqtt://car-a@bus:1883", "mqtt://car-a@bus:1883"),
        ("mqtt://bus:1883", "mqtt://bus:1883"),
        ("rtsp://cam.local/a:b@c", "rtsp://cam.local/a:b@c"),
    ],
)
def test_redacted_hides_the_password_of_a_url(url: str, shown: str) -> None:
    """A URL's password becomes *** (user and host stay, for the operator); a URL without one is unchanged."""
    assert redacted(url) == shown


@pytest.mark.parametrize("url", ["mqtt://car-a:hunter2@bus:1883", "mqtts://car-a@bus", "tcp://car-a:hunter2@bus"])
def test_credentials_in_the_broker_url_are_refused_naming_the_settings(url: str) -> None:
    """User info in mqtt.url (which was read as part of the host) is refused, pointing at mqtt.username and
    mqtt.password, and the message never repeats the password."""
    with pytest.raises(ConfigError) as err:
        parse_config_text(f"mqtt:\n  url: {url}\n", environ={})
    (problem,) = err.value.problems
    assert problem.startswith("mqtt.url (line 2): MQTT URL must not carry credentials")
    assert "mqtt.username and mqtt.password" in problem and "hunter2" not in problem


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_no_command_shows_a_broker_password(tmp_path: Path, command: str) -> None:
    """check-config and run (file, environment or --mqtt-url) refuse credentials in the URL with exit code 2
    and never print the password."""
    path = tmp_path / "cabin-monitor.yaml"
    path.write_text("vehicle_id: car-a\nmqtt:\n  url: mqtt://car-a:hunter2@bus:1883\n")
    args = [command, str(path)] if command == "check-config" else [command, "--config", str(path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CABIN_MONITOR")}
    runs = [subprocess.run([sys.executable, "-m", "cabin_monitor", *args], capture_output=True, text=True, timeout=120)]
    if command == "run":
        url = "mqtt://car-a:hunter2@bus:1883"
        runs.append(
            subprocess.run(
                [sys.executable, "-m", "cabin_monitor", "run", "--mqtt-url", url, "--vehicle-id", "car-a"],
                capture_output=True,
                text=True,
                timeout=120,
                env=env,
            )
        )
        runs.append(
            subprocess.run(
                [sys.executable, "-m", "cabin_monitor", "run", "--vehicle-id", "car-a"],
                capture_output=True,
                text=True,
                timeout=120,
                env=env | {"CABIN_MONITOR__MQTT__URL": url},
            )
        )
    for proc in runs:
        assert proc.returncode == 2, proc.stderr[-1500:]
        assert "mqtt.username and mqtt.password" in proc.stderr and "hunter2" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    ("prefix", "message"),
    [
        ("//", "empty topic level"),
        ("fleet//cabin", "empty topic level"),
        ("/cabin", "empty topic level"),
        ("cabin/", "empty topic level"),
        ("cabin/+", "wildcard"),
        ("cabin/#", "wildcard"),
        ("cab in", "letters, digits"),
    ],
)
def test_a_topic_prefix_with_empty_levels_or_wildcards_is_refused(prefix: str, message: str) -> None:
    """mqtt.topic_prefix must be topic levels joined by '/': none empty, no wildcard."""
    with pytest.raises(ConfigError) as err:
        parse_config_text(f'mqtt:\n  topic_prefix: "{prefix}"\n', environ={})
    (problem,) = err.value.problems
    assert problem.startswith("mqtt.topic_prefix (line 2):") and message in problem, problem
    assert parse_config_text("mqtt:\n  topic_prefix: fleet/cabin-2\n", environ={}).mqtt.topic_prefix == "fleet/cabin-2"


def test_a_relative_video_file_source_means_beside_the_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`camera.source: clips/cabin.mp4` is the file beside the configuration, like every other path; cameras,
    URLs, pipelines, 'sample' and a source from the environment stay as written."""
    folder = tmp_path / "etc"
    path = folder / "cabin-monitor.yaml"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    for source in ("clips/cabin.mp4", "cabin.mp4"):
        path.write_text(f"camera:\n  source: {source}\n")
        assert load_config(path, environ={}).camera.source == str(folder / source)
    for source in ("0", "/dev/video2", "rtsp://cam/stream", "gst: videotestsrc ! appsink", "sample", "/abs/x.mp4"):
        path.write_text(f'camera:\n  source: "{source}"\n')
        assert load_config(path, environ={}).camera.source == source
    path.write_text("camera:\n  source: clips/cabin.mp4\n")
    from_env = load_config(path, environ={"CABIN_MONITOR__CAMERA__SOURCE": "other.mp4"})
    assert from_env.camera.source == "other.mp4"


def test_a_single_underscore_variable_is_warned_about_once(capsys: pytest.CaptureFixture[str]) -> None:
    """CABIN_MONITOR_MQTT_URL (one underscore) is not read: the first load warns once, naming the variable
    that would set it; variables naming no setting (CABIN_MONITOR_MODELS_DIR) are not warned about."""
    environ = {"CABIN_MONITOR_MQTT_URL": "mqtt://bus:1883", "CABIN_MONITOR_MODELS_DIR": "/opt/models"}
    for _ in range(2):
        assert parse_config_text("", environ=environ).mqtt.url is None
    err = capsys.readouterr().err
    expected = (
        "cabin-monitor: warning: CABIN_MONITOR_MQTT_URL is ignored: settings are read from CABIN_MONITOR__MQTT__URL\n"
    )
    assert err == expected


def test_check_config_warns_of_a_single_underscore_variable(tmp_path: Path) -> None:
    """check-config shows the warning for a variable that sets nothing, and still passes a good file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CABIN_MONITOR")}
    env["CABIN_MONITOR_RULES_STRESS_SUSTAIN_S"] = "5"
    proc = subprocess.run(
        [sys.executable, "-m", "cabin_monitor", "check-config", str(EXAMPLE)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("CABIN_MONITOR_RULES_STRESS_SUSTAIN_S is ignored") == 1
    assert "CABIN_MONITOR__RULES__STRESS__SUSTAIN_S" in proc.stderr


def test_check_config_lists_rule_class_names_with_the_other_problems(tmp_path: Path) -> None:
    """A misspelt key and a rule naming a class the model lacks are both reported in one pass (exit 2)."""
    path = tmp_path / "cabin-monitor.yaml"
    path.write_text("vehicle_id: car-1\ncamera:\n  sorce: 0\nrules:\n  stress:\n    classes: [sadnes]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "cabin_monitor", "check-config", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "2 problem(s)" in proc.stderr and "camera.sorce (line 3): unknown key" in proc.stderr
    assert "rules.stress.classes has ['sadnes']" in proc.stderr, proc.stderr
