"""The rules in force: the configuration file's ``rules`` (with its environment variables) under the
operators' remote overrides, where each value came from, and the override file that keeps them.

Owns the precedence (``PRECEDENCE``): the accumulated override patch is merged on top of the file's
rules and wins over it, also after a SIGHUP reload and after restarts, until a reset drops it. A change
is validated completely (every rule field, class names against the model), written to the override
file, then swapped in; any failure leaves everything as it was and comes back as structured problems.
A change is applied at most once per request id.

Takes validated values (a patch mapping, request ids, wall-clock times) and returns ``Outcome`` and
``InForce`` values; it knows no broker and no payload format. May import ``config``, ``messages``,
``errors`` and the engine's ``check_classes``; its only I/O is the override file.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

import structlog
from pydantic import ValidationError
from structlog.typing import FilteringBoundLogger

from cabin_monitor.config import Problem, RulesConfig, deep_merge, merge_rules, paths_set, validation_problems
from cabin_monitor.messages import utc_iso
from cabin_monitor.rules import check_classes

log = structlog.get_logger("cabin_monitor.rules.in_force")

PendingT = TypeVar("PendingT")

# "live" is the shadow rules' only (``rules.shadow``): a value of the live rules the shadow set was made from.
RuleSource = Literal["default", "file", "environment", "remote", "live"]
# The one rule between the configuration file and operators' overrides, stated in every answer,
# in rules/state and in the SIGHUP log line.
PRECEDENCE = (
    "remote overrides (config/set) are layered on top of the configuration file's rules and win over it, "
    "also after SIGHUP and restarts, until config/reset drops them"
)


@dataclass(frozen=True, slots=True)
class Override:
    """One rule value a remote override sets, and the file's value (or the default) it hides."""

    path: str  # dotted, e.g. "stress.sustain_s"
    remote: Any
    file: Any


@dataclass(frozen=True, slots=True)
class InForce:
    """The rules in force at one moment, built once per change."""

    rules: RulesConfig
    values: Mapping[str, Any]  # the rules as JSON values (``rules.model_dump(mode="json")``)
    sources: Mapping[str, RuleSource]  # dotted path of every rule value -> where it came from
    overrides: tuple[Override, ...]
    generation: int  # counts changes: of two states, the higher one is the newer


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one request: the rules in force after it, or the problems that refused it."""

    in_force: InForce | None  # None when refused (or, for the shadow rules, when none are left)
    problems: tuple[Problem, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether the request was accepted."""
        return not self.problems


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted path -> value of every leaf of a nested mapping (lists are leaves)."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten(value, path + ".")
        else:
            out[path] = value
    return out


def rule_sources(
    values: Mapping[str, Any], patch: Mapping[str, Any], base: RulesConfig, from_environment: Collection[str] = ()
) -> dict[str, RuleSource]:
    """Dotted path of every rule value in ``values`` -> ``remote`` where the override patch sets it,
    ``environment`` where a path in ``from_environment`` (a value or a whole section) sets it, ``file``
    where the rest of the configuration ``base`` sets it, else ``default``."""
    remote = set(flatten(patch))
    configured = paths_set(base)

    def source(path: str) -> RuleSource:
        if path in remote:
            return "remote"
        if any(p == "" or path == p or path.startswith(p + ".") for p in from_environment):
            return "environment"
        return "file" if path in configured else "default"

    return {path: source(path) for path in flatten(values)}


def rule_overrides(base: RulesConfig, patch: Mapping[str, Any]) -> tuple[Override, ...]:
    """Every value the override patch sets, with the file's value that it hides."""
    file_values = flatten(base.model_dump(mode="json"))
    return tuple(Override(p, v, file_values.get(p)) for p, v in sorted(flatten(patch).items()))


def describe_overrides(overrides: Sequence[Override]) -> str:
    """``stress.sustain_s (file 3.0, remote 7.0), ...`` for a log line; ``none`` when empty."""
    return ", ".join(f"{o.path} (file {o.file!r}, remote {o.remote!r})" for o in overrides) or "none"


class RecentIds:
    """The last ``capacity`` request ids, with when each was seen (oldest forgotten first)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()

    def get(self, request_id: str) -> float | None:
        """When ``request_id`` was remembered, or None."""
        return self._seen.get(request_id)

    def add(self, request_id: str, wall_time_s: float) -> None:
        """Remember ``request_id``, forgetting the oldest beyond the capacity."""
        self._seen[request_id] = wall_time_s
        self._seen.move_to_end(request_id)
        while len(self._seen) > self._capacity:
            self._seen.popitem(last=False)

    def refusal(self, request_id: str | None) -> Outcome | None:
        """The refusal of a request whose id was already applied, or None to go ahead with it."""
        # QoS 1 may deliver a request twice, an operator may re-send one.
        seen = None if request_id is None else self.get(request_id)
        if seen is None:
            return None
        message = f"already applied at {utc_iso(seen)}; a change is applied at most once per request_id"
        return Outcome(None, (Problem("request_id", message),))

    def remember(self, request_id: str | None, wall_time_s: float) -> None:
        """``add`` for a request that has an id."""
        if request_id is not None:
            self.add(request_id, wall_time_s)


def checked_rules(base: RulesConfig, patch: Mapping[str, Any], class_names: Sequence[str]) -> RulesConfig | Outcome:
    """``patch`` merged on ``base`` and checked against the model's classes, or the refusal naming its problems."""
    try:
        effective = merge_rules(base, patch)
        check_classes(effective, class_names)
    except ValidationError as exc:
        return Outcome(None, tuple(p.under("rules.") for p in validation_problems(exc)))
    except ValueError as exc:  # a class the model lacks
        return Outcome(None, (Problem("rules", str(exc)),))
    return effective


def build_in_force(
    effective: RulesConfig,
    overrides_base: RulesConfig,
    patch: Mapping[str, Any],
    sources: Callable[[Mapping[str, Any]], Mapping[str, RuleSource]],
    generation: int,
) -> InForce:
    """The ``InForce`` of ``effective``, with ``patch``'s overrides of ``overrides_base`` and ``sources(values)``."""
    values = effective.model_dump(mode="json")
    return InForce(
        rules=effective,
        values=values,
        sources=sources(values),
        overrides=rule_overrides(overrides_base, patch),
        generation=generation,
    )


class OverrideFile:
    """The persisted override patch: a JSON object, written atomically, owner-only; None keeps nothing.

    ``kind`` (``""`` or ``"shadow "``) goes into its log events and problems.
    """

    def __init__(self, path: Path | None, kind: str = "") -> None:
        self.path = path
        self.kind = kind

    def load(self) -> dict[str, Any] | None:
        """The saved patch, or None when there is none. Raises OSError or ValueError for an unusable file."""
        if self.path is None or not self.path.exists():
            return None
        patch = json.loads(self.path.read_text(encoding="utf-8"))
        if not isinstance(patch, dict):
            raise ValueError("the file must hold a JSON object")
        return patch

    def save(self, patch: Mapping[str, Any]) -> None:
        """Replace the saved patch (write, fsync, rename)."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # owner-only whatever the umask
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(patch, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def remove(self) -> None:
        """Drop the saved patch, durably."""
        if self.path is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        # The removal itself must survive a power cut, or the old overrides come back at the next start.
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def save_or_refuse(self, patch: Mapping[str, Any]) -> Outcome | None:
        """``save``, or (logged) the refusal of a change that cannot be saved."""
        try:
            self.save(patch)
        except OSError as exc:
            log.error(f"cannot persist {self.kind}rules override", path=str(self.path), error=str(exc))
            return Outcome(None, (Problem("(state)", f"cannot save the {self.kind}override file: {exc}"),))
        return None

    def remove_or_refuse(self) -> Outcome | None:
        """``remove``, or (logged) the refusal of a reset that cannot remove the file."""
        try:
            self.remove()
        except OSError as exc:
            log.error(f"cannot remove the {self.kind}rules override file", path=str(self.path), error=str(exc))
            return Outcome(None, (Problem("(state)", f"cannot remove the {self.kind}override file: {exc}"),))
        return None


class OverriddenRules(Generic[PendingT]):
    """What the live and the shadow rules share: a change merged over the overrides at most once per request id,
    and the pending change the inference thread takes. Subclasses build ``_in_force`` and define ``_change``."""

    _changed_event: ClassVar[str]  # the log event of an accepted change
    _log: ClassVar[FilteringBoundLogger]
    _in_force: InForce | None

    def __init__(
        self,
        class_names: Sequence[str],
        override_file: OverrideFile,
        remembered_request_ids: int,
        environment_paths: Collection[str],
    ) -> None:
        self._lock = threading.Lock()
        self._environment_paths = frozenset(environment_paths)
        self._class_names = tuple(class_names)
        self._file = override_file
        self._patch: dict[str, Any] = {}
        self._generations = itertools.count()
        self._pending: PendingT | None = None
        self._applied_ids = RecentIds(remembered_request_ids)

    def take_pending(self) -> PendingT | None:
        """The change since the last call, for the inference thread to apply between frames."""
        with self._lock:
            pending, self._pending = self._pending, None
            return pending

    def change(self, patch: Mapping[str, Any], request_id: str | None, wall_time_s: float) -> Outcome:
        """Merge a partial rules mapping over the overrides, persist it and put it in force, or refuse it."""
        with self._lock:
            refused = self._applied_ids.refusal(request_id)
            if refused is None:
                refused = self._change(deep_merge(self._patch, dict(patch)), request_id, wall_time_s)
            outcome = refused if refused is not None else Outcome(self._in_force)
        if outcome.ok:
            self._log.info(self._changed_event, request_id=request_id, change=dict(patch))
        return outcome

    def _change(self, patch: dict[str, Any], request_id: str | None, wall_time_s: float) -> Outcome | None:
        # Called with the lock held; None when the change is in force.
        raise NotImplementedError


class RulesInForce(OverriddenRules[RulesConfig]):
    """Owns the rules in force; thread-safe (the request worker and SIGHUP write, the inference thread reads).

    ``environment_paths`` are the rule paths the process's ``CABIN_MONITOR__RULES__…`` variables set
    (``rule_paths_from_environment``), reported as ``environment`` rather than ``file``.
    """

    _changed_event = "rules changed over MQTT"
    _log = log
    _in_force: InForce  # never None for the live rules

    def __init__(
        self,
        base: RulesConfig,
        class_names: Sequence[str],
        override_path: Path | None,
        *,
        remembered_request_ids: int = 1024,
        environment_paths: Collection[str] = (),
    ) -> None:
        super().__init__(class_names, OverrideFile(override_path), remembered_request_ids, environment_paths)
        check_classes(base, self._class_names)
        self._base = base
        self._in_force = self._build(base)
        self._load_overrides()

    def _build(self, effective: RulesConfig) -> InForce:
        # Called with the lock held (or before the object is shared).
        def sources(values: Mapping[str, Any]) -> dict[str, RuleSource]:
            return rule_sources(values, self._patch, self._base, self._environment_paths)

        return build_in_force(effective, self._base, self._patch, sources, next(self._generations))

    def _load_overrides(self) -> None:
        try:
            patch = self._file.load()
            if patch is None:
                return
            effective = merge_rules(self._base, patch)
            check_classes(effective, self._class_names)
        except (OSError, ValueError) as exc:
            # A bad override file must not keep the daemon from starting: run on the YAML rules.
            log.error("ignoring rules override file", path=str(self._file.path), error=str(exc))
            return
        self._patch = patch
        self._in_force = self._build(effective)
        log.info(
            "rules overrides loaded",
            path=str(self._file.path),
            remote_overrides_win=describe_overrides(self._in_force.overrides),
            precedence=PRECEDENCE,
        )

    @property
    def effective(self) -> RulesConfig:
        """The rules in force."""
        with self._lock:
            return self._in_force.rules

    def current(self) -> InForce:
        """The rules in force now, with their sources and overrides."""
        with self._lock:
            return self._in_force

    def reload(self, base: RulesConfig) -> InForce:
        """New file rules (SIGHUP) under the overrides, which still win; returns the rules then in force.

        Raises ValueError (a pydantic ValidationError, or a class the model lacks) if they do not fit.
        """
        with self._lock:
            effective = merge_rules(base, self._patch)
            check_classes(effective, self._class_names)
            self._base = base
            self._in_force = self._build(effective)
            self._pending = effective
            return self._in_force

    def _change(self, patch: dict[str, Any], request_id: str | None, wall_time_s: float) -> Outcome | None:
        # Called with the lock held; None when the change is in force.
        effective = checked_rules(self._base, patch, self._class_names)
        if isinstance(effective, Outcome):
            return effective
        refused = self._file.save_or_refuse(patch)
        if refused is not None:
            return refused
        self._patch = patch
        self._in_force = self._build(effective)
        self._pending = effective
        self._applied_ids.remember(request_id, wall_time_s)
        return None

    def reset(self, request_id: str | None, wall_time_s: float) -> Outcome:
        """Drop every override (and the override file): the file's rules are in force again."""
        with self._lock:
            refused = self._applied_ids.refusal(request_id) or self._file.remove_or_refuse()
            if refused is not None:
                return refused
            dropped = self._in_force.overrides
            self._patch = {}
            if self._in_force.rules != self._base:
                self._pending = self._base
            self._in_force = self._build(self._base)
            self._applied_ids.remember(request_id, wall_time_s)
            outcome = Outcome(self._in_force)
        log.info(
            "rules overrides dropped over MQTT; the configuration file's rules apply",
            request_id=request_id,
            dropped=describe_overrides(dropped),
        )
        return outcome
