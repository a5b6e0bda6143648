"""The worker role: arq's ``Worker`` running the delivery job, under the service's lifecycle.

arq is the scheduler and executor only (see ``relay.delivery`` for what a job does).
The role sets arq up for I/O-bound work and for the relay's guarantees:

- ``handle_signals=False``: only ``relay.service`` handles signals; :meth:`stop`
  does what arq's own SIGTERM handler would with ``job_completion_wait``: stop picking
  jobs, let running deliveries finish for up to ``worker.shutdown_grace``, then cancel
  the rest (arq puts a cancelled job back in the queue; it runs again on any worker).
- ``keep_result=0`` (no result keys), JSON job (de)serialization, ``max_tries``
  unbounded — the relay's own ``max_attempts``/``max_age`` are the limits; arq counts
  every pickup (deferrals too), and a long-deferred job must never hit that count.
- the job timeout is the longest sink timeout plus a margin, so the relay's own
  timeouts always fire first (arq's timeout would end the job for good).
- ``on_job_start``/``on_job_end`` hooks only keep a gauge, and can never raise: a
  raising hook kills arq's worker.
- jobs are started by :class:`BatchStartWorker`: arq's checks (due, not in progress on
  any worker), one Lua call per poll instead of four round trips per job. A due job
  whose ``arq:job:`` key has expired (no worker ran for longer than the sink's
  ``max_age`` + 1 day) is logged as an error and counted, where arq would drop it with
  a warning.

The job's dependencies travel in arq's ``ctx`` as one typed object
(``relay.delivery.JobContext``). The worker uses its own Redis connection pool, sized
for ``max_jobs`` concurrent deliveries. A collector registered on the metrics registry
reads queue depth, stored dead letters and breaker states from Redis at scrape time.
If Redis goes away or refuses writes (out of memory with ``noeviction``, a read-only
replica after a failover, MISCONF when it cannot persist), arq's polling loop raises;
the role logs which it was, lets running jobs end, backs off and starts polling again
with a fresh arq worker (a job whose outcome could not be written runs again once its
in-progress key expires).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import redis
import redis.asyncio
import redis.exceptions
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.utils import timestamp_ms
from arq.worker import Worker, func
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from relay.config import Config
from relay.delivery import breaker
from relay.delivery import deliverer as delivery
from relay.delivery.deadletters import CLASSES
from relay.keys import Keys
from relay.metrics import PREFIX, Metrics
from relay.runtime import Runtime
from relay.store import jobs as queue

log = logging.getLogger(__name__)

MAX_PICKUPS = sys.maxsize  # arq's max_tries: unbounded; the relay's own limits end a delivery
REDIS_RETRY_S = (0.5, 10.0)  # first and longest wait before polling again after a Redis fault
HEALTHY_S = 60.0  # polling this long without a Redis fault resets the backoff
SCRAPE_TIMEOUT_S = 1.0
CLOSE_TIMEOUT_S = 10.0  # bound on each step of closing arq's worker


class _SafeHook:
    """An arq hook that never raises (a raising hook would stop arq's worker)."""

    def __init__(self, hook: Callable[[dict[Any, Any]], None]) -> None:
        self._hook = hook
        self.__qualname__ = hook.__name__

    async def __call__(self, ctx: dict[Any, Any]) -> None:
        try:
            self._hook(ctx)
        except Exception:
            log.exception("worker hook %s failed (ignored)", self.__qualname__)


def _pool_kwargs(client: redis.asyncio.Redis) -> tuple[type[Any], dict[str, Any]]:
    pool = client.connection_pool
    return pool.connection_class, dict(pool.connection_kwargs)


def sync_client(client: redis.asyncio.Redis, timeout: float = SCRAPE_TIMEOUT_S) -> redis.Redis:
    """A blocking client to the same server as ``client`` (for scrape-time collectors)."""
    cls, kwargs = _pool_kwargs(client)
    sync_cls: type[Any] = redis.connection.Connection
    if cls.__name__ == "UnixDomainSocketConnection":
        sync_cls = redis.connection.UnixDomainSocketConnection
    elif cls.__name__ == "SSLConnection":
        sync_cls = redis.connection.SSLConnection
    kwargs.update(socket_timeout=timeout, socket_connect_timeout=timeout)
    kwargs.pop("redis_connect_func", None)
    pool = redis.ConnectionPool(connection_class=sync_cls, max_connections=2, **kwargs)
    return redis.Redis(connection_pool=pool)


# Claims up to ARGV[3] due jobs among ARGV[6..] the way arq's start_jobs does one by one
# (due, not in progress anywhere → mark in progress), in one atomic call. A due job
# whose job key has expired is taken out of the queue and reported, not run.
# KEYS: queue; ARGV: now_ms, in_progress_ms, max, in-progress prefix, job prefix, ids…
_START = """
local now, left = tonumber(ARGV[1]), tonumber(ARGV[3])
local out, expired = {}, {}
for i = 6, #ARGV do
  if left <= 0 then break end
  local id = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], id)
  if score and tonumber(score) <= now and redis.call('EXISTS', ARGV[4] .. id) == 0 then
    if redis.call('EXISTS', ARGV[5] .. id) == 0 then
      redis.call('ZREM', KEYS[1], id)
      expired[#expired + 1] = id
    else
      redis.call('SET', ARGV[4] .. id, '1', 'PX', ARGV[2])
      out[#out + 1] = id
      out[#out + 1] = score
      left = left - 1
    end
  end
end
return {out, expired}
"""


class BatchStartWorker(Worker):
    """arq's ``Worker``, starting the due jobs of one poll with one Redis call.

    arq's own ``start_jobs`` makes four sequential round trips per job (WATCH, EXISTS,
    ZSCORE, MULTI/EXEC) from the single polling loop, which caps how fast jobs start —
    badly so with ``appendfsync always``, where each one waits for an fsync. This
    does the same checks for the whole batch atomically in Lua.
    """

    on_expired: Callable[[str], None] | None = None

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        free = self.max_jobs - self.job_counter
        ids = [j for j in job_ids if j.decode() not in self.tasks]
        if free <= 0 or not ids:
            return
        script = getattr(self, "_start_script", None)
        if script is None:
            script = self._start_script = self.pool.register_script(_START)
        claimed, expired = await script(
            keys=[self.queue_name],
            args=[timestamp_ms(), int(self.in_progress_timeout_s * 1000), free,
                  in_progress_key_prefix, job_key_prefix, *ids],
        )  # fmt: skip
        for job_id in expired:
            if self.on_expired is not None:
                self.on_expired(job_id.decode())
        for i in range(0, len(claimed), 2):
            await self.sem.acquire()
            self.job_counter += 1
            job_id = claimed[i].decode()
            t = self.loop.create_task(self.run_job(job_id, int(float(claimed[i + 1]))))
            t.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = t


class DeliveryCollector(Collector):
    """Queue depth, stored dead letters and breaker states, read from Redis per scrape."""

    def __init__(self, client: redis.Redis, config: Config) -> None:
        self._client = client
        self.config = config

    def close(self) -> None:
        self._client.close()
        self._client.connection_pool.disconnect()

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        p = PREFIX
        cfg = self.config
        keys = Keys(cfg.redis.key_prefix)
        q = queue.queue_name(cfg.redis.key_prefix)
        pairs = [(t.slug, s.name) for t in cfg.tenants for s in t.sinks]
        now = time.time()
        try:
            with self._client.pipeline(transaction=False) as pipe:
                pipe.zcount(q, "-inf", int(now * 1000))
                pipe.zcount(q, f"({int(now * 1000)}", "+inf")
                pipe.zrange(q, 0, 0, withscores=True)
                for t in cfg.tenants:
                    pipe.hgetall(keys.dead_letter_counts(t.slug))
                for tenant, sink in pairs:
                    pipe.get(keys.sink_gone(tenant, sink))
                found = pipe.execute()
            states = breaker.states_sync(self._client, keys, pairs)
        except (redis.exceptions.RedisError, OSError) as e:
            log.warning("metrics: could not read delivery state from Redis: %s", e)
            return
        ready, scheduled, oldest = found[0], found[1], found[2]
        yield GaugeMetricFamily(f"{p}_queue_ready_jobs", "Delivery jobs due now.", value=ready)
        yield GaugeMetricFamily(
            f"{p}_queue_scheduled_jobs", "Delivery jobs waiting for a later time (retries, "
            "deferrals).", value=scheduled,
        )  # fmt: skip
        age = 0.0
        if oldest and oldest[0][1] <= now * 1000:
            age = max(0.0, now - oldest[0][1] / 1000)
        yield GaugeMetricFamily(
            f"{p}_queue_oldest_ready_age_seconds",
            "How long the longest-waiting due job has been due.", value=age,
        )  # fmt: skip
        dl = GaugeMetricFamily(
            f"{p}_dead_letters", "Stored dead letters by class.", labels=["tenant", "class"]
        )
        for i, t in enumerate(cfg.tenants):
            counts = found[3 + i]
            for cls in CLASSES:
                dl.add_metric([t.slug, cls], int(counts.get(cls.encode(), 0)))
        yield dl
        gone_found = found[3 + len(cfg.tenants) :]
        st = GaugeMetricFamily(
            f"{p}_breaker_state",
            "Each sink's circuit breaker: 0 closed, 1 half-open, 2 open.",
            labels=["tenant", "sink"],
        )
        gone = GaugeMetricFamily(
            f"{p}_sink_gone", "1 while a sink's URL is marked gone (it answered 410).",
            labels=["tenant", "sink"],
        )  # fmt: skip
        url = {(t.slug, s.name): s.url for t in cfg.tenants for s in t.sinks}
        for pair, marked in zip(pairs, gone_found, strict=True):
            st.add_metric(list(pair), states[pair])
            gone.add_metric(list(pair), 1 if marked is not None and marked.decode() == url[pair]
                            else 0)  # fmt: skip
        yield st
        yield gone


class WorkerRole:
    """Delivers queued jobs until stopped (or, with ``burst``, until the queue is empty)."""

    name = "worker"

    def __init__(self, rt: Runtime, *, burst: bool = False) -> None:
        self._rt = rt
        self._burst = burst
        self._stopping = False
        self._worker: Worker | None = None
        self._main: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._pool: ArqRedis | None = None
        self._collector: DeliveryCollector | None = None
        self._timeout = 0.0
        self.deliverer: delivery.Deliverer | None = None

    @property
    def metrics(self) -> Metrics:
        return self._rt.metrics

    async def start(self) -> None:
        cfg = self._rt.config
        w = cfg.worker
        cls, kwargs = _pool_kwargs(self._rt.redis)
        pool = redis.asyncio.BlockingConnectionPool(
            connection_class=cls, max_connections=w.max_jobs + 16, timeout=10, **kwargs
        )
        self._pool = ArqRedis(pool)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=w.max_jobs, limit_per_host=0, ttl_dns_cache=60),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        timeout = delivery.job_timeout(cfg)
        self.deliverer = delivery.Deliverer(
            self._pool, cfg, self.metrics, self._session, job_timeout=timeout
        )
        self._timeout = timeout
        self._worker = self._new_worker()
        self._collector = DeliveryCollector(sync_client(self._rt.redis), cfg)
        self.metrics.registry.register(self._collector)
        log.info(
            "worker started: up to %d deliveries at once, job timeout %.0fs%s",
            w.max_jobs, timeout, " (burst)" if self._burst else "",
        )  # fmt: skip

    def _new_worker(self) -> Worker:
        """arq's worker; a fresh one after a Redis outage (arq's counters may be off)."""
        cfg = self._rt.config
        w = cfg.worker
        timeout = self._timeout
        if self._pool is None or self.deliverer is None:
            raise RuntimeError("the worker role was not started")
        worker = BatchStartWorker(
            functions=[
                func(
                    delivery.deliver,
                    name=queue.DELIVER_FUNCTION,
                    timeout=timeout,
                    max_tries=MAX_PICKUPS,
                    keep_result=0,
                )
            ],
            queue_name=queue.queue_name(cfg.redis.key_prefix),
            redis_pool=self._pool,
            burst=self._burst,
            handle_signals=False,
            job_completion_wait=int(w.shutdown_grace),
            max_jobs=w.max_jobs,
            job_timeout=timeout,
            keep_result=0,
            poll_delay=w.poll_delay,
            queue_read_limit=w.queue_read_limit,
            max_tries=MAX_PICKUPS,
            ctx={delivery.CTX_KEY: delivery.JobContext(self.deliverer)},
            on_job_start=_SafeHook(self._job_started),
            on_job_end=_SafeHook(self._job_ended),
            job_serializer=queue.serialize,
            job_deserializer=queue.deserialize,
            log_results=False,
        )
        worker.on_expired = self._job_expired
        return worker

    def _job_expired(self, job_id: str) -> None:
        """A job's key expired before any worker ran it: say so, loudly (never silently)."""
        prefix = self._rt.config.redis.key_prefix + ":"
        tenant, _, rest = job_id.removeprefix(prefix).partition(":")
        sink, _, event_id = rest.partition(":")
        log.error(
            "delivery job for event %s to %s/%s expired before any worker ran it (no "
            "worker for longer than the sink's max_age + 1 day); the delivery is lost",
            event_id, tenant, sink,
        )  # fmt: skip
        self.metrics.deliveries.labels(tenant, sink, "expired", "none").inc()

    def _job_started(self, ctx: dict[Any, Any]) -> None:
        self.metrics.deliveries_running.inc()

    def _job_ended(self, ctx: dict[Any, Any]) -> None:
        self.metrics.deliveries_running.dec()

    @property
    def arq(self) -> Worker:
        if self._worker is None:
            raise RuntimeError("the worker role was not started")
        return self._worker

    async def run(self) -> None:
        if self._worker is None:
            await self.start()
        wait = REDIS_RETRY_S[0]
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._main = asyncio.create_task(self.arq.main(), name="arq-worker")
            began = loop.time()
            try:
                await self._main
                return  # burst mode: the queue is empty
            except asyncio.CancelledError:
                if self._stopping and not _current_cancelling():
                    return
                raise
            except (redis.exceptions.RedisError, OSError) as e:
                if self._stopping:
                    return
                if loop.time() - began > HEALTHY_S:
                    wait = REDIS_RETRY_S[0]  # a new episode: start the backoff over
                log.error("worker: %s (%s); polling again in %.1fs", redis_fault(e), e, wait)
                await self._abandon(self.arq)
                await asyncio.sleep(wait * (1 + random.random() / 4))
                wait = min(wait * 2, REDIS_RETRY_S[1])
                if not self._stopping:
                    self._worker = self._new_worker()

    async def _abandon(self, worker: Worker) -> None:
        """Let a broken arq worker's running jobs end (bounded), without touching Redis.

        Their deliveries are recorded in Redis or not at all: a job whose outcome could
        not be written runs again once arq's in-progress key expires.
        """
        running = [t for t in worker.tasks.values() if not t.done()]
        if running:
            _, pending = await asyncio.wait(running, timeout=self._timeout)
            for t in pending:
                t.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        worker.tasks.clear()

    async def stop(self) -> None:
        """Stop picking jobs; let running deliveries finish (bounded); cancel the rest."""
        if self._stopping:
            return
        self._stopping = True
        worker = self._worker
        if worker is None:
            return
        worker.allow_pick_jobs = False
        if self.deliverer is not None:
            self.deliverer.draining = True  # a job arq is starting right now goes back
        grace = self._rt.config.worker.shutdown_grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        told = False
        # arq may still be starting jobs it read just before: wait for those too.
        while running := [t for t in worker.tasks.values() if not t.done()]:
            left = deadline - loop.time()
            if left <= 0:
                log.warning("cancelling %d deliveries still running; they will run again",
                            len(running))  # fmt: skip
                for t in running:
                    t.cancel()
                await asyncio.wait(running, timeout=10)
                break
            if not told:
                log.info("waiting up to %.0fs for %d running deliveries", left, len(running))
                told = True
            await asyncio.wait(running, timeout=left)
        if self._main is not None and not self._main.done():
            self._main.cancel()
            await self._bounded(self._main, "the polling loop")
        # A job started while the poll loop was being cancelled is cancelled too (arq
        # queues it again); then nothing is left for arq's close() to gather.
        late = [t for t in worker.tasks.values() if not t.done()]
        for t in late:
            t.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        worker.tasks.clear()
        await self._bounded(asyncio.ensure_future(worker.close()), "arq's close")
        if self._session is not None:
            await self._session.close()
        if self._collector is not None:
            with contextlib.suppress(KeyError):
                self.metrics.registry.unregister(self._collector)
            self._collector.close()
        log.info(
            "worker stopped: %d job runs completed, %d rescheduled, %d failed",
            worker.jobs_complete, worker.jobs_retried, worker.jobs_failed,
        )  # fmt: skip

    async def _bounded(self, task: asyncio.Future[Any], what: str) -> None:
        """Wait (bounded) for a shutdown step; log what went wrong rather than hang."""
        done, _ = await asyncio.wait([task], timeout=CLOSE_TIMEOUT_S)
        if not done:
            log.error("worker: %s did not end within %.0fs; going on", what, CLOSE_TIMEOUT_S)
            task.cancel()
            return
        if not task.cancelled() and task.exception() is not None:
            log.warning("worker: %s ended with %r", what, task.exception())

    def reload(self, config: Config) -> None:
        if self.deliverer is not None:
            self.deliverer.set_config(config)
        if self._collector is not None:
            self._collector.config = config


def redis_fault(e: BaseException) -> str:
    """What a Redis error means for the worker, in a few words, for the log."""
    text = str(e)
    if isinstance(e, redis.exceptions.OutOfMemoryError) or "maxmemory" in text:
        return "Redis is out of memory (maxmemory reached) and refuses writes"
    if isinstance(e, redis.exceptions.ReadOnlyError) or text.startswith("READONLY"):
        return "Redis is read-only (a replica, e.g. after a failover) and refuses writes"
    if text.startswith("MISCONF"):
        return "Redis cannot persist (MISCONF) and refuses writes"
    if isinstance(e, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError | OSError):
        return "lost Redis"
    return f"Redis answered with an error ({type(e).__name__})"


def _current_cancelling() -> int:
    task = asyncio.current_task()
    return 0 if task is None else task.cancelling()


def factory(rt: Runtime) -> WorkerRole:
    """The role factory ``relay.cli`` registers as ``worker``."""
    return WorkerRole(rt)
