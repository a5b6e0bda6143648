"""The delivery loop: take due jobs while this worker has free slots → run → finish.

Deliveries are arq jobs, in arq's queue and job format (:mod:`relay.store.jobs`): arq's
own tools read them, and any arq worker could run them. The loop that runs them is the
relay's own, on arq's public surface only (its key prefixes):

- **Take** (``take.lua``, one call per read of the queue): arq's checks — due by Redis'
  clock, not in progress on any worker — its in-progress mark with the run's fencing
  token, and the claim. A delivery whose sink has no free slot (its ``concurrency``), or
  whose breaker lets nothing through, is set aside in the sink's waiting set, once,
  instead of being put off and read again and again (``lib/wait.lua``); it comes back
  with a slot reserved when one frees. One of a paced sink (``rate``) with no token is
  put back in the queue once, due at its own turn (``lib/rate.lua``).
- **Run** each taken job as its own task, up to ``worker.max_jobs`` at once
  (:meth:`Deliverer.run <relay.delivery.deliverer.Deliverer.run>`); its finish is
  group-committed with its neighbours'. A finish that frees a slot hands it to the
  sink's first waiting delivery, which this worker starts at once (:meth:`start_now`).
- **Wake**, rather than poll: a message on the wake channel (``ingest.lua`` queued work;
  a sweep gave waiting deliveries their slots), a slot freeing while more is due, or the
  queue's next due time (a retry) — and at the latest every ``worker.poll_delay``. A
  message that names its jobs (a small ingest batch) has them taken at once
  (:meth:`start_now`), without a read of the queue, and beside a read in flight: new
  work never waits behind a read that is setting a large backlog aside.
- **Sweep**, every :data:`SWEEP_S`: slots no finish freed (a lapsed lease, a reload, an
  open breaker's wait over) go to the waiting deliveries (``sweep.lua``).

A Redis fault ends :meth:`DeliveryLoop.run` with the error; the worker role
(:mod:`relay.delivery.role`) lets the running jobs end and starts a fresh loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis.exceptions
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from relay.config import Config, WorkerConfig
from relay.keys import Keys
from relay.logs import Throttle
from relay.store.clock import CLOCK

if TYPE_CHECKING:
    from relay.delivery.deliverer import Deliverer
    from relay.delivery.steps import Taken

log = logging.getLogger(__name__)

JOB_MARGIN_S = 3.0  # a run's budget = the longest sink timeout + this
SWEEP_S = 0.5  # how often a worker looks for slots that freed without a finish
LISTEN_RETRY_S = (0.5, 10.0)  # first and longest wait before listening again
CLOSE_S = 1.0  # bound on closing the wake channel's connection (its server may be gone)
READ_AT_LEAST = 100  # a read of the queue looks this far past the jobs running here
NEWEST = 100  # a read also looks at this many of the newest due jobs, and offers them first


def job_timeout(config: Config) -> float:
    """A run's budget: well past every sink's HTTP timeout."""
    longest = max((s.timeout for t in config.tenants for s in t.sinks), default=10.0)
    return longest + JOB_MARGIN_S


@dataclass(frozen=True, slots=True)
class LoopHooks:
    """What the role hears from the loop: a job started, ended, or expired unrun."""

    started: Callable[[], None]
    ended: Callable[[], None]
    expired: Callable[[str], None]


class DeliveryLoop:
    """One worker's scheduler over the delivery queue (the module docstring says how)."""

    def __init__(
        self, client: Redis, deliverer: Deliverer, keys: Keys, worker: WorkerConfig,
        hooks: LoopHooks,
    ) -> None:  # fmt: skip
        self._redis = client
        self._deliverer = deliverer
        self._keys = keys
        self._hooks = hooks
        self.max_jobs = worker.max_jobs
        self._poll_s = worker.poll_delay
        self._read_limit = worker.queue_read_limit or max(worker.max_jobs, READ_AT_LEAST)
        self._grace_s = worker.unknown_sink_grace
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.jobs_complete = 0
        self.jobs_retried = 0
        self.jobs_failed = 0
        self.allow_pick_jobs = True
        self._wake = asyncio.Event()
        self._take_lock = asyncio.Lock()  # one read's take at a time
        self._reserved = 0  # slots promised to takes in flight (a read's, and start_now's)
        self._now: list[str] = []  # jobs to start at once, in the next take
        self._now_task: asyncio.Task[None] | None = None
        self._backlog = False  # the last take filled every free slot: more may be due
        self._refill_min = max(1, self.max_jobs // 8)
        self._failed_runs = Throttle(10.0)
        self._unknown_since: dict[str, float] = {}  # waiting sinks this worker does not know

    @property
    def free(self) -> int:
        """Slots no run holds and no take in flight may fill."""
        return self.max_jobs - len(self.tasks) - self._reserved

    def wake(self) -> None:
        """Read the queue now (work was queued)."""
        self._wake.set()

    def stop_picking(self) -> None:
        """No job starts here any more: not by a read of the queue or :meth:`start_now`
        (a take waiting for its turn does nothing)."""
        self.allow_pick_jobs = False
        self._backlog = False
        self._now.clear()
        self._wake.set()

    async def end_takes(self, timeout: float) -> None:
        """After :meth:`stop_picking` on a loop that failed: let a take of named jobs in
        flight end (at most ``timeout``), else cancel it — its jobs are then held by
        their marks and run again once those expire — so that none starts in a loop
        that is being given up."""
        task = self._now_task
        if task is None or task.done():
            return
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
            await asyncio.wait({task}, timeout=CLOSE_S)

    async def takes_done(self) -> None:
        """Wait for the takes in flight: their jobs are started and tracked once they
        return."""
        async with self._take_lock:
            pass
        if self._now_task is not None:
            await asyncio.wait({self._now_task})

    async def run(self) -> None:
        """Take and start due jobs until :meth:`stop_picking`; raises on a Redis fault."""
        helpers = [
            asyncio.create_task(self._listen(), name="worker-wake"),
            asyncio.create_task(self._sweeps(), name="worker-sweep"),
        ]
        try:
            while self.allow_pick_jobs:
                self._wake.clear()
                next_due_ms, passed = await self._read()
                wait = self._poll_s
                if next_due_ms is not None:
                    wait = min(wait, max(0.0, (next_due_ms - CLOCK.now_ms()) / 1000))
                if self._backlog and (self.free >= self._refill_min or passed):
                    # slots freed while the take ran, or it passed over jobs it may set
                    # aside with no slot: read again at once
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
        finally:
            for t in helpers:
                t.cancel()
            # bounded: a helper's clean-up must never hold up the loop's end
            await asyncio.wait(helpers, timeout=CLOSE_S)

    async def _read(self) -> tuple[int | None, bool]:
        """Read the queue's due jobs and take what this worker has slots for; the next
        due time after now (Redis' clock, ms), if any, and whether the take passed over
        jobs it may set aside once it had set as many aside as one take does.

        The newest due jobs are read too, and offered first: a large due backlog (a
        worker that was down, a backfill) is set aside a read at a time, and new work
        must not wait behind it until it all is. A read that found as many due jobs as
        it could read reads again at once."""
        async with self._take_lock:
            now = CLOCK.now_ms()
            head = len(self.tasks) + self._read_limit
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zrangebyscore(self._keys.queue, "-inf", now, start=0, num=head)
                pipe.zrevrangebyscore(self._keys.queue, now, "-inf", start=0, num=NEWEST)
                pipe.zrangebyscore(
                    self._keys.queue, f"({now}", "+inf", start=0, num=1, withscores=True
                )
                due, newest, later = await pipe.execute()
            # a few slots stay for start_now's takes meanwhile (new work named to us)
            room = min(self._refill_min, self.free // 4)
            more = False
            if self.free - room <= 0:
                self._backlog = bool(due)
            else:
                found = [j.decode() for j in reversed(newest)] + [j.decode() for j in due]
                ids = [i for i in dict.fromkeys(found) if i not in self.tasks]
                started, handled, could, more = await self._take(ids, room)
                # more due than one read saw, and this read set some aside, or it passed
                # over some once it had set enough aside: read on
                self._backlog = more or started >= could or (len(due) >= head and handled > started)
        return (int(later[0][1]) if later else None), more

    def start_now(self, job_id: str) -> None:
        """Start ``job_id`` (due now) at once, with the same checks as a read's jobs. The
        ids asked for while a take runs go together in the next one (a batch of finishes
        queues many at once). A job another worker took meanwhile is left alone; one
        this worker has no slot for waits for the next read."""
        if not self.allow_pick_jobs:
            return
        self._now.append(job_id)
        if self._now_task is None:
            self._now_task = asyncio.get_running_loop().create_task(self._start_asked())

    def adopt(self, job: Taken) -> None:
        """Run ``job``, which a finish took for this worker (``finish_batch.lua``'s
        chain): it takes over the slot of the run that finished."""
        self._start(job)

    def _start(self, job: Taken) -> None:
        self._hooks.started()
        t = asyncio.get_running_loop().create_task(self._run(job))
        self.tasks[job.ref.job_id] = t
        t.add_done_callback(functools.partial(self._ended, job.ref.job_id))

    async def _start_asked(self) -> None:
        """Take the jobs :meth:`start_now` was asked for — beside a read's take, if one is
        in flight (each has its own slots: :attr:`free`)."""
        ids: list[str] = []
        try:
            ids, self._now = self._now, []
            ids = [i for i in dict.fromkeys(ids) if i not in self.tasks]
            started, handled, could, more = await self._take(ids)
            if more or started == could < len(ids):
                # no slot for some: the next free one reads again (and so does the loop
                # now, should a read beside this take have cleared the flag)
                self._backlog = True
                self._wake.set()
            if handled > started:
                self._wake.set()  # some put off or set aside: a read learns the next due time
        except (redis.exceptions.RedisError, OSError) as e:
            # The next read starts them: they are in the queue, due.
            log.debug("could not start %d job(s) at once (%s); the next read will", len(ids), e)
            self._wake.set()
        finally:
            self._now_task = None
        if self._now and self.allow_pick_jobs:
            self._now_task = asyncio.get_running_loop().create_task(self._start_asked())

    async def _take(self, ids: list[str], room: int = 0) -> tuple[int, int, int, bool]:
        """Take and start ``ids`` (as many as there are free slots, less ``room``); how
        many started, how many the take handled (started, put off or set aside), how
        many it could have started, and whether it passed over some of ``ids`` once it
        had set aside as many as one take does (they are still due in the queue). Its
        slots are reserved while it runs, so that another take beside it cannot fill
        them too."""
        could = self.free - room
        if could <= 0 or not ids or not self.allow_pick_jobs:
            return 0, 0, max(could, 0), False
        self._reserved += could
        try:
            taken, expired, handled, more = await self._deliverer.take(ids, could)
        finally:
            self._reserved -= could
        for job_id in expired:
            self._hooks.expired(job_id)
        for job in taken:
            self._start(job)
        return len(taken), handled, could, more

    async def _run(self, job: Taken) -> None:
        try:
            outcome = await self._deliverer.run(job)
        except asyncio.CancelledError:
            raise
        except BaseException:
            self.jobs_failed += 1
            raise
        if outcome == "retried":
            self.jobs_retried += 1
        else:
            self.jobs_complete += 1

    def _ended(self, job_id: str, task: asyncio.Task[None]) -> None:
        """A run ended: forget it, log a failure of its own briefly, and while there is a
        backlog read the queue again once an eighth of ``max_jobs`` is free."""
        if self.tasks.get(job_id) is task:
            del self.tasks[job_id]
        self._hooks.ended()
        self.job_done(task)
        if self._backlog and self.allow_pick_jobs and self.free >= self._refill_min:
            self._wake.set()

    def job_done(self, task: asyncio.Task[Any]) -> None:
        """Read how a run ended, so that a failure around the job — Redis went away before
        or after the delivery — is logged briefly (once per kind every 10 s), not as
        "Task exception was never retrieved" with a traceback per job. The job itself is
        safe: it runs again once its in-progress mark expires."""
        if task.cancelled() or task.exception() is None:
            return
        e = task.exception()
        held_back = self._failed_runs.allow(type(e).__name__)
        if held_back is None:
            return
        log.warning(
            "a delivery job's run failed in the scheduler (%s: %s)%s; it runs again once "
            "its in-progress mark expires",
            type(e).__name__,
            e,
            f" (and {held_back} more like it)" if held_back else "",
        )

    async def _listen(self) -> None:
        """Wake the loop on every message of the wake channel, or start the jobs a message
        names (:meth:`start_now`); listen again after a fault (meanwhile the loop reads the
        queue every ``poll_delay``)."""
        wait = LISTEN_RETRY_S[0]
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._keys.wake)
                wait = LISTEN_RETRY_S[0]
                self._wake.set()  # anything queued while not listening
                async for message in pubsub.listen():
                    named = message.get("data")
                    if isinstance(named, bytes) and named:
                        for job_id in named.decode().split("\n"):
                            self.start_now(job_id)
                    else:
                        self._wake.set()
            except (redis.exceptions.RedisError, OSError) as e:
                log.debug("worker: not listening for new work (%s); again in %.1fs", e, wait)
            finally:
                await _close(pubsub)
            await asyncio.sleep(wait * (1 + random.random() / 4))
            wait = min(wait * 2, LISTEN_RETRY_S[1])

    async def _sweeps(self) -> None:
        """Every :data:`SWEEP_S`, give waiting deliveries the slots that freed without a
        finish (``sweep.lua``). A waiting sink this worker has not known for
        ``worker.unknown_sink_grace`` (it was removed) has its deliveries put back in the
        queue, where a take ends them."""
        while True:
            await asyncio.sleep(SWEEP_S)
            if not self.allow_pick_jobs:
                continue
            now = time.monotonic()
            release = [m for m, t in self._unknown_since.items() if now - t >= self._grace_s]
            try:
                unknown = await self._deliverer.sweep(release)
            except (redis.exceptions.RedisError, OSError) as e:
                log.debug("worker: sweep failed (%s); the next one will", e)
                continue
            self._unknown_since = {m: self._unknown_since.get(m, now) for m in unknown}


async def _close(pubsub: PubSub) -> None:
    """Close the wake channel's connection, bounded: after a failover its server may
    never answer again."""
    try:
        await asyncio.wait_for(pubsub.aclose(), CLOSE_S)  # type: ignore[no-untyped-call]
    except (TimeoutError, redis.exceptions.RedisError, OSError) as e:
        log.debug("worker: the wake channel's connection did not close cleanly (%r)", e)
