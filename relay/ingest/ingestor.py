"""Ingest: the one door into the pipeline, for every source (webhook, poll, SSE, backfill).

One Lua script does, atomically and per event: mark ``(tenant, event_id)`` seen for
the dedupe window, store the event once (:mod:`relay.store.stored_event`), enqueue one
arq job per matching sink, and write the event's record in the event log
(:mod:`relay.store.eventlog`). An event already seen writes nothing, and nothing is
marked seen unless its jobs are enqueued in the same step.

Concurrent ingests are group-committed into batches, one ``EVALSHA`` each, and the
batches are pipelined on one Redis connection (:mod:`relay.store.script_pipe`): a
batch goes out once 16 events wait, or at the next turn of the event loop with
whatever arrived, so a lone event is not held back. Under load this turns hundreds of
Redis round trips into a few, and with ``appendfsync always`` events share fsyncs.
Each event goes in as an :class:`~relay.store.wire.IngestItem`, with its tenant's
route for its type worked out once (:class:`~relay.store.wire.IngestRoute`); the wire
module encodes the batch.

A sink with a ``filter`` (:mod:`relay.config.filters`) takes only the events its filter
matches: the filters run here, once per event, on the envelope as parsed (the webhook
path parses a filtering tenant's bodies whole, once). An event a filter keeps from a
sink gets no job there; the script records the sink as filtered in the event's log
record, so a replay or a resend keeps the routing the event got, and
``events_filtered_total`` counts it once the event is new.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter
from redis.asyncio import Redis

from relay import telemetry
from relay.config import Config
from relay.config.filters import EventFilter
from relay.ingest.envelope import Event
from relay.keys import JOB_KEY_PREFIX, Keys
from relay.store import jobs, scripts, stored_event
from relay.store.script_pipe import ScriptPipeline
from relay.store.wire import IngestBatch, IngestItem, IngestJob, IngestRoute, Packed

if TYPE_CHECKING:
    from relay.metrics import Metrics

log = logging.getLogger(__name__)

SOURCES = frozenset({"webhook", "poll", "sse", "backfill", "replay"})


_MAX_VARIANTS = 256  # routes kept per type for the ways its sinks' filters can agree


@dataclass(frozen=True, slots=True)
class _Route:
    sinks: tuple[str, ...]
    jobs: IngestRoute  # what ingest.lua is told: the seen mark's lifetime, the jobs
    ordered: bool  # some sink delivers in order: the event's chat id goes along
    filters: tuple[tuple[int, EventFilter], ...] = ()  # (index in sinks, its filter)
    # the route of an event some filters keep out, by the indexes of those sinks
    variants: dict[tuple[int, ...], IngestRoute] = field(default_factory=dict)

    def without(self, out: tuple[int, ...]) -> IngestRoute:
        """The route of an event the filters of the sinks at ``out`` keep out."""
        found = self.variants.get(out)
        if found is None:
            found = IngestRoute(
                self.jobs.event_ttl_ms,
                [j for i, j in enumerate(self.jobs.jobs) if i not in out],
                [self.sinks[i] for i in out],
            )
            if len(self.variants) < _MAX_VARIANTS:
                self.variants[out] = found
        return found


def _envelope(body: bytes) -> Any:
    """An event's envelope from its body, for an event built without it (an event's body
    is JSON the relay parsed or wrote)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


class Ingestor:
    """Durably accepts events: ``await ingest(tenant, event, source)`` → new or duplicate."""

    def __init__(
        self,
        redis_client: Redis,
        config: Config,
        metrics: Metrics | None = None,
        *,
        flush_at: int = 16,
        max_batch: int = 256,
        timeout: float | None = None,
    ) -> None:
        self._counted: dict[tuple[str, str, bool], Counter] = {}
        self._filtered: dict[tuple[str, str], Counter] = {}
        self._metrics = metrics
        self._sources = {s: s.encode() for s in SOURCES}
        r = config.redis
        self._pipe: ScriptPipeline[IngestItem] = ScriptPipeline(
            redis_client,
            scripts.script("ingest").source,
            self._encode,
            timeout=config.server.ingest_timeout if timeout is None else timeout,
            flush_at=flush_at,
            max_batch=max_batch,
            observe=self._observe if metrics is not None else None,
            replicas=r.min_replica_acks,
            replica_timeout=r.replica_ack_timeout,
            unacked=metrics.ingest_unacked.inc if metrics is not None else None,
        )
        self.set_config(config)

    def set_config(self, config: Config) -> None:
        """Use a new configuration (on reload); routes are recomputed lazily."""
        self._config = config
        prefix = config.redis.key_prefix
        elog = config.event_log
        self._batch = IngestBatch(
            prefix,
            Keys(prefix).queue,
            JOB_KEY_PREFIX,
            log_cap=elog.max_memory if elog.enabled else 0,
            log_keep_ms=int(elog.retention * 1000),
        )
        self._routes: dict[tuple[str, str], _Route] = {}

    def _route(self, tenant: str, event_type: str) -> _Route:
        key = (tenant, event_type)
        route = self._routes.get(key)
        if route is None:
            t = self._config.tenant(tenant)
            if t is None:
                raise KeyError(f"unknown tenant {tenant!r}")
            sinks = [s for s in t.sinks if s.matches(event_type)]
            longest = max([s.max_age for s in sinks], default=0.0) + jobs.EXPIRY_MARGIN_S
            route = _Route(
                sinks=tuple(s.name for s in sinks),
                jobs=IngestRoute(
                    event_ttl_ms=int(max(longest, self._config.relay.dedupe_ttl) * 1000),
                    jobs=[
                        IngestJob(
                            sink=s.name,
                            ttl_ms=int((s.max_age + jobs.EXPIRY_MARGIN_S) * 1000),
                            ordering="" if s.ordering == "none" else s.ordering,
                        )
                        for s in sinks
                    ],
                ),
                ordered=any(s.ordering != "none" for s in sinks),
                filters=tuple((i, s.filter) for i, s in enumerate(sinks) if s.filter is not None),
            )
            if len(self._routes) < 4096:
                self._routes[key] = route
        return route

    async def ingest(self, tenant: str, event: Event, source: str) -> bool:
        """Store and enqueue ``event``; ``True`` if new, ``False`` if already seen.

        Raises :class:`RedisUnavailableError` if Redis could not take it; then nothing
        was acknowledged and the caller must let the sender retry. A batch that Redis
        does not answer within ``server.ingest_timeout`` fails the same way.
        """
        tracer = telemetry.TRACER
        if tracer is None:
            new = bool(await self.submit(tenant, event, source))
        else:  # the event's trace starts here (a webhook's starts in the receiver)
            span = tracer.ingest(tenant, event, source)
            try:
                new = bool(await self.submit(tenant, event, source, tracer.field(span)))
            except BaseException:
                span.set_attribute("relay.outcome", "failed")
                raise
            else:
                span.set_attribute("relay.outcome", "new" if new else "duplicate")
            finally:
                span.end()
        if self._metrics is not None:
            self.ingested(tenant, source, new).inc()
        return new

    def submit(
        self, tenant: str, event: Event, source: str, trace: bytes = b""
    ) -> asyncio.Future[int]:
        """:meth:`ingest` as a future of the script's 1 (new) or 0, counting nothing.

        For the webhook path, which counts with metric children it looked up once (and
        gives the trace context of its span, stored with the event, while tracing is on).
        """
        src = self._sources.get(source)
        if src is None:
            raise ValueError(f"unknown source {source!r}")
        route = self._route(tenant, event.type)
        jobs = route.jobs
        out: tuple[int, ...] = ()
        if route.filters:
            doc = event.envelope if event.envelope is not None else _envelope(event.body)
            out = tuple([i for i, f in route.filters if not f(doc)])
            if out:
                jobs = route.without(out)
        etype = event.type.encode()
        ts = stored_event.timestamp_field(event.timestamp)
        # the ingest time here is a placeholder: ingest.lua writes Redis' clock over it
        at_ms = int(time.time() * 1000)
        head = stored_event.header(len(jobs.jobs), at_ms, src, ts, len(etype), trace)
        item = IngestItem(
            tenant=tenant,
            event_id=event.event_id,
            header=head,
            event_type=etype,
            body=event.body,
            chat=event.chat_id if route.ordered and event.chat_id else "",
            route=jobs,
            webhook=source == "webhook",
        )
        future = self._pipe.submit(item)
        if out and self._metrics is not None:
            counters = [self._filtered_counter(tenant, route.sinks[i]) for i in out]
            future.add_done_callback(lambda f: _count_if_new(f, counters))
        return future

    def _filtered_counter(self, tenant: str, sink: str) -> Counter:
        """The ``events_filtered_total`` child for a sink (looked up once)."""
        assert self._metrics is not None
        counter = self._filtered.get((tenant, sink))
        if counter is None:
            counter = self._metrics.events_filtered.labels(tenant, sink)
            if len(self._filtered) < 65536:
                self._filtered[(tenant, sink)] = counter
        return counter

    def ingested(self, tenant: str, source: str, new: bool) -> Counter:
        """The ``events_ingested_total`` child for these labels (looked up once)."""
        assert self._metrics is not None
        counter = self._counted.get((tenant, source, new))
        if counter is None:
            counter = self._metrics.events_ingested.labels(
                tenant, source, "new" if new else "duplicate"
            )
            self._counted[(tenant, source, new)] = counter
        return counter

    def _encode(self, batch: list[IngestItem]) -> Packed:
        return self._batch(batch)  # the encoder of the configuration now in force

    def _observe(self, seconds: float, size: int) -> None:
        assert self._metrics is not None
        self._metrics.ingest_batch_seconds.observe(seconds)
        self._metrics.ingest_batch_size.observe(size)

    async def drain(self) -> None:
        """Wait until every ingest already asked for has been written (or failed)."""
        await self._pipe.drain()


def _count_if_new(future: asyncio.Future[int], counters: list[Counter]) -> None:
    """Count an event filtered out of sinks once it is in, and new (not a duplicate,
    whose routing was decided when it first came)."""
    if not future.cancelled() and future.exception() is None and future.result():
        for counter in counters:
            counter.inc()
