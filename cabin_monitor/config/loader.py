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
import sys
import types
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from cabin_monitor.config.camera import source_kind
from cabin_monitor.config.root import Config
from cabin_monitor.config.rules import RulesConfig
from cabin_monitor.errors import ConfigurationError

ENV_PREFIX = "CABIN_MONITOR__"
M = TypeVar("M", bound=BaseModel)
# A configuration is a few kilobytes, a few hundred values, five levels deep: these bounds refuse hostile
# documents (an alias bomb of a few hundred bytes expands to gigabytes, thousands of nested brackets
# exhaust a recursive parser) before they cost time or memory, whatever they hold up to the size limit.
MAX_CONFIG_BYTES = 1 << 20
MAX_ALIASES = 64
MAX_NODES = 20_000  # values, once every alias is expanded
MAX_DEPTH = 32  # nested sections and lists
# LibYAML's parser where PyYAML was built with it (its wheels are): the pure-Python one takes seconds on
# a file at the size limit.
_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _BoundedLoader(_Base):  # type: ignore[misc]
    """The safe loader, refusing duplicate keys; ``_check_bounds`` runs before it composes anything."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)  # type: ignore[no-any-return]


def _check_bounds(text: str) -> None:
    """Refuse a document over ``MAX_CONFIG_BYTES``, or whose events hold more than ``MAX_ALIASES`` aliases,
    more than ``MAX_NODES`` values once aliases are expanded, an alias inside the node it names, or nesting
    deeper than ``MAX_DEPTH``: read from the parser's events, so nothing is composed, expanded or recursed."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
        raise yaml.YAMLError(f"larger than {MAX_CONFIG_BYTES} bytes: refused")
    sizes: dict[str, int] = {}  # expanded size of each anchored node
    open_nodes: list[tuple[str | None, int]] = []  # (anchor, values before it) of each open collection
    aliases = values = 0
    for event in yaml.parse(text, Loader=_Base):
        problem = None
        if isinstance(event, yaml.AliasEvent):
            aliases += 1
            values += sizes.get(event.anchor or "", 1)
            if aliases > MAX_ALIASES:
                problem = f"more than {MAX_ALIASES} aliases (*name)"
            elif any(anchor == event.anchor for anchor, _ in open_nodes):
                problem = f"alias *{event.anchor} inside the node it names"
        elif isinstance(event, yaml.ScalarEvent | yaml.CollectionStartEvent):
            values += 1
            if isinstance(event, yaml.CollectionStartEvent):
                open_nodes.append((event.anchor, values - 1))
            elif event.anchor is not None:
                sizes[event.anchor] = 1
            if len(open_nodes) > MAX_DEPTH:
                problem = f"nested more than {MAX_DEPTH} levels deep"
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, before = open_nodes.pop()
            if anchor is not None:
                sizes[anchor] = values - before
        if values > MAX_NODES:
            problem = f"more than {MAX_NODES} values once aliases are expanded"
        if problem is not None:
            at = event.start_mark  # LibYAML's or PyYAML's mark: the line and column are what is read
            mark = None if at is None else yaml.error.Mark("<config>", 0, at.line, at.column, "", 0)
            raise yaml.composer.ComposerError(None, None, f"{problem}: refused", mark)


def _load_yaml(text: str) -> Any:
    _check_bounds(text)
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _compose_yaml(text: str) -> yaml.Node | None:
    _check_bounds(text)
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_node()  # type: ignore[no-any-return]
    finally:
        loader.dispose()


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
        root = _compose_yaml(text)
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
        return _json_value(text)
    return text


def _json_value(text: str) -> Any:
    """A list or section given as JSON, nested at most ``MAX_DEPTH`` levels; ``ValueError`` otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"not valid JSON ({exc.msg} at character {exc.pos + 1}); a list or section is given "
            'as JSON, e.g. ["cuda", "cpu"] or {"ca_file": "ca.crt"}'
        ) from None
    except RecursionError:
        value = None
        depth = MAX_DEPTH + 1
    else:
        depth = _depth(value)
    if depth > MAX_DEPTH:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep: refused")
    return value


def _depth(value: Any) -> int:
    """How many lists and mappings deep ``value`` is (0 for a scalar), without recursion."""
    deepest = 0
    todo = [(value, 1)]
    while todo:
        item, level = todo.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if level <= MAX_DEPTH:
            todo.extend((child, level + 1) for child in children)
    return deepest


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


_SINGLE_PREFIX = "CABIN_MONITOR_"
_WARNED: set[str] = set()  # variables already warned about in this process


def misspelt_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """Variables like ``CABIN_MONITOR_MQTT_URL`` (one underscore), which name a setting but are not read, each
    with the name that would set it (``CABIN_MONITOR__MQTT__URL``)."""
    out = {}
    for name in environ:
        if name.startswith(_SINGLE_PREFIX) and not name.startswith(ENV_PREFIX):
            path = _setting_path(Config, name[len(_SINGLE_PREFIX) :].lower())
            if path is not None:
                out[name] = ENV_PREFIX + "__".join(p.upper() for p in path)
    return out


def _setting_path(model: type[BaseModel], words: str) -> list[str] | None:
    """The setting that ``words`` (field names joined by single underscores) names under ``model``, if any."""
    for name, field in model.model_fields.items():
        if words == name:
            return [name]
        members = _non_null(field.annotation)
        nested = members[0] if len(members) == 1 else None
        if words.startswith(name + "_") and isinstance(nested, type) and issubclass(nested, BaseModel):
            rest = _setting_path(nested, words[len(name) + 1 :])
            if rest is not None:
                return [name, *rest]
    return None


def _warn_misspelt(environ: Mapping[str, str]) -> None:
    for name, meant in sorted(misspelt_variables(environ).items()):
        if name not in _WARNED:
            _WARNED.add(name)
            print(f"cabin-monitor: warning: {name} is ignored: settings are read from {meant}", file=sys.stderr)


def parse_config_text(text: str, source: str = "<config>", environ: Mapping[str, str] | None = None) -> Config:
    """Parse and validate YAML text; raises ``ConfigError`` listing every problem. Warns once (stderr) of each
    variable that names a setting with single underscores, which is never read."""
    try:
        raw = _load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"not valid YAML: {_yaml_problem(exc)}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"(top level): expected a mapping of sections, got {type(raw).__name__}"])
    environ = os.environ if environ is None else environ
    _warn_misspelt(environ)
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


def partial_config(path: Path, sections: Collection[str], environ: Mapping[str, str] | None = None) -> Config | None:
    """Only ``sections`` of the file, with their environment overrides, validated and with relative paths read
    beside the file; None where the file cannot be read or those sections do not validate on their own (then
    ``load_config`` lists why). For checks that can run while other sections of the file are still wrong."""
    try:
        raw = _load_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(raw, dict):
        return None
    environ = os.environ if environ is None else environ
    raw, _ = _with_env_overrides(raw, environ)
    try:
        cfg = Config.model_validate({key: raw[key] for key in sections if key in raw})
    except ValidationError:
        return None
    from_env = {".".join(key) for key in env_override_names(environ)}
    return _paths_relative_to(cfg, path.resolve().parent, from_env)


# A bare file name here that is no file beside the configuration names a bundled model.
_BUNDLED_NAMES = frozenset({"emotion.model_path"})
# Text settings that may name a file (beside a camera, a URL or a pipeline).
_FILE_TEXTS = frozenset({"camera.source"})


def _relative_file(source: str) -> bool:
    """Whether a ``camera.source`` names a video file by a relative path ('sample' is the bundled video)."""
    return source_kind(source) == "file" and source.strip() != "sample" and not Path(source.strip()).is_absolute()


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
        elif key in _FILE_TEXTS and isinstance(value, str) and _relative_file(value):
            update[name] = str(folder / value.strip())
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
