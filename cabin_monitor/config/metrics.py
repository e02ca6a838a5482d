"""The ``metrics`` section: an optional Prometheus endpoint for fleets that scrape node exporters."""

from __future__ import annotations

from pydantic import Field

from cabin_monitor.config.base import Strict


class MetricsConfig(Strict):
    """Prometheus ``/metrics`` over HTTP (needs the ``metrics`` extra, ``prometheus-client``)."""

    enabled: bool = Field(False, description="Serve /metrics: fps, stage latency, outbox, drops, camera state.")
    host: str = Field("127.0.0.1", min_length=1, description="Address to listen on; keep it local to the vehicle.")
    port: int = Field(9464, ge=1, le=65535, description="TCP port of the endpoint.")
