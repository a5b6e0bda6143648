"""Prometheus metrics: one explicit registry per process, nothing global, nothing at import.

Names follow Prometheus conventions (``chert_relay_`` prefix, ``_total``, ``_seconds``,
base units); labels are low-cardinality only: tenant, sink, source, outcome, reason —
never event ids. Values that belong to Redis (queue depth, dead letters) are read at
scrape time by collectors registered by the roles that own them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder, generate_latest
from prometheus_client.registry import Collector

from relay import __version__
from relay.config import Config

if TYPE_CHECKING:
    import redis

PREFIX = "chert_relay"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Acknowledgement latency is tens of milliseconds; deliveries and lags are longer.
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SLOW_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# Label values whose children are created at zero (see Metrics.prepare_*).
WEBHOOK_OUTCOMES = ("accepted", "duplicate", "rejected", "unavailable")
WATCHED_REJECTIONS = (
    "missing_signature",
    "malformed_signature",
    "stale_timestamp",
    "future_timestamp",
    "bad_signature",
    "redis_unavailable",
)
POLL_CONFIG_MODES = ("off", "fallback", "always", "sse")
POLL_WINDOW_OUTCOMES = (
    "ok",
    "api_error",
    "auth_error",
    "broken_chain",
    "upstream_error",
    "redis_unavailable",
)
DEAD_LETTER_CLASSES = ("rejected", "exhausted", "gone")


class Metrics:
    """Every metric the relay exports, on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call] # the _created series only add noise here
        r = self.registry = registry or CollectorRegistry(auto_describe=True)
        self._poll_tenants: set[str] = set()
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
        self.webhook_timestamp_age = Gauge(
            f"{p}_webhook_timestamp_age_seconds",
            "How old the signed timestamp of the tenant's last signed webhook was on "
            "arrival, by this machine's clock (accepted or refused as stale/future): a few "
            "seconds normally; a steady drift toward signature_tolerance means the clocks "
            "disagree, and past it every webhook is refused (401).",
            ["tenant"],
            registry=r,
        )
        self.webhook_seconds = Histogram(
            f"{p}_webhook_ack_seconds",
            "Time from a webhook request's arrival to its answer.",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        # chert_relay_last_webhook_timestamp_seconds is read from Redis at scrape time
        # (relay.upstream.collector): every relay process on the Redis shares it.
        self.receiver_connections = Gauge(
            f"{p}_receiver_connections",
            "Connections open to the webhook receiver.",
            registry=r,
        )
        self.receiver_connection_limit = Counter(
            f"{p}_receiver_connection_limit_total",
            "New connections to the webhook receiver at server.max_connections, by what "
            "happened: refused (503, every open one busy), idle_closed (the longest-idle "
            "one was closed to make room) or slow_closed (the longest-stalled sender was).",
            ["action"],
            registry=r,
        )
        # --- ingest ---------------------------------------------------------------
        self.events_ingested = Counter(
            f"{p}_events_ingested_total",
            "Events offered to ingest, by source and outcome (new or duplicate).",
            ["tenant", "source", "outcome"],
            registry=r,
        )
        self.events_filtered = Counter(
            f"{p}_events_filtered_total",
            "New events a sink's filter kept from it (decided at ingest), by sink.",
            ["tenant", "sink"],
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
        # --- poller (Chert events API, SSE, lease) ------------------------------------
        self.poll_mode = Gauge(
            f"{p}_poll_mode",
            "1 for the poller's current mode per tenant (reconcile, fast, always, sse, "
            "standby while another relay holds the lease), 0 for the others.",
            ["tenant", "mode"],
            registry=r,
        )
        self.poll_configured = Gauge(
            f"{p}_poll_configured",
            "1 for each tenant's configured poll.mode (off, fallback, always, sse), 0 for the "
            "others; exported by every process that runs the poller.",
            ["tenant", "mode"],
            registry=r,
        )
        self.poll_requests = Counter(
            f"{p}_poll_requests_total",
            "Calls to Chert's events API by outcome (ok, rate_limited, auth, error, unreachable).",
            ["tenant", "outcome"],
            registry=r,
        )
        self.poll_rows = Counter(
            f"{p}_poll_rows_total",
            "Event rows read from Chert, by source (poll, sse, backfill).",
            ["tenant", "source"],
            registry=r,
        )
        self.poll_rows_skipped = Counter(
            f"{p}_poll_rows_skipped_total",
            "Event rows from Chert that are not events the relay can take (logged).",
            ["tenant", "source"],
            registry=r,
        )
        self.poll_windows = Counter(
            f"{p}_poll_windows_total",
            "Poll windows by outcome: ok (read to the end, watermark advanced), api_error, "
            "auth_error, broken_chain (Chert's cursors repeated: watermark kept, the window "
            "repeats), upstream_error (Chert unreachable), redis_unavailable.",
            ["tenant", "outcome"],
            registry=r,
        )
        self.poll_watermark_age = Gauge(
            f"{p}_poll_watermark_age_seconds",
            "Age of the poller's watermark (newest created_at ingested) after each window of "
            "this process; chert_relay_poll_watermark_timestamp_seconds is the shared value.",
            ["tenant"],
            registry=r,
        )
        self.poll_lease_held = Gauge(
            f"{p}_poll_lease_held",
            "1 while this process holds the tenant's poll lease.",
            ["tenant"],
            registry=r,
        )
        self.sse_connections = Counter(
            f"{p}_sse_connections_total",
            "SSE stream connections opened to Chert.",
            ["tenant"],
            registry=r,
        )
        self.sse_reconnects = Counter(
            f"{p}_sse_reconnects_total",
            "SSE stream ends by reason (close, eof, idle, error, short: ended at once with "
            "nothing delivered, retried with backoff).",
            ["tenant", "reason"],
            registry=r,
        )
        self.chert_api_errors = Counter(
            f"{p}_chert_api_errors_total",
            "Error answers from Chert's API by Chert error code (0: no error envelope, "
            "other: not a four-digit code).",
            ["tenant", "code"],
            registry=r,
        )
        self.ingest_unacked = Counter(
            f"{p}_ingest_unacked_total",
            "Events answered 503 because fewer replicas than redis.min_replica_acks "
            "acknowledged them in time.",
            registry=r,
        )
        self.redis_primary_changes = Counter(
            f"{p}_redis_primary_changes_total",
            "Times this process saw the sentinels name a new Redis primary (a failover).",
            registry=r,
        )
        # --- delivery (relay.delivery: the worker) ------------------------------------
        # Queue depth, stored dead letters and breaker states live in Redis: the worker
        # registers a collector that reads them at scrape time.
        self.deliveries = Counter(
            f"{p}_deliveries_total",
            "Deliveries by outcome (delivered, retried, rejected, exhausted, expired, gone, "
            "missing) "
            "and status class (2xx, 3xx, 4xx, 5xx, timeout, connection, none).",
            ["tenant", "sink", "outcome", "class"],
            registry=r,
        )
        self.delivery_deferrals = Counter(
            f"{p}_delivery_deferrals_total",
            "Due deliveries put back in the queue for later without an HTTP call, by reason "
            "(not_due, unknown_sink: a sink this worker does not know yet).",
            ["tenant", "sink", "reason"],
            registry=r,
        )
        self.delivery_waits = Counter(
            f"{p}_delivery_waits_total",
            "Deliveries set aside until their sink can take them, once per wait, by reason "
            "(busy: the sink's concurrency cap; breaker_open, half_open: its breaker; "
            "paused: an operator paused the sink; rate: put off to its turn of the "
            "sink's rate).",
            ["tenant", "sink", "reason"],
            registry=r,
        )
        self.delivery_attempt_seconds = Histogram(
            f"{p}_delivery_attempt_seconds",
            "Duration of one HTTP attempt to a sink, whatever its outcome.",
            ["tenant", "sink"],
            buckets=SLOW_BUCKETS,
            registry=r,
        )
        self.delivery_e2e_seconds = Histogram(
            f"{p}_delivery_e2e_seconds",
            "Chert's event timestamp to the sink's 2xx.",
            ["tenant", "sink"],
            buckets=SLOW_BUCKETS,
            registry=r,
        )
        self.delivery_relay_seconds = Histogram(
            f"{p}_delivery_relay_seconds",
            "Ingest (the event stored by the relay) to the sink's 2xx.",
            ["tenant", "sink"],
            buckets=SLOW_BUCKETS,
            registry=r,
        )
        self.delivery_stale_finishes = Counter(
            f"{p}_delivery_stale_finishes_total",
            "Delivery outcomes not recorded because the run had lost its hold on the "
            "delivery (its worker was paused or its loop blocked past the hold) and "
            "another run had taken it over: the sink may have got the event twice.",
            ["tenant", "sink"],
            registry=r,
        )
        self.dead_lettered = Counter(
            f"{p}_dead_lettered_total",
            "Deliveries turned into dead letters by this process, by class "
            "(rejected, exhausted, gone).",
            ["tenant", "sink", "class"],
            registry=r,
        )
        self.deliveries_running = Gauge(
            f"{p}_deliveries_running", "Delivery jobs running in this process.", registry=r
        )
        # --- admin listener -----------------------------------------------------------
        self.admin_refusals = Counter(
            f"{p}_admin_refusals_total",
            "Admin requests refused, by reason (unauthorized, admin_api_disabled, "
            "forbidden_scope, forbidden_tenant, csrf, login_failed, bad_request).",
            ["reason"],
            registry=r,
        )
        # --- process ------------------------------------------------------------------
        self.redis_up = Gauge(f"{p}_redis_up", "1 when the last Redis check succeeded.", registry=r)
        self.draining = Gauge(f"{p}_draining", "1 while the process is shutting down.", registry=r)
        self.clock_offset = Gauge(
            f"{p}_clock_offset_seconds",
            "Redis' clock minus this machine's clock, as last measured (the relay takes "
            "shared times from Redis; warned about past 1 s).",
            registry=r,
        )

    # --- children that exist before their first event --------------------------------
    # increase() and rate() miss a counter's first increment when its series appears
    # with it; the children alerts use are created at zero at start-up and on reload.

    def prepare_receiver(self, config: Config) -> None:
        for t in config.tenants:
            for outcome in WEBHOOK_OUTCOMES:
                self.webhooks.labels(t.slug, outcome)
            for reason in WATCHED_REJECTIONS:
                self.webhook_rejections.labels(t.slug, reason)
            for outcome in ("new", "duplicate"):
                self.events_ingested.labels(t.slug, "webhook", outcome)

    def prepare_poller(self, config: Config) -> None:
        for t in config.tenants:
            for mode in POLL_CONFIG_MODES:
                self.poll_configured.labels(t.slug, mode).set(1 if mode == t.poll.mode else 0)
            if t.poll.mode == "off":
                continue
            for outcome in POLL_WINDOW_OUTCOMES:
                self.poll_windows.labels(t.slug, outcome)
            for outcome in ("new", "duplicate"):
                self.events_ingested.labels(t.slug, "poll", outcome)
        configured = {t.slug for t in config.tenants}
        for slug in self._poll_tenants - configured:  # a tenant removed on reload
            for mode in POLL_CONFIG_MODES:
                self.poll_configured.remove(slug, mode)
        self._poll_tenants = configured

    def prepare_worker(self, config: Config) -> None:
        for t in config.tenants:
            for s in t.sinks:
                for outcome in ("missing", "expired"):
                    self.deliveries.labels(t.slug, s.name, outcome, "none")
                for cls in DEAD_LETTER_CLASSES:
                    self.dead_lettered.labels(t.slug, s.name, cls)
                self.delivery_stale_finishes.labels(t.slug, s.name)
                for reason in ("not_due", "unknown_sink"):
                    self.delivery_deferrals.labels(t.slug, s.name, reason)
                for reason in ("busy", "breaker_open", "half_open"):
                    self.delivery_waits.labels(t.slug, s.name, reason)
                if s.rate is not None:
                    self.delivery_waits.labels(t.slug, s.name, "rate")

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def render_for(self, accept: str) -> tuple[bytes, str]:
        """The exposition ``accept`` asks for, and its content type: OpenMetrics (which
        shows exemplars) if it names it, else the classic text (``""``: the classic)."""
        if "application/openmetrics-text" not in accept:
            return self.render(), CONTENT_TYPE
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


_TENANT_LABEL = re.compile(rb'[{,]tenant="((?:[^"\\]|\\.)*)"')


def only_tenants(exposition: bytes, tenants: frozenset[str]) -> bytes:
    """``exposition`` without the samples labelled with a tenant outside ``tenants`` (what
    a tenant-scoped token may read). Samples without a tenant label stay."""
    allowed = {t.encode() for t in tenants}
    out = []
    for line in exposition.splitlines(keepends=True):
        if not line.startswith(b"#"):
            m = _TENANT_LABEL.search(line)
            if m is not None and m.group(1) not in allowed:
                continue
        out.append(line)
    return b"".join(out)


def total(metric: Counter | Gauge, **labels: str) -> float:
    """The sum of a metric's children whose labels match ``labels`` (for status lines)."""
    out = 0.0
    for family in metric.collect():
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            if all(s.labels.get(k) == v for k, v in labels.items()):
                out += s.value
    return out


class RedisStateCollector(Collector):
    """Base of the collectors that read state from Redis at scrape time: Prometheus
    scrapes run in a thread (``relay.admin.app``), so each has a blocking client of its
    own (short timeouts), closed with it. Families are built per scrape, none declared."""

    def __init__(self, client: redis.Redis, config: Config) -> None:
        self._client = client
        self.config = config

    def close(self) -> None:
        self._client.close()
        self._client.connection_pool.disconnect()

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())
