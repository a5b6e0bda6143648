"""Ingest: the one door into the pipeline, for every source (webhook, poll, SSE, backfill).

One Lua script does, atomically and per event: mark ``(tenant, event_id)`` seen for
the dedupe window, store the envelope once, and enqueue one arq job per matching
sink. An event already seen writes nothing, and nothing is marked seen unless its
jobs are enqueued in the same step.

Concurrent ingests are group-committed: every call made while a batch is being
written joins the next batch, which goes to Redis as one ``EVALSHA``. Under load
this turns hundreds of Redis round trips (and their client-side overhead) into a
few, and with ``appendfsync always`` it also shares one fsync among the batch;
a lone event still goes out at once, on the next turn of the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

import redis.exceptions
from prometheus_client import Counter
from redis.asyncio import Redis

from relay import queue
from relay.config import Config
from relay.envelope import Event
from relay.errors import RedisUnavailableError
from relay.script_call import ScriptCaller, bulk, bulks

if TYPE_CHECKING:
    from relay.metrics import Metrics

log = logging.getLogger(__name__)

LUA = resources.files("relay").joinpath("ingest.lua").read_text(encoding="utf-8")
SOURCES = frozenset({"webhook", "poll", "sse", "backfill", "replay"})

# Transient Redis faults: the caller answers "try again later" (503), never "no".
REDIS_TRANSIENT = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ResponseError,  # e.g. OOM or MISCONF: Redis refuses writes for now
    OSError,
)
# How long past its deadline a job (and its payload) stays in Redis: arq must never
# drop a job by expiry before the relay's own deadline turns it into a dead letter.
EXPIRY_MARGIN_S = 86400.0


@dataclass(frozen=True, slots=True)
class _Route:
    sinks: tuple[str, ...]
    packed: bytes  # event_ttl_ms, n_jobs, then (sink, job_ttl_ms) pairs, as RESP
    nargs: int


_Pending = tuple[str, bool, bytes, int, "asyncio.Future[bool]"]


class Ingestor:
    """Durably accepts events: ``await ingest(tenant, event, source)`` → new or duplicate."""

    def __init__(
        self,
        redis_client: Redis,
        config: Config,
        metrics: Metrics | None = None,
        *,
        max_batch: int = 256,
        max_inflight: int = 2,
        timeout: float | None = None,
    ) -> None:
        self._caller = ScriptCaller(redis_client, LUA)
        self._timeout = config.server.ingest_timeout if timeout is None else timeout
        self._counted: dict[tuple[str, str, bool], Counter] = {}
        self._metrics = metrics
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._pending: list[_Pending] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._scheduled = False
        self._sources = {s: bulk(s) for s in SOURCES}
        self.set_config(config)

    def set_config(self, config: Config) -> None:
        """Use a new configuration (on reload); routes are recomputed lazily."""
        self._config = config
        prefix = config.redis.key_prefix
        self._head = bulks([prefix, queue.queue_name(prefix), queue.JOB_KEY_PREFIX])
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
            longest = max([s.max_age for s in sinks], default=0.0) + EXPIRY_MARGIN_S
            args: list[str | int] = [
                int(max(longest, self._config.relay.dedupe_ttl) * 1000),
                len(sinks),
            ]
            for s in sinks:
                args += [s.name, int((s.max_age + EXPIRY_MARGIN_S) * 1000)]
            route = _Route(sinks=tuple(s.name for s in sinks), packed=bulks(args), nargs=len(args))
            if len(self._routes) < 4096:
                self._routes[key] = route
        return route

    def sinks_for(self, tenant: str, event_type: str) -> tuple[str, ...]:
        """The sinks an event of this type is delivered to."""
        return self._route(tenant, event_type).sinks

    async def ingest(self, tenant: str, event: Event, source: str) -> bool:
        """Store and enqueue ``event``; ``True`` if new, ``False`` if already seen.

        Raises :class:`RedisUnavailableError` if Redis could not take it; then nothing
        was acknowledged and the caller must let the sender retry. A batch that Redis
        does not answer within ``server.ingest_timeout`` fails the same way.
        """
        src = self._sources.get(source)
        if src is None:
            raise ValueError(f"unknown source {source!r}")
        route = self._route(tenant, event.type)
        ts = b"" if event.timestamp is None else repr(event.timestamp).encode()
        packed = b"".join((
            self._tenants[tenant], bulk(event.event_id), bulk(event.body), bulk(event.type),
            bulk(ts), src, route.packed,
        ))  # fmt: skip
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((tenant, source == "webhook", packed, 6 + route.nargs, fut))
        self._kick()
        new = await fut
        if self._metrics is not None:
            counter = self._counted.get((tenant, source, new))
            if counter is None:
                counter = self._metrics.events_ingested.labels(
                    tenant, source, "new" if new else "duplicate"
                )
                self._counted[(tenant, source, new)] = counter
            counter.inc()
        return new

    def _kick(self) -> None:
        if not self._scheduled and self._pending and len(self._tasks) < self._max_inflight:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if not self._pending or len(self._tasks) >= self._max_inflight:
            return
        batch = self._pending[: self._max_batch]
        del self._pending[: self._max_batch]
        task = asyncio.ensure_future(self._write(batch))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("an ingest batch failed", exc_info=task.exception())
        self._kick()

    async def _write(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        try:
            webhook_tenants = sorted({p[0] for p in batch if p[1]})
            parts = [
                self._head,
                bulk(int(time.time() * 1000)),
                bulk(len(webhook_tenants)),
                *(bulk(t) for t in webhook_tenants),
                bulk(len(batch)),
                *(p[2] for p in batch),
            ]
            nargs = 6 + len(webhook_tenants) + sum(p[3] for p in batch)
            async with asyncio.timeout(self._timeout):
                results = await self._caller.call(nargs, parts)
        except (*REDIS_TRANSIENT, TimeoutError) as e:
            log.warning("ingest of %d event(s) failed: Redis unavailable: %s", len(batch), e)
            err = RedisUnavailableError(f"Redis unavailable: {type(e).__name__}")
            for p in batch:
                if not p[4].done():
                    p[4].set_exception(err)
            return
        except BaseException as e:
            # Whatever went wrong, no caller may be left waiting on this batch.
            for p in batch:
                if not p[4].done():
                    p[4].set_exception(RedisUnavailableError(f"ingest failed: {type(e).__name__}"))
            raise
        if self._metrics is not None:
            self._metrics.ingest_batch_seconds.observe(time.perf_counter() - started)
            self._metrics.ingest_batch_size.observe(len(batch))
        for p, result in zip(batch, results, strict=True):
            if not p[4].done():
                p[4].set_result(bool(result))

    async def drain(self) -> None:
        """Wait until every ingest already asked for has been written (or failed)."""
        while self._pending or self._tasks or self._scheduled:
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            else:
                await asyncio.sleep(0)
