"""Reading the configuration: YAML text or file, environment overrides, and one line per problem.

Environment variables named ``CABIN_MONITOR__SECTION__FIELD`` override single values (the value is read
as YAML, so ``CABIN_MONITOR__MQTT__KEEPALIVE_S=15`` is a number). Every validation problem is reported
with its dotted path and, for files, its YAML line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cabin_monitor.config.root import Config
from cabin_monitor.config.rules import RulesConfig
from cabin_monitor.errors import ConfigurationError

ENV_PREFIX = "CABIN_MONITOR__"


class ConfigError(ConfigurationError):
    """A configuration file that cannot be used, with one line per problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid configuration\n" + "\n".join(f"  {p}" for p in problems))


def _yaml_lines(text: str) -> dict[tuple[str | int, ...], int]:
    """Line number (1-based) of every key path in a YAML document."""
    lines: dict[tuple[str | int, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str | int, ...]) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = (*path, str(key.value))
                lines[child] = key.start_mark.line + 1
                walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def describe_errors(exc: ValidationError, lines: Mapping[tuple[str | int, ...], int] | None = None) -> list[str]:
    """One readable line per validation error: ``path.to.field (line N): message``."""
    out = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-after")))
        path = ".".join(str(p) for p in loc) or "(top level)"
        where = ""
        if lines:
            for n in range(len(loc), -1, -1):
                if loc[:n] in lines:
                    where = f" (line {lines[loc[:n]]})"
                    break
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not a setting here; check the spelling)"
        out.append(f"{path}{where}: {msg}")
    return out


def apply_env_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``CABIN_MONITOR__A__B=value`` settings applied."""
    result: dict[str, Any] = _deep_copy(raw)
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        value = yaml.safe_load(text) if text.strip() else None
        node = result
        for key in path[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        node[path[-1]] = value
    return result


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def parse_config_text(text: str, source: str = "<config>", environ: Mapping[str, str] | None = None) -> Config:
    """Parse and validate YAML text; raises ``ConfigError`` listing every problem."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [f"not valid YAML{where}: {problem}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"(top level): expected a mapping of sections, got {type(raw).__name__}"])
    raw = apply_env_overrides(raw, os.environ if environ is None else environ)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(source, describe_errors(exc, _yaml_lines(text))) from None


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Load a YAML file (or the defaults when ``path`` is None) with environment overrides."""
    if path is None:
        return parse_config_text("", "<defaults>", environ)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read the file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), ["the file is not UTF-8 text"]) from None
    return parse_config_text(text, str(path), environ)


def merge_rules(base: RulesConfig, patch: Mapping[str, Any]) -> RulesConfig:
    """Apply a partial rules mapping on top of ``base``; raises ``ValidationError`` on any problem."""
    merged = deep_merge(base.model_dump(mode="json"), dict(patch))
    return RulesConfig.model_validate(merged)


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``patch`` merged in, mapping by mapping (patch values win)."""
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
