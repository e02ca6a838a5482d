"""Rules control: the YAML rules plus operators' overrides from ``config/set``, persisted on disk.

The effective rules are the configuration file's ``rules`` section with the
accumulated override patch merged on top. A change is validated completely
(size, JSON, payload shape, every rule field, class names against the model),
then written to the override file, then swapped in; any failure leaves
everything as it was and is answered with the exact problems.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog
from pydantic import ValidationError

from cabin_monitor.bus.payloads import ConfigProblem, ConfigResultPayload, ConfigSetPayload, utc_iso
from cabin_monitor.config import RulesConfig, deep_merge, describe_errors, merge_rules
from cabin_monitor.rules import check_classes

log = structlog.get_logger("cabin_monitor.bus.remote")


class RulesControl:
    """Owns the effective rules; thread-safe (MQTT thread writes, inference thread reads)."""

    def __init__(
        self,
        base: RulesConfig,
        class_names: Sequence[str],
        override_path: Path | None,
        max_payload_bytes: int = 16384,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._lock = threading.Lock()
        self._class_names = tuple(class_names)
        self._path = override_path
        self._max_bytes = max_payload_bytes
        self._wall = wall_clock
        check_classes(base, self._class_names)
        self._base = base
        self._patch: dict[str, Any] = {}
        self._effective = base
        self._pending: RulesConfig | None = None
        self._load_overrides()

    def _load_overrides(self) -> None:
        if self._path is None or not self._path.exists():
            return
        try:
            patch = json.loads(self._path.read_text(encoding="utf-8"))
            if not isinstance(patch, dict):
                raise ValueError("the file must hold a JSON object")
            effective = merge_rules(self._base, patch)
            check_classes(effective, self._class_names)
        except (OSError, ValueError) as exc:
            # A bad override file must not keep the daemon from starting: run on the YAML rules.
            log.error("ignoring rules override file", path=str(self._path), error=str(exc))
            return
        self._patch = patch
        self._effective = effective
        log.info("rules overrides loaded", path=str(self._path), overrides=patch)

    @property
    def effective(self) -> RulesConfig:
        """The rules in force."""
        with self._lock:
            return self._effective

    def take_pending(self) -> RulesConfig | None:
        """Rules changed since the last call, for the inference thread to apply between frames."""
        with self._lock:
            pending, self._pending = self._pending, None
            return pending

    def reload_base(self, base: RulesConfig) -> RulesConfig:
        """New YAML rules (SIGHUP); overrides stay on top. Raises ValueError if they do not fit."""
        with self._lock:
            effective = merge_rules(base, self._patch)
            check_classes(effective, self._class_names)
            self._base = base
            self._effective = effective
            self._pending = effective
            return effective

    def handle_set(self, payload: bytes) -> ConfigResultPayload:
        """Validate, persist and apply one ``config/set`` message; the answer for ``config/result``."""
        return answer_config_set(payload, self._max_bytes, self._apply, self._wall())

    def _apply(self, request: ConfigSetPayload, now: float) -> ConfigResultPayload:
        with self._lock:
            patch = deep_merge(self._patch, request.rules)
            try:
                effective = merge_rules(self._base, patch)
            except ValidationError as exc:
                return refusal(describe_errors(exc), now, request.request_id, prefix="rules.")
            try:
                check_classes(effective, self._class_names)
            except ValueError as exc:
                return refusal([f"rules: {exc}"], now, request.request_id)
            try:
                self._persist(patch)
            except OSError as exc:
                log.error("cannot persist rules override", path=str(self._path), error=str(exc))
                return refusal([f"(state): cannot save the override file: {exc}"], now, request.request_id)
            self._patch = patch
            self._effective = effective
            self._pending = effective
        log.info("rules changed over MQTT", request_id=request.request_id, change=request.rules)
        return ConfigResultPayload(
            ts=utc_iso(now), request_id=request.request_id, ok=True, rules=effective.model_dump(mode="json")
        )

    def _persist(self, patch: dict[str, Any]) -> None:
        if self._path is None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_name(self._path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # owner-only whatever the umask
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(patch, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path)


def answer_config_set(
    payload: bytes,
    max_payload_bytes: int,
    apply: Callable[[ConfigSetPayload, float], ConfigResultPayload],
    wall_time_s: float,
) -> ConfigResultPayload:
    """The answer to one ``config/set`` payload, the only place a request is checked.

    Too large, not JSON, not an object, or not a ``ConfigSetPayload``: refused with the problem.
    Otherwise ``apply`` answers; if it raises, the answer says so, since the operator waits for one.
    """
    if len(payload) > max_payload_bytes:
        log.warning("config/set refused: payload too large", size_bytes=len(payload), limit_bytes=max_payload_bytes)
        return ConfigResultPayload.failure(
            f"payload is {len(payload)} bytes; at most {max_payload_bytes} are accepted", wall_time_s=wall_time_s
        )
    try:
        document = json.loads(payload.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError too
        log.warning("config/set refused: not JSON", error=str(exc))
        return ConfigResultPayload.failure(f"payload is not JSON: {exc}", wall_time_s=wall_time_s)
    if not isinstance(document, dict):
        log.warning("config/set refused: not a JSON object")
        return ConfigResultPayload.failure("payload must be a JSON object", wall_time_s=wall_time_s)
    request_id = document.get("request_id")
    request_id = request_id if isinstance(request_id, str) and len(request_id) <= 128 else None
    try:
        request = ConfigSetPayload.model_validate(document)
    except ValidationError as exc:
        return refusal(describe_errors(exc), wall_time_s, request_id)
    try:
        return apply(request, wall_time_s)
    except Exception as exc:
        log.exception("config/set handler failed", request_id=request_id)
        return ConfigResultPayload.failure(
            f"the change could not be applied: {type(exc).__name__}: {exc}",
            wall_time_s=wall_time_s,
            request_id=request_id,
        )


def refusal(problems: list[str], wall_time_s: float, request_id: str | None, prefix: str = "") -> ConfigResultPayload:
    """A refused request's answer, one error per ``path: message`` line (``describe_errors`` style)."""
    errors = []
    for line in problems:
        path, _, message = line.partition(": ")
        errors.append(ConfigProblem(path=prefix + path.split(" (line")[0], message=message or line))
    log.warning("config/set refused", request_id=request_id, errors=[e.model_dump() for e in errors])
    return ConfigResultPayload(ts=utc_iso(wall_time_s), request_id=request_id, ok=False, errors=errors)
