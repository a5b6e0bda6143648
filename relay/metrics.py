"""Prometheus metrics: one explicit registry per process, nothing global, nothing at import.

Names follow Prometheus conventions (``chert_relay_`` prefix, ``_total``, ``_seconds``,
base units); labels are low-cardinality only: tenant, sink, source, outcome, reason —
never event ids. Values that belong to Redis (queue depth, dead letters) are read at
scrape time by collectors registered by the roles that own them.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from relay import __version__

PREFIX = "chert_relay"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Acknowledgement latency is tens of milliseconds; deliveries and lags are longer.
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SLOW_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every metric the relay exports, on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call] # the _created series only add noise here
        r = self.registry = registry or CollectorRegistry(auto_describe=True)
        p = PREFIX
        Info(f"{p}_build", "Version of the running relay.", registry=r).info(
            {"version": __version__}
        )
        # --- receiver -------------------------------------------------------------
        self.webhooks = Counter(
            f"{p}_webhooks_total",
            "Webhook requests by outcome (accepted, duplicate, rejected, unavailable).",
            ["tenant", "outcome"],
            registry=r,
        )
        self.webhook_rejections = Counter(
            f"{p}_webhook_rejections_total",
            "Webhook requests refused, by reason (4xx and 503 answers).",
            ["tenant", "reason"],
            registry=r,
        )
        self.webhook_seconds = Histogram(
            f"{p}_webhook_ack_seconds",
            "Time from a webhook request's arrival to its answer.",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.last_webhook = Gauge(
            f"{p}_last_webhook_timestamp_seconds",
            "Unix time of the last verified webhook, per tenant.",
            ["tenant"],
            registry=r,
        )
        # --- ingest ---------------------------------------------------------------
        self.events_ingested = Counter(
            f"{p}_events_ingested_total",
            "Events offered to ingest, by source and outcome (new or duplicate).",
            ["tenant", "source", "outcome"],
            registry=r,
        )
        self.ingest_batch_seconds = Histogram(
            f"{p}_ingest_batch_seconds",
            "Time for one ingest batch (one Redis round trip).",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.ingest_batch_size = Histogram(
            f"{p}_ingest_batch_size",
            "Events per ingest batch.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.redis_up = Gauge(f"{p}_redis_up", "1 when the last Redis check succeeded.", registry=r)
        self.draining = Gauge(f"{p}_draining", "1 while the process is shutting down.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
