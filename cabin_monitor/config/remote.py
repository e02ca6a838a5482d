"""The ``remote_config`` section: operators' rule changes over ``config/set``, ``config/get``, ``config/reset``."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from cabin_monitor.config.base import Integer, Number, Strict


class RemoteConfigConfig(Strict):
    """The config/* topics through which operators read, change and reset the rules.

    Requests are queued off the broker connection to a worker of their own, so events are never
    held up by them: at most ``max_requests_per_s`` (in bursts of ``burst_requests``) are handled,
    the rest answered "busy"; when even the queue is full they are dropped, counted in ``health``.
    """

    enabled: bool = Field(True, description="Subscribe to config/set, config/get and config/reset.")
    max_payload_bytes: Integer = Field(16384, ge=64, le=1 << 20, description="Larger requests are refused.")
    override_path: Path | None = Field(
        None, description="Persisted overrides; default: <state_dir>/rules_override.json."
    )
    shadow_override_path: Path | None = Field(
        None, description="Persisted shadow rules set at run time; default: <state_dir>/rules_shadow_override.json."
    )
    max_requests_per_s: Number = Field(
        2.0, gt=0, le=1000, description="Requests handled per second on average; more are answered 'busy'."
    )
    burst_requests: Integer = Field(10, ge=1, le=1000, description="Requests handled at once before the rate applies.")
    queue_size: Integer = Field(
        256, ge=1, le=100_000, description="Requests waiting for the worker; beyond it they are dropped and counted."
    )
    queue_max_bytes: Integer = Field(
        1 << 20,
        ge=64,
        le=1 << 28,
        description="Bytes of requests waiting for the worker; beyond it they are dropped and counted. "
        "At least max_payload_bytes.",
    )
    remembered_request_ids: Integer = Field(
        1024, ge=1, le=1_000_000, description="Recent request_ids of applied changes: a repeat is not applied again."
    )

    @model_validator(mode="after")
    def _queue_holds_one_request(self) -> RemoteConfigConfig:
        if self.queue_max_bytes < self.max_payload_bytes:
            raise ValueError("queue_max_bytes must be >= max_payload_bytes")
        return self
