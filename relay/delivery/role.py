"""The worker role: the delivery loop running queued jobs, under the service's lifecycle.

The role builds the delivery loop (:mod:`relay.delivery.loop`) around one
:class:`~relay.delivery.deliverer.Deliverer`, on its own Redis connection pool sized for
``max_jobs`` concurrent deliveries, and registers the scrape-time collector
(:mod:`relay.delivery.collector`).

- Only ``relay.service`` handles signals; :meth:`stop` stops picking jobs, lets running
  deliveries finish for up to ``worker.shutdown_grace``, then cancels the rest (a
  cancelled run gives its slot and its job back; it runs again on any worker).
- A heartbeat (:mod:`relay.delivery.heartbeat`) renews, every 2 s, the 10 s holds on
  the deliveries this worker runs (arq's in-progress marks, the sinks' in-flight
  leases): a killed worker's deliveries run again elsewhere within 10 s. On start the
  role logs what it inherits: deliveries in progress elsewhere, in-flight leases.
- Per-delivery log lines are DEBUG; at INFO the role logs a summary per sink every
  60 s while it has activity (and when it stops), and a warning when a sink has answered
  nothing for ``worker.sink_silence_warn`` (:mod:`relay.delivery.activity`).
- A due job whose ``arq:job:`` key has expired (no worker ran for longer than the
  sink's ``max_age`` + 1 day) is logged as an error and counted.

If Redis goes away or refuses writes (out of memory with ``noeviction``, a read-only
replica after a failover, MISCONF when it cannot persist), the loop's read raises;
the role logs which it was, lets running jobs end, backs off and starts again with a
fresh loop (a job whose outcome could not be written runs again once its in-progress
key expires).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any

import aiohttp
import redis.exceptions
from redis.asyncio import Redis

from relay.config import Config
from relay.delivery import targets
from relay.delivery.collector import DeliveryCollector
from relay.delivery.deliverer import Deliverer
from relay.delivery.heartbeat import Heartbeat, log_census
from relay.delivery.loop import DeliveryLoop, LoopHooks, job_timeout
from relay.keys import Keys
from relay.metrics import Metrics, total
from relay.runtime import Runtime
from relay.store.client import blocking_pool

log = logging.getLogger(__name__)

REDIS_RETRY_S = (0.5, 10.0)  # first and longest wait before polling again after a Redis fault
HEALTHY_S = 60.0  # polling this long without a Redis fault resets the backoff
ABANDON_TAKE_S = 2.0  # how long a failed loop's take in flight may still finish
CLOSE_TIMEOUT_S = 10.0  # bound on each step of stopping the loop


class WorkerRole:
    """Delivers queued jobs until stopped."""

    name = "worker"

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._stopping = False
        self._loop: DeliveryLoop | None = None
        self._main: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._pool: Redis | None = None
        self._collector: DeliveryCollector | None = None
        self._timeout = 0.0
        self._heartbeat: asyncio.Task[None] | None = None
        self._activity: asyncio.Task[None] | None = None
        self._census: asyncio.Task[object] | None = None
        self.deliverer: Deliverer | None = None

    @property
    def metrics(self) -> Metrics:
        return self._rt.metrics

    async def start(self) -> None:
        cfg = self._rt.config
        w = cfg.worker
        self._pool = Redis(connection_pool=blocking_pool(self._rt.redis, w.max_jobs + 16))
        self._session = aiohttp.ClientSession(
            connector=targets.connector(cfg, limit=w.max_jobs, limit_per_host=0, ttl_dns_cache=60),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        timeout = job_timeout(cfg)
        self.deliverer = Deliverer(
            self._pool, cfg, self.metrics, self._session, job_timeout=timeout
        )
        self._timeout = timeout
        # Counting what this worker inherits only logs: it must not hold up start-up.
        self.deliverer.started_in_census = set()
        self._census = asyncio.create_task(self._log_census(), name="worker-census")
        self._heartbeat = asyncio.create_task(
            Heartbeat(self._pool, self.deliverer.running).run(), name="worker-heartbeat"
        )
        self._activity = asyncio.create_task(
            self.deliverer.activity.run(), name="worker-sink-activity"
        )
        self._loop = self._new_loop()
        self._collector = DeliveryCollector(self._rt.endpoint.sync_client(), cfg)
        self.metrics.registry.register(self._collector)
        self.metrics.prepare_worker(cfg)
        log.info(
            "worker started: up to %d deliveries at once, job timeout %.0fs", w.max_jobs, timeout
        )

    async def _log_census(self) -> None:
        """Log what this worker inherits, leaving out the jobs it has taken meanwhile."""
        if self._pool is None or self.deliverer is None:
            return
        mine = self.deliverer.started_in_census  # filled as the worker starts jobs
        try:
            await log_census(
                self._pool, self._rt.config, () if mine is None else mine, self._takes_done
            )
        finally:
            self.deliverer.started_in_census = None  # done: stop noting them

    async def _takes_done(self) -> None:
        if self._loop is not None:
            await self._loop.takes_done()

    def _new_loop(self) -> DeliveryLoop:
        """The delivery loop; a fresh one after a Redis outage."""
        if self._pool is None or self.deliverer is None:
            raise RuntimeError("the worker role was not started")
        cfg = self._rt.config
        loop = DeliveryLoop(
            self._pool,
            self.deliverer,
            Keys(cfg.redis.key_prefix),
            cfg.worker,
            LoopHooks(self._job_started, self._job_ended, self._job_expired),
        )
        self.deliverer.next_ready = loop.start_now  # jobs a finish queued, due now
        self.deliverer.adopt = loop.adopt  # a job a finish took for this worker
        return loop

    def _job_expired(self, job_id: str) -> None:
        """A job's key expired before any worker ran it: say so, loudly (never silently)."""
        tenant, sink, event_id = Keys(self._rt.config.redis.key_prefix).parse_job_id(job_id)
        log.error(
            "delivery job for event %s to %s/%s expired before any worker ran it (no "
            "worker for longer than the sink's max_age + 1 day); the delivery is lost",
            event_id,
            tenant,
            sink,
        )
        self.metrics.deliveries.labels(tenant, sink, "expired", "none").inc()

    def _job_started(self) -> None:
        self.metrics.deliveries_running.inc()

    def _job_ended(self) -> None:
        self.metrics.deliveries_running.dec()

    @property
    def loop(self) -> DeliveryLoop:
        if self._loop is None:
            raise RuntimeError("the worker role was not started")
        return self._loop

    async def run(self) -> None:
        if self._loop is None:
            await self.start()
        wait = REDIS_RETRY_S[0]
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._main = asyncio.create_task(self.loop.run(), name="delivery-loop")
            began = loop.time()
            try:
                await self._main
                return  # stopped
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
                await self._abandon(self.loop)
                await asyncio.sleep(wait * (1 + random.random() / 4))
                wait = min(wait * 2, REDIS_RETRY_S[1])
                if not self._stopping:
                    self._loop = self._new_loop()

    async def _abandon(self, worker: DeliveryLoop) -> None:
        """Let a broken loop's running jobs end (bounded), without touching Redis.

        Their deliveries are recorded in Redis or not at all: a job whose outcome could
        not be written runs again once its in-progress mark expires.
        """
        worker.stop_picking()  # should Redis come back meanwhile, nothing starts here
        await worker.end_takes(ABANDON_TAKE_S)  # then no take in flight starts a job here
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
        worker = self._loop
        if worker is None:
            return
        worker.stop_picking()
        if self.deliverer is not None:
            self.deliverer.draining = True  # a take starting right now takes nothing
        # a take already in Redis: once it returns, its jobs are tracked
        await self._bounded(asyncio.ensure_future(worker.takes_done()), "a take in flight")
        grace = self._rt.config.worker.shutdown_grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        told = False
        # a take may still be starting jobs it read just before: wait for those too
        while running := [t for t in worker.tasks.values() if not t.done()]:
            left = deadline - loop.time()
            if left <= 0:
                log.warning(
                    "cancelling %d deliveries still running; they will run again", len(running)
                )
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
        # A job started while the loop was being cancelled is cancelled too (its run
        # gives the job back).
        late = [t for t in worker.tasks.values() if not t.done()]
        for t in late:
            t.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        worker.tasks.clear()
        if self.deliverer is not None:  # the last finishes, then the connection goes back
            await self._bounded(asyncio.ensure_future(self.deliverer.drain()), "the finishes")
        await self._stop_background()
        if self._pool is not None:
            closing = self._pool.aclose(close_connection_pool=True)
            await self._bounded(asyncio.ensure_future(closing), "closing its Redis connections")
        if self._session is not None:
            await self._session.close()
        if self._collector is not None:
            with contextlib.suppress(KeyError):
                self.metrics.registry.unregister(self._collector)
            self._collector.close()
        log.info(
            "worker stopped: %d job runs completed, %d rescheduled, %d failed",
            worker.jobs_complete,
            worker.jobs_retried,
            worker.jobs_failed,
        )

    async def _stop_background(self) -> None:
        """End the heartbeat, the census and the sink summaries (with a last one)."""
        for task in (self._heartbeat, self._census, self._activity):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.deliverer is not None:
            self.deliverer.activity.report()  # what ended since the last summary

    async def _bounded(self, task: asyncio.Future[Any], what: str) -> None:
        """Wait (bounded) for a shutdown step; log what went wrong rather than hang."""
        done, _ = await asyncio.wait([task], timeout=CLOSE_TIMEOUT_S)
        if not done:
            log.error("worker: %s did not end within %.0fs; going on", what, CLOSE_TIMEOUT_S)
            task.cancel()
            return
        if not task.cancelled() and task.exception() is not None:
            log.warning("worker: %s ended with %r", what, task.exception())

    def status(self) -> str:
        delivered = total(self.metrics.deliveries, outcome="delivered")
        running = total(self.metrics.deliveries_running)
        return f"{delivered:.0f} deliveries made, {running:.0f} running"

    def reload(self, config: Config) -> None:
        if self.deliverer is not None:
            self.deliverer.set_config(config)
        if self._collector is not None:
            self._collector.config = config
        self.metrics.prepare_worker(config)


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
