"""The daemon's own answering of operators' requests, without a daemon: the rules in force plus the request table."""

from __future__ import annotations

import time
from typing import Any

from cabin_monitor.bus.payloads import ChangeCause, ConfigResultPayload, RulesStatePayload
from cabin_monitor.bus.remote import DISPATCH, RuleSets, answer, rules_state
from cabin_monitor.config import EMOTIONS_7, RulesConfig
from cabin_monitor.messages import RemoteRequest
from cabin_monitor.rules.in_force import RulesInForce
from cabin_monitor.rules.shadow import ShadowRules

MAX_PAYLOAD_BYTES = 65536


class VehicleRules:
    """Answers ``config/*`` requests exactly as the daemon's request worker does, and makes its ``rules/state``."""

    def __init__(self, base: RulesConfig) -> None:
        self.rules = RulesInForce(base, EMOTIONS_7, None)
        self.shadow = ShadowRules(None, lambda: self.rules.effective, EMOTIONS_7, None)

    def handle(self, request: RemoteRequest) -> ConfigResultPayload:
        """The ``config/result`` answer to one request (applied when it is a valid, new change, live or shadow)."""
        sets = RuleSets(self.rules, self.shadow)
        return answer(request, DISPATCH[request.action], sets, MAX_PAYLOAD_BYTES, time.time()).payload

    def state(
        self, vehicle_id: str, cause: ChangeCause, request_id: str | None = None, wall_time_s: float | None = None
    ) -> RulesStatePayload:
        """The ``rules/state`` payload for the rules in force now (and the shadow rules, where there are some)."""
        wall_time_s = time.time() if wall_time_s is None else wall_time_s
        return rules_state(
            self.rules.current(), vehicle_id, wall_time_s, cause, request_id, shadow=self.shadow.current()
        )

    @property
    def effective(self) -> RulesConfig:
        """The rules in force."""
        return self.rules.current().rules

    def overrides(self) -> dict[str, Any]:
        """Path -> remote value of every override in force."""
        return {o.path: o.remote for o in self.rules.current().overrides}
