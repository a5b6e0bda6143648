"""arq, behind one small module: the job function, its typed context, and the worker class.

arq is the scheduler (its queue, job records, in-progress marks and polling loop);
the relay starts and runs the jobs (``relay.delivery.deliverer`` is what a job does).
:func:`new_worker` sets arq up for I/O-bound work and for the relay's guarantees:

- ``handle_signals=False``: only ``relay.service`` handles signals; the worker role
  stops arq itself (``relay.delivery.role``).
- ``keep_result=0`` (no result keys), JSON job (de)serialization, ``max_tries``
  unbounded — the relay's own ``max_attempts``/``max_age`` are the limits; arq counts
  every pickup (deferrals too), and a long-deferred job must never hit that count.
- the job timeout is the longest sink timeout plus :data:`JOB_MARGIN_S`, so the relay's
  own timeouts always fire first (arq's timeout would end the job for good).
- the role's hooks (a job started, ended, expired unrun) are called by the relay's
  code, never by arq (a raising arq hook would kill arq's worker).
- a job is marked in progress for ``heartbeat.HOLD_S`` (10 s), renewed by the worker
  while it runs (:mod:`relay.delivery.heartbeat`), rather than arq's job timeout + 10 s.
- due times are Redis' clock (``take.lua`` checks them by it); a worker whose clock is
  behind Redis' reads the queue again by Redis' clock (:mod:`relay.store.clock`), since
  arq's own read, by this machine's clock, would miss the jobs just due.
- a job run that arq itself fails (Redis gone around the job function) is logged
  briefly (:meth:`BatchStartWorker.job_done`), never left to asyncio's
  "Task exception was never retrieved".
- jobs are started and run by :class:`BatchStartWorker`: arq's checks (due, not in
  progress on any worker) and the claims of a whole poll in one Lua call, instead of
  six round trips per job. A due job whose ``arq:job:`` key has expired (no worker ran
  for longer than the sink's ``max_age`` + 1 day) is reported, where arq would drop it
  with a warning.

The job's dependencies travel in arq's ``ctx`` as one typed object (:class:`JobContext`).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis.exceptions
from arq.connections import ArqRedis
from arq.worker import Retry, Worker, func

from relay.config import Config
from relay.delivery import heartbeat
from relay.keys import Keys
from relay.logs import Throttle
from relay.store import jobs
from relay.store.clock import CLOCK

if TYPE_CHECKING:
    from relay.delivery.deliverer import Deliverer
    from relay.delivery.steps import Taken

log = logging.getLogger(__name__)

CTX_KEY = "relay"  # the one key of arq's ctx dict the relay uses
JOB_MARGIN_S = 3.0  # arq's job timeout = longest sink timeout + this
MAX_PICKUPS = sys.maxsize  # arq's max_tries: unbounded; the relay's own limits end a delivery
BEHIND_MS = 50  # a clock this far behind Redis' reads the queue again, by Redis' clock


@dataclass
class JobContext:
    """What the job function needs, kept in arq's ``ctx`` under :data:`CTX_KEY`."""

    deliverer: Deliverer


def job_context(ctx: dict[str, Any]) -> JobContext:
    """The relay's typed context from arq's untyped ``ctx`` dict."""
    found = ctx.get(CTX_KEY)
    if not isinstance(found, JobContext):
        raise RuntimeError("the worker did not set up the delivery context")
    return found


async def deliver(ctx: dict[str, Any], *args: Any) -> None:
    """The job function arq knows as ``deliver``. The relay's worker never has arq run it:
    :meth:`BatchStartWorker.start_jobs` starts and runs each job itself. Should arq
    ever call it, the job goes back in the queue (a ``Retry``), never lost."""
    log.error("arq ran delivery job %s itself; it goes back in the queue", ctx.get("job_id"))
    raise Retry(defer=1)


def job_timeout(config: Config) -> float:
    """arq's timeout for the delivery function: well past every sink's HTTP timeout."""
    longest = max((s.timeout for t in config.tenants for s in t.sinks), default=10.0)
    return longest + JOB_MARGIN_S


class BatchStartWorker(Worker):
    """arq's ``Worker``, whose polling loop finds the due jobs, and which starts and runs
    them the relay's way.

    arq's own ``start_jobs`` makes four sequential round trips per job (WATCH, EXISTS,
    ZSCORE, MULTI/EXEC) from the single polling loop, and its ``run_job`` two more around
    the job function (the job read, the finish) — badly so with ``appendfsync always``,
    where each waits for an fsync. Here one call per poll (``take.lua``) does arq's
    checks and marks, reads the jobs and claims them; each job then runs as
    :meth:`Deliverer.run <relay.delivery.deliverer.Deliverer.run>`, whose finish is
    group-committed with its neighbours'. arq's job format, queue and in-progress marks
    are kept: any arq worker could run these jobs.
    """

    on_expired: Callable[[str], None] | None = None
    hooks: WorkerHooks | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._now: list[str] = []  # jobs to start at once (start_now), in the next take
        self._now_task: asyncio.Task[None] | None = None
        self._take_lock = asyncio.Lock()  # one take at a time: ``free`` stays true
        self._backlog = False  # the last read of the queue found more due jobs than it took
        self._refill: asyncio.Task[None] | None = None
        self._refill_min = max(1, self.max_jobs // 8)

    def stop_picking(self) -> None:
        """No job starts here any more: not by arq's poll, a refill or :meth:`start_now`
        (a take waiting for its turn does nothing)."""
        self.allow_pick_jobs = False
        self._backlog = False
        self._now.clear()

    async def takes_done(self) -> None:
        """Wait for a take in flight: its jobs are started and tracked once it returns."""
        async with self._take_lock:
            pass

    def start_now(self, job_id: str) -> None:
        """Start ``job_id`` (due now) at once, with the same checks as a poll's jobs,
        instead of at the next poll. A job another worker took meanwhile is left alone.
        The ids asked for while a take runs go together in the next one: a batch of
        finishes queues many chats' next events at once."""
        if not self.allow_pick_jobs:
            return
        self._now.append(job_id)
        if self._now_task is None:
            self._now_task = self.loop.create_task(self._start_asked())

    async def _start_asked(self) -> None:
        ids: list[str] = []
        try:
            async with self._take_lock:
                ids, self._now = self._now, []
                await self._take(ids)
        except (redis.exceptions.RedisError, OSError) as e:
            # The next poll starts them: they are in the queue, due.
            log.debug("could not start %d job(s) at once (%s); the next poll will", len(ids), e)
        finally:
            self._now_task = None
        if self._now and self.allow_pick_jobs:
            self._now_task = self.loop.create_task(self._start_asked())

    def _ended(self, _task: asyncio.Task[Any]) -> None:
        """A job ended: while there is a backlog, refill the free slots now (once an
        eighth of ``max_jobs`` is free) rather than at the next poll, ``poll_delay``
        away. An idle worker still reads the queue only once per ``poll_delay``."""
        if (
            self._backlog
            and self._refill is None
            and self.allow_pick_jobs
            and self.max_jobs - self.job_counter >= self._refill_min
        ):
            self._refill = self.loop.create_task(self._refill_slots())

    async def _refill_slots(self) -> None:
        try:
            while self._backlog and self.allow_pick_jobs:
                if self.max_jobs - self.job_counter < self._refill_min:
                    break
                # The queue's head holds the jobs running here too: read past them. (Jobs
                # running on other workers can fill the head too; if they leave nothing
                # to start, the backlog ends and arq's poll, which reads further, goes on.)
                free = self.max_jobs - self.job_counter
                ids = await self.pool.zrangebyscore(
                    self.queue_name, min=float("-inf"), max=CLOCK.now_ms(), start=0,
                    num=self.job_counter + 4 * free,
                )  # fmt: skip
                await self.start_jobs(ids)
        except (redis.exceptions.RedisError, OSError) as e:
            log.debug("could not refill the free slots (%s); the next poll will", e)
        finally:
            self._refill = None

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """Start the due jobs of one read of the queue (arq's poll, or a refill). A
        backlog is when every free slot could be filled: more are likely waiting."""
        async with self._take_lock:
            free = self.max_jobs - self.job_counter
            if free <= 0:
                return
            if CLOCK.offset_ms > BEHIND_MS and len(job_ids) < self.queue_read_limit:
                # This machine's clock is behind Redis': arq read the queue by it, and
                # missed the jobs due by Redis' clock, which every script goes by.
                job_ids = await self.pool.zrangebyscore(
                    self.queue_name, min=float("-inf"), max=CLOCK.now_ms(), start=0,
                    num=self.queue_read_limit,
                )  # fmt: skip
            ids = [i for i in (j.decode() for j in job_ids) if i not in self.tasks]
            self._backlog = await self._take(ids) >= free

    async def _take(self, ids: list[str]) -> int:
        """Take and start ``ids`` (as many as there are free slots); how many started."""
        free = self.max_jobs - self.job_counter
        if free <= 0 or not ids or not self.allow_pick_jobs:
            return 0
        deliverer = job_context(self.ctx).deliverer
        taken, expired = await deliverer.take(ids, free)
        for job_id in expired:
            if self.on_expired is not None:
                self.on_expired(job_id)
        for job in taken:
            await self.sem.acquire()
            self.job_counter += 1
            t = self.loop.create_task(self._run(deliverer, job))
            t.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            t.add_done_callback(self.job_done)
            t.add_done_callback(self._ended)
            self.tasks[job.ref.job_id] = t
        return len(taken)

    async def _run(self, deliverer: Deliverer, job: Taken) -> None:
        if self.hooks is not None:
            self.hooks.started({})
        try:
            outcome = await deliverer.run(job)
        except asyncio.CancelledError:
            raise
        except BaseException:
            self.jobs_failed += 1
            raise
        finally:
            if self.hooks is not None:
                self.hooks.ended({})
        if outcome == "retried":
            self.jobs_retried += 1
        else:
            self.jobs_complete += 1

    def job_done(self, task: asyncio.Task[Any]) -> None:
        """Read how a job's run ended, so that a failure of arq's own — Redis went away
        before or after the job function ran — is logged briefly (once per kind every
        10 s), not as "Task exception was never retrieved" with a traceback per job.
        The job itself is safe: it runs again once its in-progress mark expires."""
        if task.cancelled() or task.exception() is None:
            return
        e = task.exception()
        throttle = getattr(self, "_failed_runs", None)
        if throttle is None:
            throttle = self._failed_runs = Throttle(10.0)
        held_back = throttle.allow(type(e).__name__)
        if held_back is None:
            return
        log.warning(
            "a delivery job's run failed in the scheduler (%s: %s)%s; it runs again once "
            "its in-progress mark expires",
            type(e).__name__,
            e,
            f" (and {held_back} more like it)" if held_back else "",
        )


@dataclass(frozen=True, slots=True)
class WorkerHooks:
    """What the role hears from arq: a job started, ended, or expired unrun."""

    started: Callable[[dict[Any, Any]], None]
    ended: Callable[[dict[Any, Any]], None]
    expired: Callable[[str], None]


def new_worker(
    config: Config,
    pool: ArqRedis,
    context: JobContext,
    hooks: WorkerHooks,
    *,
    timeout: float,
    burst: bool,
) -> BatchStartWorker:
    """arq's worker for the delivery queue, set up as the module docstring says."""
    w = config.worker
    worker = BatchStartWorker(
        functions=[
            func(
                deliver,
                name=jobs.DELIVER_FUNCTION,
                timeout=timeout,
                max_tries=MAX_PICKUPS,
                keep_result=0,
            )
        ],
        queue_name=Keys(config.redis.key_prefix).queue,
        redis_pool=pool,
        burst=burst,
        handle_signals=False,
        job_completion_wait=int(w.shutdown_grace),
        max_jobs=w.max_jobs,
        job_timeout=timeout,
        keep_result=0,
        poll_delay=w.poll_delay,
        queue_read_limit=w.queue_read_limit,
        max_tries=MAX_PICKUPS,
        ctx={CTX_KEY: context},
        job_serializer=jobs.serialize,
        job_deserializer=jobs.deserialize,
        log_results=False,
    )
    worker.on_expired = hooks.expired
    worker.hooks = hooks
    # arq would hold a job in progress for the job timeout + 10 s; a live worker renews
    # the mark instead (relay.delivery.heartbeat), so a dead one's jobs run again sooner.
    worker.in_progress_timeout_s = heartbeat.HOLD_S
    return worker
