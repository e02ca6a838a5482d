"""The shadow rules: a second rule set judged on the same readings as the live one, whose events go to
their own topic only, so operators can try thresholds on real trips before rolling them out.

The shadow set is a base with operators' shadow overrides on top. The base is the configuration file's
``rules_shadow`` when it has one, else the live rules in force at the moment an operator's first shadow
change made the set; that copy is kept in the override file with the overrides, so a restart runs the
same set. A change is validated completely (every rule field, class names against the model), written
to the shadow override file, then swapped in; any failure leaves everything as it was. A reset drops
the file: back to ``rules_shadow``, or to no shadow set. Problems name ``rules.…`` paths, like the live
rules' (the request's key is ``rules`` either way). A change is applied at most once per request id.

May import what ``rules.in_force`` imports, and ``rules.in_force``; its only I/O is its override file.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from cabin_monitor.config import RulesConfig, merge_rules
from cabin_monitor.rules.engine import check_classes
from cabin_monitor.rules.in_force import (
    InForce,
    Outcome,
    OverriddenRules,
    OverrideFile,
    RuleSource,
    build_in_force,
    checked_rules,
    describe_overrides,
    flatten,
    rule_sources,
)

log = structlog.get_logger("cabin_monitor.rules.shadow")


@dataclass(frozen=True, slots=True)
class ShadowChange:
    """A change of the shadow set for the inference thread: the rules now in force, or None for no shadow set."""

    rules: RulesConfig | None


class ShadowRules(OverriddenRules[ShadowChange]):
    """Owns the shadow rules in force (or their absence); thread-safe like ``RulesInForce``.

    ``live`` gives the live rules in force now: the base of a shadow set made at run time where the
    file has no ``rules_shadow``. Sources: ``remote`` for a shadow override, ``live`` for a value of
    that copy of the live rules, else ``environment`` (``environment_paths``: what
    ``CABIN_MONITOR__RULES_SHADOW__…`` variables set), ``file`` or ``default`` as for the live rules.
    A change makes the shadow set from the live rules when there is none.
    """

    _changed_event = "shadow rules changed over MQTT"
    _log = log

    def __init__(
        self,
        file_rules: RulesConfig | None,
        live: Callable[[], RulesConfig],
        class_names: Sequence[str],
        override_path: Path | None,
        *,
        remembered_request_ids: int = 1024,
        environment_paths: Collection[str] = (),
    ) -> None:
        super().__init__(class_names, OverrideFile(override_path, "shadow "), remembered_request_ids, environment_paths)
        if file_rules is not None:
            check_classes(file_rules, self._class_names)
        self._file_rules = file_rules
        self._live = live
        self._snapshot: RulesConfig | None = None  # the live rules a run-time shadow set was made from
        self._in_force = None if file_rules is None else self._build(file_rules, file_rules)
        self._load_overrides()

    def _build(self, effective: RulesConfig, base: RulesConfig) -> InForce:
        # Called with the lock held (or before the object is shared).
        def sources(values: Mapping[str, Any]) -> dict[str, RuleSource]:
            if self._file_rules is not None:
                return rule_sources(values, self._patch, self._file_rules, self._environment_paths)
            remote = set(flatten(self._patch))
            return {path: _live_or_remote(path in remote) for path in flatten(values)}

        return build_in_force(effective, base, self._patch, sources, next(self._generations))

    def _base(self) -> RulesConfig:
        # Called with the lock held: what the shadow overrides go on top of.
        if self._file_rules is not None:
            return self._file_rules
        return self._snapshot if self._snapshot is not None else self._live()

    def _load_overrides(self) -> None:
        try:
            saved = self._file.load()
            if saved is None:
                return
            patch, live = saved.get("patch"), saved.get("live")
            if not isinstance(patch, dict) or not (live is None or isinstance(live, dict)):
                raise ValueError('the file must hold {"live": <rules> or null, "patch": <partial rules>}')
            if self._file_rules is None and live is not None:
                self._snapshot = RulesConfig.model_validate(live)
            base = self._base()
            effective = merge_rules(base, patch)
            check_classes(effective, self._class_names)
        except (OSError, ValueError) as exc:
            # A bad override file must not keep the daemon from starting: run on the file's shadow rules.
            log.error("ignoring shadow rules override file", path=str(self._file.path), error=str(exc))
            self._snapshot = None
            return
        self._snapshot = None if self._file_rules is not None else base
        self._patch = patch
        self._in_force = self._build(effective, base)
        log.info(
            "shadow rules overrides loaded",
            path=str(self._file.path),
            shadow_overrides=describe_overrides(self._in_force.overrides),
        )

    def current(self) -> InForce | None:
        """The shadow rules in force now, with their sources and overrides; None when there are none."""
        with self._lock:
            return self._in_force

    def _change(self, patch: dict[str, Any], request_id: str | None, wall_time_s: float) -> Outcome | None:
        # Called with the lock held; None when the change is in force.
        base = self._base()
        effective = checked_rules(base, patch, self._class_names)
        if isinstance(effective, Outcome):
            return effective
        snapshot = None if self._file_rules is not None else base
        saved = {"live": None if snapshot is None else snapshot.model_dump(mode="json"), "patch": patch}
        refused = self._file.save_or_refuse(saved)
        if refused is not None:
            return refused
        self._snapshot, self._patch = snapshot, patch
        self._in_force = self._build(effective, base)
        self._pending = ShadowChange(effective)
        self._applied_ids.remember(request_id, wall_time_s)
        return None

    def reload(self, file_rules: RulesConfig | None) -> InForce | None:
        """The file's new ``rules_shadow`` (SIGHUP) under the shadow overrides, which still win; the shadow rules
        then in force (None: no shadow set). Without ``rules_shadow`` any more, the overrides go on top of the
        live rules in force now (kept in the override file, as a run-time shadow set is). Raises ValueError (a
        class the model lacks) if the new set does not fit; nothing changes then.
        """
        with self._lock:
            if file_rules is None and not self._patch:
                base, snapshot, effective = None, None, None
            else:
                if file_rules is not None:
                    base, snapshot = file_rules, None
                else:
                    base = self._snapshot if self._snapshot is not None else self._live()
                    snapshot = base
                effective = merge_rules(base, self._patch)
                check_classes(effective, self._class_names)
            before = None if self._in_force is None else self._in_force.rules
            if snapshot is not None and self._snapshot is None:
                saved = {"live": snapshot.model_dump(mode="json"), "patch": self._patch}
                if self._file.save_or_refuse(saved) is not None:  # logged; the set runs on in memory
                    log.warning("after a restart the shadow overrides go on top of the live rules of then")
            self._file_rules, self._snapshot = file_rules, snapshot
            self._in_force = None if base is None or effective is None else self._build(effective, base)
            if effective != before:
                self._pending = ShadowChange(effective)
            return self._in_force

    def reset(self, request_id: str | None, wall_time_s: float) -> Outcome:
        """Drop the shadow overrides (and their file): the file's ``rules_shadow`` again, or no shadow set."""
        with self._lock:
            refused = self._applied_ids.refusal(request_id) or self._file.remove_or_refuse()
            if refused is not None:
                return refused
            self._snapshot, self._patch = None, {}
            base = self._file_rules
            self._in_force = None if base is None else self._build(base, base)
            self._pending = ShadowChange(base)
            self._applied_ids.remember(request_id, wall_time_s)
            outcome = Outcome(self._in_force)
        log.info("shadow rules overrides dropped over MQTT", request_id=request_id, shadow_rules_left=base is not None)
        return outcome


def _live_or_remote(remote: bool) -> RuleSource:
    return "remote" if remote else "live"
