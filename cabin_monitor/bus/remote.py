"""Operators' requests over the broker: ``config/<action>`` in, answers on ``config/result`` and the
retained ``rules/state`` out. Transport only: what a request does to the rules is ``rules.in_force``.

``DISPATCH`` is the one table of requests, ``{action: (payload model, handler, cause, shadow handler)}``:
the broker's subscriptions (``request_topics``), the check of each payload, the handler that answers it
(the shadow handler for a request with ``"shadow": true``, which acts on the shadow rules) and the
``rules/state`` cause of a change all come from it, so a new request topic is one row (its action
named in ``messages.RemoteAction``, the one type of actions, which the type checker holds the table to).

Every request is checked here before anything is applied (size, JSON, shape, a ``request_id`` that
UTF-8 can carry, the row's payload model); retained requests are never applied (the broker would
replay them on every reconnect). The broker's network thread only hands requests to
``RequestQueue.offer`` (bounded); one worker thread (``RemoteRequests``) answers them, at most
``max_requests_per_s``, so a flood of requests never holds up the acknowledgements of events.

May import ``config``, ``messages``, ``rules`` and ``bus.payloads``; never ``runtime`` or ``vision``.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Generic, Protocol, TypeVar

import structlog
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError
from structlog.typing import FilteringBoundLogger

from cabin_monitor.bus.payloads import (
    ChangeCause,
    ConfigProblem,
    ConfigRequestPayload,
    ConfigResultPayload,
    ConfigSetPayload,
    RuleOverride,
    RulesStatePayload,
    ShadowRulesState,
    omitted_at_default,
)
from cabin_monitor.config import Problem, RemoteConfigConfig, validation_problems
from cabin_monitor.messages import RemoteAction, RemoteRequest, RemoteStats, utc_iso
from cabin_monitor.rules.in_force import InForce, Outcome, RulesInForce
from cabin_monitor.rules.shadow import ShadowRules

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
    omitted = omitted_at_default(payload)
    try:
        return payload.model_dump_json(exclude=omitted).encode()
    except PydanticSerializationError:
        document = payload.model_dump(mode="python", exclude=omitted)
        return json.dumps(_escape_strings(document), ensure_ascii=False).encode()


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's members, refusing a key given twice (the YAML loader refuses it too)."""
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise ValueError(f"the key {key!r} is given twice")
        document[key] = value
    return document


def peek_request_id(payload: bytes, max_payload_bytes: int) -> str | None:
    """The ``request_id`` of a request, if it has a usable one, without checking anything else; a payload
    over ``max_payload_bytes`` is never parsed."""
    if len(payload) > max_payload_bytes:
        return None
    try:
        document = json.loads(payload.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    request_id = document.get("request_id") if isinstance(document, dict) else None
    if not isinstance(request_id, str) or len(request_id) > MAX_REQUEST_ID_CHARS:
        return None
    return escape_text(request_id)


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


# ----- the dispatch table -----


@dataclass(frozen=True, slots=True)
class RuleSets:
    """What requests act on: the live rules in force and the shadow rules."""

    live: RulesInForce
    shadow: ShadowRules


Handler = Callable[[RuleSets, P, float], Outcome]


@dataclass(frozen=True, slots=True)
class Route(Generic[P]):
    """What one request action is: its payload model, the handler that answers it, the ``rules/state``
    cause of the change it makes (None: it changes nothing), and the handler of the same request about
    the shadow rules (``"shadow": true`` in the payload)."""

    model: type[P]
    handler: Handler[P]
    cause: ChangeCause | None
    shadow_handler: Handler[P]


def _set(rules: RuleSets, request: ConfigSetPayload, wall_time_s: float) -> Outcome:
    return rules.live.change(request.rules, request.request_id, wall_time_s)


def _get(rules: RuleSets, request: ConfigRequestPayload, wall_time_s: float) -> Outcome:
    return Outcome(rules.live.current())


def _reset(rules: RuleSets, request: ConfigRequestPayload, wall_time_s: float) -> Outcome:
    return rules.live.reset(request.request_id, wall_time_s)


def _set_shadow(rules: RuleSets, request: ConfigSetPayload, wall_time_s: float) -> Outcome:
    return rules.shadow.change(request.rules, request.request_id, wall_time_s)


def _get_shadow(rules: RuleSets, request: ConfigRequestPayload, wall_time_s: float) -> Outcome:
    return Outcome(rules.shadow.current())


def _reset_shadow(rules: RuleSets, request: ConfigRequestPayload, wall_time_s: float) -> Outcome:
    return rules.shadow.reset(request.request_id, wall_time_s)


DISPATCH: Mapping[RemoteAction, Route[Any]] = MappingProxyType(
    {
        "set": Route(ConfigSetPayload, _set, "config/set", _set_shadow),
        "get": Route(ConfigRequestPayload, _get, None, _get_shadow),
        "reset": Route(ConfigRequestPayload, _reset, "config/reset", _reset_shadow),
    }
)


def request_topics(base: str) -> dict[str, RemoteAction]:
    """The topics to subscribe to (``<base>/config/<action>``), each with its action."""
    return {f"{base}/config/{action}": action for action in DISPATCH}


# ----- answers -----


def refusal(
    problems: Sequence[Problem],
    wall_time_s: float,
    request_id: str | None,
    action: RemoteAction,
    shadow: bool = False,
) -> ConfigResultPayload:
    """A refused request's answer, one error per problem (logged)."""
    errors = [ConfigProblem(path=escape_text(p.path), message=escape_text(p.message)) for p in problems]
    log.warning(
        f"config/{action} refused", request_id=request_id, shadow=shadow, errors=[e.model_dump() for e in errors]
    )
    return ConfigResultPayload(
        ts=utc_iso(wall_time_s), action=action, request_id=request_id, ok=False, errors=errors, shadow=shadow
    )


def _overrides(in_force: InForce) -> list[RuleOverride]:
    return [RuleOverride(path=o.path, remote=o.remote, file=o.file) for o in in_force.overrides]


def accepted(
    in_force: InForce | None,
    wall_time_s: float,
    request_id: str | None,
    action: RemoteAction,
    shadow: bool = False,
) -> ConfigResultPayload:
    """An accepted request's answer: the rules in force (live, or shadow: None when there are none), their
    sources and the overrides."""
    return ConfigResultPayload(
        ts=utc_iso(wall_time_s),
        action=action,
        request_id=request_id,
        ok=True,
        rules=None if in_force is None else dict(in_force.values),
        sources=None if in_force is None else dict(in_force.sources),
        overrides=None if in_force is None else _overrides(in_force),
        shadow=shadow,
    )


def rules_state(
    in_force: InForce,
    vehicle_id: str,
    wall_time_s: float,
    cause: ChangeCause,
    request_id: str | None = None,
    shadow: InForce | None = None,
) -> RulesStatePayload:
    """The ``rules/state`` payload: the rules in force, where each value came from, what made them, and the
    shadow rules in force (None: there are none)."""
    return RulesStatePayload(
        vehicle_id=vehicle_id,
        ts=utc_iso(wall_time_s),
        cause=cause,
        request_id=request_id,
        rules=dict(in_force.values),
        sources=dict(in_force.sources),
        overrides=_overrides(in_force),
        shadow=None
        if shadow is None
        else ShadowRulesState(rules=dict(shadow.values), sources=dict(shadow.sources), overrides=_overrides(shadow)),
    )


# ----- checking one request -----


def check_request(
    action: RemoteAction,
    model: type[P],
    payload: bytes,
    max_payload_bytes: int,
    wall_time_s: float,
    size_bytes: int | None = None,
) -> P | ConfigResultPayload:
    """The request in ``payload`` as a ``model``, or the answer refusing it: the only place a request is checked.

    Too large (``size_bytes``, the size it came with, default ``len(payload)``), not JSON, not an object,
    a ``request_id`` that is not text UTF-8 can carry, or not a ``model``: refused with the problem.
    """

    def failure(message: str, request_id: str | None = None, path: str = "(payload)") -> ConfigResultPayload:
        return ConfigResultPayload.failure(
            message, wall_time_s=wall_time_s, request_id=request_id, path=path, action=action
        )

    size_bytes = len(payload) if size_bytes is None else size_bytes
    if size_bytes > max_payload_bytes:
        log.warning(f"config/{action} refused: payload too large", size_bytes=size_bytes, limit_bytes=max_payload_bytes)
        return failure(f"payload is {size_bytes} bytes; at most {max_payload_bytes} are accepted")
    try:
        document = json.loads(payload.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
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
        return model.model_validate(document)
    except ValidationError as exc:
        return refusal(validation_problems(exc), wall_time_s, request_id, action)


def _retained(request: RemoteRequest, max_payload_bytes: int, wall_time_s: float) -> ConfigResultPayload:
    request_id = peek_request_id(request.payload, max_payload_bytes)
    log.warning(f"config/{request.action} refused: retained", request_id=request_id)
    return ConfigResultPayload.failure(
        f"a retained config/{request.action} message is never applied: the broker would replay it on "
        "every reconnect, undoing later changes. Publish requests without the retain flag, and clear "
        f"this one with an empty retained message on config/{request.action}",
        wall_time_s=wall_time_s,
        request_id=request_id,
        path="(retained)",
        action=request.action,
    )


@dataclass(frozen=True, slots=True)
class Answer:
    """The answer to one request, and the live rules in force after the change it made (None: no change)."""

    payload: ConfigResultPayload
    changed: InForce | None = None


def answer(
    request: RemoteRequest, route: Route[Any], rules: RuleSets, max_payload_bytes: int, wall_time_s: float
) -> Answer:
    """The answer to one live or retained request of ``route``'s action; applies it if it is a valid, new,
    live change (to the shadow rules with ``"shadow": true``). If the handler raises, the answer says so,
    since the operator waits for one."""
    action = request.action
    if request.retained:
        return Answer(_retained(request, max_payload_bytes, wall_time_s))
    checked = check_request(action, route.model, request.payload, max_payload_bytes, wall_time_s, request.size_bytes)
    if isinstance(checked, ConfigResultPayload):
        return Answer(checked)
    request_id: str | None = getattr(checked, "request_id", None)
    shadow: bool = getattr(checked, "shadow", False)
    handler = route.shadow_handler if shadow else route.handler
    try:
        outcome = handler(rules, checked, wall_time_s)
    except Exception as exc:
        log.exception(f"config/{action} handler failed", request_id=request_id, shadow=shadow)
        message = f"the change could not be applied: {type(exc).__name__}: {exc}"
        failure = ConfigResultPayload.failure(
            message, wall_time_s=wall_time_s, request_id=request_id, action=action, shadow=shadow
        )
        return Answer(failure)
    if not outcome.ok:
        return Answer(refusal(outcome.problems, wall_time_s, request_id, action, shadow))
    # rules/state carries both sets: after a shadow change, with the live rules as they are.
    live = rules.live.current() if shadow else outcome.in_force
    changed = live if route.cause is not None else None
    return Answer(accepted(outcome.in_force, wall_time_s, request_id, action, shadow), changed)


# ----- the worker -----


class RemoteOutlet(Protocol):
    """Where answers and the rules state go (the broker connection)."""

    def publish_config_result(self, payload: bytes) -> None:
        """Send an answer on ``config/result`` (QoS 1, not retained)."""

    def publish_rules_state(self, payload: bytes) -> None:
        """Send the retained ``rules/state`` now and again after every reconnect."""


class RequestQueue:
    """The bounded hand-over from the broker's network thread to the worker; ``offer`` never blocks.

    Bounded in requests (``queue_size``) and in bytes (``queue_max_bytes``); a request over
    ``max_payload_bytes`` keeps only its size (it is refused unread). A request that finds the queue
    full is dropped without an answer, and counted.
    """

    def __init__(self, settings: RemoteConfigConfig) -> None:
        self._queue: queue.Queue[RemoteRequest] = queue.Queue(settings.queue_size)
        self._max_bytes = settings.queue_max_bytes
        self._max_payload_bytes = settings.max_payload_bytes
        self._lock = threading.Lock()
        self._received = self._dropped = self._bytes = 0

    def offer(self, request: RemoteRequest) -> None:
        """Queue a request for the worker, or count it as dropped if the queue is full. Never blocks."""
        if len(request.payload) > self._max_payload_bytes:
            request = dataclasses.replace(request, payload=b"", oversize_bytes=len(request.payload))
        size = len(request.payload)
        with self._lock:
            self._received += 1
            fits = self._bytes + size <= self._max_bytes
            if fits:
                try:
                    self._queue.put_nowait(request)
                    self._bytes += size
                except queue.Full:
                    fits = False
            self._dropped += not fits

    def get(self, timeout_s: float) -> RemoteRequest | None:
        """The next request, or None after ``timeout_s`` without one."""
        try:
            request = self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return None
        with self._lock:
            self._bytes -= len(request.payload)
        return request

    def counts(self) -> tuple[int, int, int]:
        """Requests received, dropped, and waiting now."""
        with self._lock:
            return self._received, self._dropped, self._queue.qsize()


class RemoteRequests:
    """The worker answering operators' requests from a ``RequestQueue``, one at a time, in order.

    "Busy" over the rate limit (not applied; the operator sends it again later), otherwise as the
    request's ``DISPATCH`` row and the rules in force decide; after each change it publishes
    ``rules/state``, built from the same rules in force as the answer.
    """

    def __init__(
        self,
        requests: RequestQueue,
        rules: RuleSets,
        outlet: RemoteOutlet,
        settings: RemoteConfigConfig,
        vehicle_id: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        logger: FilteringBoundLogger | None = None,
    ) -> None:
        self._requests = requests
        self._rules = rules
        self._outlet = outlet
        self._settings = settings
        self._vehicle_id = vehicle_id
        self._clock = clock
        self._wall = wall_clock
        self._log: FilteringBoundLogger = logger or log
        self._bucket = TokenBucket(settings.max_requests_per_s, settings.burst_requests)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._counts_lock = threading.Lock()
        self._answered = self._busy = 0
        self._state_lock = threading.Lock()
        self._published_generation = -1
        self._logged_overload = (0, 0)
        self._next_overload_log_s = 0.0

    # -- running --

    def start(self) -> None:
        """Publish the rules state as at start-up and start the worker thread."""
        if self._thread is not None:
            raise RuntimeError("RemoteRequests already started")
        self.publish_state("start", self._rules.live.current())
        self._thread = threading.Thread(target=self._run, name="remote-requests", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the worker (requests still queued stay unanswered; they are logged)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                self._log.warning("remote request worker did not stop in time", timeout_s=timeout_s)
        _, _, left = self._requests.counts()
        if left:
            self._log.warning("stopping with operator requests unanswered", queued=left)
        self._log_overload(force=True)

    def stats(self) -> RemoteStats:
        """Counters for the health topic."""
        received, dropped, queued = self._requests.counts()
        with self._counts_lock:
            return RemoteStats(
                received=received, answered=self._answered, busy=self._busy, dropped=dropped, queued=queued
            )

    def publish_state(self, cause: ChangeCause, in_force: InForce, request_id: str | None = None) -> None:
        """Publish ``rules/state`` (retained) for ``in_force``, made by ``cause``; never an older state over a
        newer one (SIGHUP and the worker publish from different threads); with the shadow rules as they are."""
        with self._state_lock:
            if in_force.generation < self._published_generation:
                return
            self._published_generation = in_force.generation
            shadow = self._rules.shadow.current()
            state = rules_state(in_force, self._vehicle_id, self._wall(), cause, request_id, shadow)
            self._outlet.publish_rules_state(encode_payload(state))

    def _run(self) -> None:
        while not self._stop.is_set():
            request = self._requests.get(WAKE_S)
            if request is not None:
                try:
                    self.handle(request)
                except Exception:
                    # The worker must outlive any one request; the next ones still get answers.
                    self._log.exception("operator request could not be answered", action=request.action)
            self._log_overload()

    def handle(self, request: RemoteRequest) -> ConfigResultPayload | None:
        """Answer one request (the worker's work, also callable directly); returns the answer sent, or None
        for an action the table does not have (logged, not answered)."""
        route = DISPATCH.get(request.action)
        if route is None:
            self._log.warning("operator request refused: unknown action", action=request.action)
            return None
        if self._bucket.take(self._clock()):
            result = answer(request, route, self._rules, self._settings.max_payload_bytes, self._wall())
        else:
            result = Answer(self._busy_answer(request))
        self._outlet.publish_config_result(encode_payload(result.payload))
        with self._counts_lock:
            self._answered += 1
        if result.changed is not None and route.cause is not None:
            self.publish_state(route.cause, result.changed, result.payload.request_id)
        return result.payload

    def _busy_answer(self, request: RemoteRequest) -> ConfigResultPayload:
        with self._counts_lock:
            self._busy += 1
        return ConfigResultPayload.failure(
            f"busy: more than {self._settings.max_requests_per_s:g} requests per second (bursts of "
            f"{self._settings.burst_requests}); this one was not applied, send it again later",
            wall_time_s=self._wall(),
            request_id=peek_request_id(request.payload, self._settings.max_payload_bytes),
            path="(busy)",
            action=request.action,
        )

    def _log_overload(self, force: bool = False) -> None:
        now = self._clock()
        if not force and now < self._next_overload_log_s:
            return
        _, dropped, _ = self._requests.counts()
        with self._counts_lock:
            counts = (self._busy, dropped)
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
