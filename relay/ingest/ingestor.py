"""Ingest: the one door into the pipeline, for every source (webhook, poll, SSE, backfill).

One Lua script does, atomically and per event: mark ``(tenant, event_id)`` seen for
the dedupe window, store the event once (:mod:`relay.stored_event`), and enqueue one
arq job per matching sink. An event already seen writes nothing, and nothing is
marked seen unless its jobs are enqueued in the same step.

Concurrent ingests are group-committed into batches, one ``EVALSHA`` each, and the
batches are pipelined on one Redis connection (:mod:`relay.script_pipe`): a batch
goes out once 16 events wait, or at the next turn of the event loop with whatever
arrived, so a lone event is not held back. Under load this turns hundreds of Redis
round trips into a few, and with ``appendfsync always`` events share fsyncs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import Counter
from redis.asyncio import Redis

from relay.config import Config
from relay.ingest.envelope import Event
from relay.keys import JOB_KEY_PREFIX, Keys
from relay.store import jobs, scripts, stored_event
from relay.store.script_pipe import ScriptPipeline, bulk, bulks

if TYPE_CHECKING:
    from relay.metrics import Metrics

log = logging.getLogger(__name__)

SOURCES = frozenset({"webhook", "poll", "sse", "backfill", "replay"})


@dataclass(frozen=True, slots=True)
class _Route:
    sinks: tuple[str, ...]
    packed: bytes  # event_ttl_ms, n_jobs, then per job (sink, job_ttl_ms, ordering), as RESP
    ordered: bool  # some sink delivers in order: the event's chat id goes along
    nargs: int


# An event on its way into a batch: tenant, whether it came by webhook, its packed
# arguments and how many there are.
_Item = tuple[str, bool, bytes, int]


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
        self._metrics = metrics
        self._sources = {s: s.encode() for s in SOURCES}
        r = config.redis
        self._pipe: ScriptPipeline[_Item] = ScriptPipeline(
            redis_client,
            scripts.script("ingest").source,
            self._build,
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
        self._head = bulks([prefix, Keys(prefix).queue, JOB_KEY_PREFIX])
        self._routes: dict[tuple[str, str], _Route] = {}
        self._tenants = {t.slug: bulk(t.slug) for t in config.tenants}

    def _route(self, tenant: str, event_type: str) -> _Route:
        key = (tenant, event_type)
        route = self._routes.get(key)
        if route is None:
            t = self._config.tenant(tenant)
            if t is None:
                raise KeyError(f"unknown tenant {tenant!r}")
            sinks = [s for s in t.sinks if s.matches(event_type)]
            longest = max([s.max_age for s in sinks], default=0.0) + jobs.EXPIRY_MARGIN_S
            args: list[str | int] = [
                int(max(longest, self._config.relay.dedupe_ttl) * 1000),
                len(sinks),
            ]
            for s in sinks:
                ordering = "" if s.ordering == "none" else s.ordering
                args += [s.name, int((s.max_age + jobs.EXPIRY_MARGIN_S) * 1000), ordering]
            route = _Route(
                sinks=tuple(s.name for s in sinks),
                packed=bulks(args),
                nargs=len(args),
                ordered=any(s.ordering != "none" for s in sinks),
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
        new = bool(await self.submit(tenant, event, source))
        if self._metrics is not None:
            self.ingested(tenant, source, new).inc()
        return new

    def submit(self, tenant: str, event: Event, source: str) -> asyncio.Future[int]:
        """:meth:`ingest` as a future of the script's 1 (new) or 0, counting nothing.

        For the webhook path, which counts with metric children it looked up once.
        """
        src = self._sources.get(source)
        if src is None:
            raise ValueError(f"unknown source {source!r}")
        route = self._route(tenant, event.type)
        eid, etype, body = event.event_id.encode(), event.type.encode(), event.body
        ts = stored_event.timestamp_field(event.timestamp)
        # the ingest time here is a placeholder: ingest.lua writes Redis' clock over it
        head = stored_event.header(len(route.sinks), int(time.time() * 1000), src, ts, len(etype))
        chat = event.chat_id.encode() if route.ordered and event.chat_id else b""
        packed = b"%s$%d\r\n%s\r\n$%d\r\n%s%s%s\r\n$%d\r\n%s\r\n%s" % (
            self._tenants[tenant],
            len(eid),
            eid,
            len(head) + len(etype) + len(body),
            head,
            etype,
            body,
            len(chat),
            chat,
            route.packed,
        )
        return self._pipe.submit((tenant, source == "webhook", packed, 4 + route.nargs))

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

    def _build(self, batch: list[_Item]) -> tuple[int, list[bytes]]:
        webhook_tenants = sorted({item[0] for item in batch if item[1]})
        parts = [
            self._head,
            bulk(len(webhook_tenants)),
            *(bulk(t) for t in webhook_tenants),
            bulk(len(batch)),
            *(item[2] for item in batch),
        ]
        return 5 + len(webhook_tenants) + sum(item[3] for item in batch), parts

    def _observe(self, seconds: float, size: int) -> None:
        assert self._metrics is not None
        self._metrics.ingest_batch_seconds.observe(seconds)
        self._metrics.ingest_batch_size.observe(size)

    async def drain(self) -> None:
        """Wait until every ingest already asked for has been written (or failed)."""
        await self._pipe.drain()
