"""Rules control: the YAML rules plus operators' overrides, persisted on disk, and the worker that
answers operators' requests (``config/set``, ``config/get``, ``config/reset``) off the broker connection.

Precedence (``PRECEDENCE``): the effective rules are the configuration file's ``rules`` section with
the accumulated override patch merged on top. Overrides win over the file, also after a SIGHUP
reload and after restarts, until ``config/reset`` drops them; the SIGHUP log line, every answer and
the retained ``rules/state`` topic name each value an override still sets, and say of every value
whether it is ``remote``, set by a ``CABIN_MONITOR__RULES__…`` variable (``environment``), by the
configuration file (``file``) or left at its ``default``.

A change is validated completely (size, JSON, payload shape, every rule field, class names against
the model), then written to the override file, then swapped in; any failure leaves everything as it
was and is answered with the exact problems. Retained requests are never applied (the broker would
replay them on every reconnect), and a change is applied at most once per ``request_id``.

The broker's network thread only hands requests to ``RemoteRequests.offer`` (a bounded queue); one
worker thread answers them, at most ``max_requests_per_s``, so a flood of requests never holds up
the acknowledgements of events.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import structlog
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError
from structlog.typing import FilteringBoundLogger

from cabin_monitor.bus.payloads import (
    PRECEDENCE,
    ChangeCause,
    ConfigAction,
    ConfigProblem,
    ConfigRequestPayload,
    ConfigResultPayload,
    ConfigSetPayload,
    RuleOverride,
    RuleSource,
    RulesStatePayload,
    utc_iso,
)
from cabin_monitor.config import (
    RemoteConfigConfig,
    RulesConfig,
    deep_merge,
    describe_errors,
    merge_rules,
    paths_set,
)
from cabin_monitor.messages import RemoteRequest, RemoteStats
from cabin_monitor.rules import check_classes

log = structlog.get_logger("cabin_monitor.bus.remote")

MAX_REQUEST_ID_CHARS = 128
WAKE_S = 0.5  # the worker looks at the stop flag at least this often
OVERLOAD_LOG_EVERY_S = 10.0  # busy and dropped requests are logged as totals, not one line each
P = TypeVar("P", bound=BaseModel)


# ----- small pure helpers -----


def escape_text(text: str) -> str:
    """``text`` with anything UTF-8 cannot carry (lone surrogates such as ``\\ud800``) written as an escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _escape_strings(value: Any) -> Any:
    if isinstance(value, str):
        return escape_text(value)
    if isinstance(value, dict):
        return {escape_text(str(k)): _escape_strings(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_escape_strings(v) for v in value]
    return value


def encode_payload(payload: BaseModel) -> bytes:
    """The payload's JSON bytes; text UTF-8 cannot carry is escaped rather than failing the answer."""
    try:
        return payload.model_dump_json().encode()
    except PydanticSerializationError:
        return json.dumps(_escape_strings(payload.model_dump(mode="python")), ensure_ascii=False).encode()


def peek_request_id(payload: bytes) -> str | None:
    """The ``request_id`` of a request, if it has a usable one, without checking anything else."""
    try:
        document = json.loads(payload.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    request_id = document.get("request_id") if isinstance(document, dict) else None
    if not isinstance(request_id, str) or len(request_id) > MAX_REQUEST_ID_CHARS:
        return None
    return escape_text(request_id)


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
    effective: RulesConfig, patch: Mapping[str, Any], base: RulesConfig, from_environment: Collection[str] = ()
) -> dict[str, RuleSource]:
    """Dotted path of every rule value -> ``remote`` where the override patch sets it, ``environment`` where
    a path in ``from_environment`` (a value or a whole section) sets it, ``file`` where the rest of the
    configuration ``base`` sets it, else ``default``."""
    remote = set(flatten(patch))
    configured = paths_set(base)

    def source(path: str) -> RuleSource:
        if path in remote:
            return "remote"
        if any(p == "" or path == p or path.startswith(p + ".") for p in from_environment):
            return "environment"
        return "file" if path in configured else "default"

    return {path: source(path) for path in flatten(effective.model_dump(mode="json"))}


def rule_overrides(base: RulesConfig, patch: Mapping[str, Any]) -> list[RuleOverride]:
    """Every value the override patch sets, with the file's value that it hides."""
    file_values = flatten(base.model_dump(mode="json"))
    return [RuleOverride(path=p, remote=v, file=file_values.get(p)) for p, v in sorted(flatten(patch).items())]


def describe_overrides(overrides: Sequence[RuleOverride]) -> str:
    """``stress.sustain_s (file 3.0, remote 7.0), ...`` for a log line; ``none`` when empty."""
    return ", ".join(f"{o.path} (file {o.file!r}, remote {o.remote!r})" for o in overrides) or "none"


class TokenBucket:
    """A rate limit: ``take`` allows ``burst`` at once and ``rate_per_s`` on average after that."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last_s: float | None = None

    def take(self, now_s: float) -> bool:
        """Whether one more request may go now (and count it)."""
        if self._last_s is not None:
            self._tokens = min(self._burst, self._tokens + (now_s - self._last_s) * self._rate)
        self._last_s = now_s
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


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


# ----- checking one request -----


def refusal(
    problems: list[str],
    wall_time_s: float,
    request_id: str | None,
    prefix: str = "",
    action: ConfigAction = "set",
) -> ConfigResultPayload:
    """A refused request's answer, one error per ``path: message`` line (``describe_errors`` style)."""
    errors = []
    for line in problems:
        path, _, message = line.partition(": ")
        path = escape_text(prefix + path.split(" (line")[0])
        errors.append(ConfigProblem(path=path, message=escape_text(message or line)))
    log.warning(f"config/{action} refused", request_id=request_id, errors=[e.model_dump() for e in errors])
    return ConfigResultPayload(ts=utc_iso(wall_time_s), action=action, request_id=request_id, ok=False, errors=errors)


def _answer(
    action: ConfigAction,
    model: type[P],
    payload: bytes,
    max_payload_bytes: int,
    apply: Callable[[P, float], ConfigResultPayload],
    wall_time_s: float,
) -> ConfigResultPayload:
    """The answer to one request payload, the only place a request is checked.

    Too large, not JSON, not an object, a ``request_id`` that is not text UTF-8 can carry, or not a
    ``model``: refused with the problem. Otherwise ``apply`` answers; if it raises, the answer says
    so, since the operator waits for one.
    """

    def failure(message: str, request_id: str | None = None, path: str = "(payload)") -> ConfigResultPayload:
        return ConfigResultPayload.failure(
            message, wall_time_s=wall_time_s, request_id=request_id, path=path, action=action
        )

    if len(payload) > max_payload_bytes:
        log.warning(
            f"config/{action} refused: payload too large", size_bytes=len(payload), limit_bytes=max_payload_bytes
        )
        return failure(f"payload is {len(payload)} bytes; at most {max_payload_bytes} are accepted")
    try:
        document = json.loads(payload.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError too
        log.warning(f"config/{action} refused: not JSON", error=str(exc))
        return failure(f"payload is not JSON: {escape_text(str(exc))}")
    if not isinstance(document, dict):
        log.warning(f"config/{action} refused: not a JSON object")
        return failure("payload must be a JSON object")
    request_id = document.get("request_id")
    request_id = request_id if isinstance(request_id, str) and len(request_id) <= MAX_REQUEST_ID_CHARS else None
    if request_id is not None and escape_text(request_id) != request_id:
        # E.g. JSON "\ud800": Python reads it, but no answer could carry it. Echo it escaped.
        escaped = escape_text(request_id)
        log.warning(f"config/{action} refused: request_id is not valid Unicode", request_id=escaped)
        return failure(
            "not valid Unicode text (it holds a lone surrogate); echoed here with escapes, nothing applied",
            request_id=escaped,
            path="request_id",
        )
    try:
        request = model.model_validate(document)
    except ValidationError as exc:
        return refusal(describe_errors(exc), wall_time_s, request_id, action=action)
    try:
        return apply(request, wall_time_s)
    except Exception as exc:
        log.exception(f"config/{action} handler failed", request_id=request_id)
        return failure(f"the change could not be applied: {type(exc).__name__}: {exc}", request_id=request_id)


def answer_config_set(
    payload: bytes,
    max_payload_bytes: int,
    apply: Callable[[ConfigSetPayload, float], ConfigResultPayload],
    wall_time_s: float,
) -> ConfigResultPayload:
    """The answer to one ``config/set`` payload (see ``_answer``)."""
    return _answer("set", ConfigSetPayload, payload, max_payload_bytes, apply, wall_time_s)


# ----- the rules in force -----


class RulesControl:
    """Owns the effective rules; thread-safe (the remote worker and SIGHUP write, the inference thread reads).

    ``environment_paths`` are the rule paths the process's ``CABIN_MONITOR__RULES__…`` variables set
    (``rule_paths_from_environment``), reported as ``environment`` rather than ``file``.
    """

    def __init__(
        self,
        base: RulesConfig,
        class_names: Sequence[str],
        override_path: Path | None,
        max_payload_bytes: int = 16384,
        wall_clock: Callable[[], float] = time.time,
        remembered_request_ids: int = 1024,
        environment_paths: Collection[str] = (),
    ) -> None:
        self._lock = threading.Lock()
        self._environment_paths = frozenset(environment_paths)
        self._class_names = tuple(class_names)
        self._path = override_path
        self._max_bytes = max_payload_bytes
        self._wall = wall_clock
        check_classes(base, self._class_names)
        self._base = base
        self._patch: dict[str, Any] = {}
        self._effective = base
        self._pending: RulesConfig | None = None
        self._applied_ids = RecentIds(remembered_request_ids)
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
        overrides = rule_overrides(self._base, patch)
        log.info(
            "rules overrides loaded",
            path=str(self._path),
            remote_overrides_win=describe_overrides(overrides),
            precedence=PRECEDENCE,
        )

    @property
    def effective(self) -> RulesConfig:
        """The rules in force."""
        with self._lock:
            return self._effective

    def overrides(self) -> list[RuleOverride]:
        """Every value the remote overrides set now, with the file's value underneath."""
        with self._lock:
            return rule_overrides(self._base, self._patch)

    def take_pending(self) -> RulesConfig | None:
        """Rules changed since the last call, for the inference thread to apply between frames."""
        with self._lock:
            pending, self._pending = self._pending, None
            return pending

    def state(self, vehicle_id: str, cause: ChangeCause, request_id: str | None = None) -> RulesStatePayload:
        """The ``rules/state`` payload: the rules in force, where each value came from, the last change."""
        with self._lock:
            base, patch, effective = self._base, self._patch, self._effective
        return RulesStatePayload(
            vehicle_id=vehicle_id,
            ts=utc_iso(self._wall()),
            cause=cause,
            request_id=request_id,
            rules=effective.model_dump(mode="json"),
            sources=rule_sources(effective, patch, base, self._environment_paths),
            overrides=rule_overrides(base, patch),
        )

    def reload_base(self, base: RulesConfig) -> list[RuleOverride]:
        """New YAML rules (SIGHUP) under the overrides, which still win; returns the values they set.

        Raises ValueError (a pydantic ValidationError, or a class the model lacks) if they do not fit.
        """
        with self._lock:
            effective = merge_rules(base, self._patch)
            check_classes(effective, self._class_names)
            self._base = base
            self._effective = effective
            self._pending = effective
            return rule_overrides(base, self._patch)

    # -- requests --

    def handle(self, request: RemoteRequest) -> ConfigResultPayload:
        """The answer to one operator request; applies it if it is a valid, new, live change."""
        now = self._wall()
        if request.retained:
            request_id = peek_request_id(request.payload)
            log.warning(f"config/{request.action} refused: retained", request_id=request_id)
            return ConfigResultPayload.failure(
                f"a retained config/{request.action} message is never applied: the broker would replay it on "
                "every reconnect, undoing later changes. Publish requests without the retain flag, and clear "
                f"this one with an empty retained message on config/{request.action}",
                wall_time_s=now,
                request_id=request_id,
                path="(retained)",
                action=request.action,
            )
        if request.action == "set":
            return answer_config_set(request.payload, self._max_bytes, self._apply, now)
        if request.action == "get":
            return _answer("get", ConfigRequestPayload, request.payload, self._max_bytes, self._get, now)
        return _answer("reset", ConfigRequestPayload, request.payload, self._max_bytes, self._reset, now)

    def handle_set(self, payload: bytes) -> ConfigResultPayload:
        """Validate, persist and apply one live ``config/set`` message; the answer for ``config/result``."""
        return self.handle(RemoteRequest("set", payload, retained=False, received_s=time.monotonic()))

    def _success(self, action: ConfigAction, request_id: str | None, now: float) -> ConfigResultPayload:
        # Called with the lock held.
        return ConfigResultPayload(
            ts=utc_iso(now),
            action=action,
            request_id=request_id,
            ok=True,
            rules=self._effective.model_dump(mode="json"),
            sources=rule_sources(self._effective, self._patch, self._base, self._environment_paths),
            overrides=rule_overrides(self._base, self._patch),
        )

    def _already_applied(self, action: ConfigAction, request_id: str | None, now: float) -> ConfigResultPayload | None:
        # Called with the lock held. QoS 1 may deliver a request twice, an operator may re-send one.
        seen = None if request_id is None else self._applied_ids.get(request_id)
        if seen is None:
            return None
        return refusal(
            [f"request_id: already applied at {utc_iso(seen)}; a change is applied at most once per request_id"],
            now,
            request_id,
            action=action,
        )

    def _apply(self, request: ConfigSetPayload, now: float) -> ConfigResultPayload:
        with self._lock:
            repeated = self._already_applied("set", request.request_id, now)
            if repeated is not None:
                return repeated
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
            if request.request_id is not None:
                self._applied_ids.add(request.request_id, now)
            answer = self._success("set", request.request_id, now)
        log.info("rules changed over MQTT", request_id=request.request_id, change=request.rules)
        return answer

    def _get(self, request: ConfigRequestPayload, now: float) -> ConfigResultPayload:
        with self._lock:
            return self._success("get", request.request_id, now)

    def _reset(self, request: ConfigRequestPayload, now: float) -> ConfigResultPayload:
        with self._lock:
            repeated = self._already_applied("reset", request.request_id, now)
            if repeated is not None:
                return repeated
            dropped = rule_overrides(self._base, self._patch)
            try:
                self._remove_persisted()
            except OSError as exc:
                log.error("cannot remove the rules override file", path=str(self._path), error=str(exc))
                return refusal(
                    [f"(state): cannot remove the override file: {exc}"], now, request.request_id, action="reset"
                )
            self._patch = {}
            if self._effective != self._base:
                self._pending = self._base
            self._effective = self._base
            if request.request_id is not None:
                self._applied_ids.add(request.request_id, now)
            answer = self._success("reset", request.request_id, now)
        log.info(
            "rules overrides dropped over MQTT; the configuration file's rules apply",
            request_id=request.request_id,
            dropped=describe_overrides(dropped),
        )
        return answer

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

    def _remove_persisted(self) -> None:
        if self._path is None:
            return
        try:
            self._path.unlink()
        except FileNotFoundError:
            return
        # The removal itself must survive a power cut, or the old overrides come back at the next start.
        fd = os.open(self._path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----- the worker -----


class RemoteOutlet(Protocol):
    """Where answers and the rules state go (the broker connection)."""

    def publish_config_result(self, payload: bytes) -> None:
        """Send an answer on ``config/result`` (QoS 1, not retained)."""

    def publish_rules_state(self, payload: bytes) -> None:
        """Send the retained ``rules/state`` now and again after every reconnect."""


class RemoteRequests:
    """Operators' requests: a bounded queue filled by the broker's network thread, one worker answering.

    ``offer`` never blocks and never does work: the network thread goes straight back to reading
    the broker's acknowledgements of events. The worker answers each request in order: "busy" over
    the rate limit (not applied; the operator sends it again later), otherwise as ``RulesControl``
    decides; after each change it publishes ``rules/state``. A request that finds the queue full is
    dropped without an answer, counted in ``stats`` (the health topic) and logged.
    """

    def __init__(
        self,
        control: RulesControl,
        settings: RemoteConfigConfig,
        vehicle_id: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        logger: FilteringBoundLogger | None = None,
    ) -> None:
        self.control = control
        self._wall = wall_clock
        self._settings = settings
        self._vehicle_id = vehicle_id
        self._clock = clock
        self._log: FilteringBoundLogger = logger or log
        self._queue: queue.Queue[RemoteRequest] = queue.Queue(settings.queue_size)
        self._bucket = TokenBucket(settings.max_requests_per_s, settings.burst_requests)
        self._outlet: RemoteOutlet | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._counts_lock = threading.Lock()
        self._received = self._answered = self._busy = self._dropped = 0
        self._logged_overload = (0, 0)
        self._next_overload_log_s = 0.0

    def attach(self, outlet: RemoteOutlet) -> None:
        """Where answers and ``rules/state`` go; set once, before ``start``."""
        self._outlet = outlet

    # -- the network thread's side --

    def offer(self, request: RemoteRequest) -> None:
        """Queue a request for the worker, or count it as dropped if the queue is full. Never blocks."""
        try:
            self._queue.put_nowait(request)
            dropped = False
        except queue.Full:
            dropped = True
        with self._counts_lock:
            self._received += 1
            self._dropped += dropped

    # -- running --

    def start(self) -> None:
        """Publish the rules state as at start-up and start the worker thread."""
        if self._thread is not None:
            raise RuntimeError("RemoteRequests already started")
        self.publish_state("start")
        self._thread = threading.Thread(target=self._run, name="remote-requests", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the worker (requests still queued stay unanswered; they are logged)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                self._log.warning("remote request worker did not stop in time", timeout_s=timeout_s)
        left = self._queue.qsize()
        if left:
            self._log.warning("stopping with operator requests unanswered", queued=left)
        self._log_overload(force=True)

    def stats(self) -> RemoteStats:
        """Counters for the health topic."""
        with self._counts_lock:
            return RemoteStats(
                received=self._received,
                answered=self._answered,
                busy=self._busy,
                dropped=self._dropped,
                queued=self._queue.qsize(),
            )

    def publish_state(self, cause: ChangeCause, request_id: str | None = None) -> None:
        """Publish ``rules/state`` (retained) for a change made by ``cause``."""
        if self._outlet is not None:
            self._outlet.publish_rules_state(encode_payload(self.control.state(self._vehicle_id, cause, request_id)))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                request = self._queue.get(timeout=WAKE_S)
            except queue.Empty:
                self._log_overload()
                continue
            try:
                self.handle(request)
            except Exception:
                # The worker must outlive any one request; the next ones still get answers.
                self._log.exception("operator request could not be answered", action=request.action)
            self._log_overload()

    def handle(self, request: RemoteRequest) -> ConfigResultPayload:
        """Answer one request (the worker's work, also callable directly); returns the answer sent."""
        if self._bucket.take(self._clock()):
            answer = self.control.handle(request)
        else:
            with self._counts_lock:
                self._busy += 1
            answer = ConfigResultPayload.failure(
                f"busy: more than {self._settings.max_requests_per_s:g} requests per second (bursts of "
                f"{self._settings.burst_requests}); this one was not applied, send it again later",
                wall_time_s=self._wall(),
                request_id=peek_request_id(request.payload),
                path="(busy)",
                action=request.action,
            )
        if self._outlet is not None:
            self._outlet.publish_config_result(encode_payload(answer))
            with self._counts_lock:
                self._answered += 1
        if answer.ok and request.action != "get":
            self.publish_state("config/set" if request.action == "set" else "config/reset", answer.request_id)
        return answer

    def _log_overload(self, force: bool = False) -> None:
        now = self._clock()
        if not force and now < self._next_overload_log_s:
            return
        with self._counts_lock:
            counts = (self._busy, self._dropped)
        if counts != self._logged_overload:
            busy_since = counts[0] - self._logged_overload[0]
            dropped_since = counts[1] - self._logged_overload[1]
            self._log.warning(
                "operator requests over the limit",
                busy=busy_since,
                dropped=dropped_since,
                busy_total=counts[0],
                dropped_total=counts[1],
                max_requests_per_s=self._settings.max_requests_per_s,
                queue_size=self._settings.queue_size,
            )
            self._logged_overload = counts
            self._next_overload_log_s = now + OVERLOAD_LOG_EVERY_S
