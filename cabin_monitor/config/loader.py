"""Reading the configuration: YAML text or file, environment overrides, and every problem as a ``Problem``
value (dotted path, message, where the value came from), printed one line each.

Environment variables named ``CABIN_MONITOR__SECTION__FIELD`` override single values. The value is the
variable's text, read by the field's type: a text field takes it as it is (``#secret`` is a password, not a
comment), a number or true/false field parses it, a list or section field reads it as JSON
(``CABIN_MONITOR__EMOTION__PROVIDERS='["cuda", "cpu"]'``), and an empty value clears a field that may be
empty. Every problem is reported with its dotted path and, for files, its YAML line; a value from the
environment is blamed on its variable.
"""

from __future__ import annotations

import json
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from cabin_monitor.config.root import Config
from cabin_monitor.config.rules import RulesConfig
from cabin_monitor.errors import ConfigurationError

ENV_PREFIX = "CABIN_MONITOR__"
M = TypeVar("M", bound=BaseModel)
# A configuration is a few kilobytes: these bounds refuse hostile documents (an alias bomb of a
# kilobyte expands to gigabytes) long before they cost time or memory.
MAX_CONFIG_BYTES = 1 << 20
MAX_ALIASES = 64


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys and documents with more than ``MAX_ALIASES`` aliases."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"more than {MAX_ALIASES} aliases (*name): refused",
                    self.peek_event().start_mark,  # type: ignore[no-untyped-call]
                )
        return super().compose_node(parent, index)  # type: ignore[no-any-return]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    if len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
        raise yaml.YAMLError(f"larger than {MAX_CONFIG_BYTES} bytes: refused")
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()  # type: ignore[no-untyped-call]


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The parser's message with the line where the broken construct starts, then where it was noticed."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return str(exc)
    parts = []
    if exc.context_mark is not None and exc.context:
        parts.append(f"{exc.context} at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1}")
    if exc.problem_mark is not None:
        parts.append(f"line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}: {exc.problem}")
    return "; ".join(parts) or str(exc)


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
        if len(text) > MAX_CONFIG_BYTES:
            return lines
        loader = _BoundedLoader(text)
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()  # type: ignore[no-untyped-call]
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem with a configuration value: the dotted ``path`` of its key and what is wrong with it.

    ``location`` says where the value came from for a reader of the file (``line 4``, ``from the environment
    variable CABIN_MONITOR__A__B``); it is not part of the path.
    """

    path: str
    message: str
    location: str | None = None

    def under(self, prefix: str) -> Problem:
        """The same problem with ``prefix`` in front of its path (``rules.`` for a rules patch)."""
        return replace(self, path=prefix + self.path)

    def line(self) -> str:
        """``path.to.field (line N): message``, as ``check-config`` prints it."""
        where = f" ({self.location})" if self.location else ""
        return f"{self.path}{where}: {self.message}"


def validation_problems(
    exc: ValidationError,
    lines: Mapping[tuple[str | int, ...], int] | None = None,
    env_names: Mapping[tuple[str, ...], str] | None = None,
) -> list[Problem]:
    """One problem per validation error, with its dotted path and, where known, its YAML line.

    A value set by an environment variable is blamed on that variable (``env_names``), not on the file.
    """
    out = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-after")))
        path = ".".join(str(p) for p in loc) or "(top level)"
        location = None
        env = next((name for key, name in (env_names or {}).items() if loc[: len(key)] == key), None)
        if env is not None:
            location = f"from the environment variable {env}"
        elif lines:
            for n in range(len(loc), -1, -1):
                if loc[:n] in lines:
                    location = f"line {lines[loc[:n]]}"
                    break
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not a setting here; check the spelling)"
        out.append(Problem(path, msg, location))
    return out


def describe_errors(
    exc: ValidationError,
    lines: Mapping[tuple[str | int, ...], int] | None = None,
    env_names: Mapping[tuple[str, ...], str] | None = None,
) -> list[str]:
    """One readable line per validation error: ``path.to.field (line N): message`` (``Problem.line``)."""
    return [problem.line() for problem in validation_problems(exc, lines, env_names)]


def env_override_names(environ: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """The configuration path each ``CABIN_MONITOR__A__B`` variable sets, e.g. ``("a", "b")``."""
    names = {}
    for name in environ:
        if name.startswith(ENV_PREFIX):
            path = tuple(p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p)
            if path:
                names[path] = name
    return names


def rule_paths_from_environment(environ: Mapping[str, str], section: str = "rules") -> frozenset[str]:
    """Dotted rule paths (``stress.sustain_s``, a section ``stress``, or ``""`` for all the rules) that
    ``CABIN_MONITOR__RULES__…`` variables set (``CABIN_MONITOR__RULES_SHADOW__…`` with ``rules_shadow``)."""
    return frozenset(".".join(path[1:]) for path in env_override_names(environ) if path[0] == section)


def apply_env_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``CABIN_MONITOR__A__B=value`` settings applied; ``ConfigError`` naming
    each variable whose value cannot be read (a list or section value that is not JSON)."""
    result, problems = _with_env_overrides(raw, environ)
    if problems:
        raise ConfigError("the environment", problems)
    return result


def _with_env_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """A copy of ``raw`` with the readable overrides applied, and one problem per unreadable one."""
    result: dict[str, Any] = _deep_copy(raw)
    problems: list[str] = []
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        try:
            value = env_value(text, _field_type(path))
        except ValueError as exc:
            problems.append(f"{'.'.join(path)} (from the environment variable {name}): {exc}")
            continue
        node = result
        for key in path[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        node[path[-1]] = value
    return result, problems


_NO_FIELD = object()  # the path names no setting: the value goes in as text, and validation says so
_INTEGER = re.compile(r"[+-]?\d+")
_TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
_FALSE_WORDS = frozenset({"false", "no", "off", "0"})


def _field_type(path: list[str]) -> Any:
    """The type of the setting at ``path`` in ``Config`` (``_NO_FIELD`` when there is none)."""
    model: Any = Config
    annotation: Any = _NO_FIELD
    for key in path:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or key not in model.model_fields:
            return _NO_FIELD
        annotation = model.model_fields[key].annotation
        members = _non_null(annotation)
        model = members[0] if len(members) == 1 else None
    return annotation


def _non_null(annotation: Any) -> tuple[Any, ...]:
    """The members of ``X | Y | None`` other than None (``(X,)`` for a plain type)."""
    if get_origin(annotation) in (Union, types.UnionType):
        return tuple(a for a in get_args(annotation) if a is not type(None))
    return (annotation,)


def _may_be_none(annotation: Any) -> bool:
    """Whether ``annotation`` is ``X | None``."""
    return get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)


def env_value(text: str, annotation: Any) -> Any:
    """An environment variable's text as a value for a field of type ``annotation``.

    Text fields get the text unchanged; numbers and true/false are parsed (text that does not parse is
    passed on for validation to refuse with the field's own message); lists and sections are JSON. An
    empty value is None where the field may be None. Raises ``ValueError`` for JSON that does not parse.
    """
    if not text.strip():
        return None if _may_be_none(annotation) else text
    members = _non_null(annotation)
    if len(members) != 1:
        return text
    kind = members[0]
    word = text.strip()
    if kind is bool:
        lowered = word.lower()
        return True if lowered in _TRUE_WORDS else False if lowered in _FALSE_WORDS else text
    if kind is int:
        return int(word) if _INTEGER.fullmatch(word) else text
    if kind is float:
        try:
            return float(word)
        except ValueError:
            return text
    if get_origin(kind) in (tuple, list, set, frozenset, dict) or (
        isinstance(kind, type) and issubclass(kind, BaseModel)
    ):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"not valid JSON ({exc.msg} at character {exc.pos + 1}); a list or section is given "
                'as JSON, e.g. ["cuda", "cpu"] or {"ca_file": "ca.crt"}'
            ) from None
    return text


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def parse_config_text(text: str, source: str = "<config>", environ: Mapping[str, str] | None = None) -> Config:
    """Parse and validate YAML text; raises ``ConfigError`` listing every problem."""
    try:
        raw = _load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"not valid YAML: {_yaml_problem(exc)}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"(top level): expected a mapping of sections, got {type(raw).__name__}"])
    environ = os.environ if environ is None else environ
    raw, problems = _with_env_overrides(raw, environ)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        problems += describe_errors(exc, _yaml_lines(text), env_override_names(environ))
    if problems:
        raise ConfigError(source, problems)
    return cfg


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
    environ = os.environ if environ is None else environ
    cfg = parse_config_text(text, str(path), environ)
    from_env = {".".join(key) for key in env_override_names(environ)}
    return _paths_relative_to(cfg, path.resolve().parent, from_env)


# A bare file name here that is no file beside the configuration names a bundled model.
_BUNDLED_NAMES = frozenset({"emotion.model_path"})


def _paths_relative_to(model: M, folder: Path, skip: set[str], prefix: str = "") -> M:
    """``model`` with every relative path read as relative to ``folder`` (the configuration file's), as
    ``ca_file: ca.crt`` means the file beside the configuration whatever the daemon's working folder.
    Paths set from the environment (``skip``) keep meaning what they say."""
    update: dict[str, Any] = {}
    for name, value in model:
        key = f"{prefix}{name}"
        if key in skip:
            continue
        if isinstance(value, BaseModel):
            nested = _paths_relative_to(value, folder, skip, key + ".")
            if nested is not value:
                update[name] = nested
        elif isinstance(value, Path) and not value.is_absolute():
            bare = len(value.parts) == 1 and not (folder / value).exists()
            if not (key in _BUNDLED_NAMES and bare):
                update[name] = folder / value
    return model.model_copy(update=update) if update else model


def paths_set(model: BaseModel, prefix: str = "") -> set[str]:
    """Dotted path of every value ``model`` was given (by its file, the environment or the command line),
    section by section; values left at their defaults are not in it. Lists are single values."""
    out: set[str] = set()
    for name in model.model_fields_set:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out |= paths_set(value, f"{prefix}{name}.")
        else:
            out.add(f"{prefix}{name}")
    return out


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
