"""Deliveries claimed ahead: each run's reserve, from the finish that claims it to the
moment the run uses it or gives it back.

A sink at its ``concurrency`` cap with deliveries waiting gets a slot's worth of work
only as fast as a run's finish comes back from Redis and the next claim with it: at
16 slots and a sink answering in 20 ms, that round trip was a quarter of each slot's
time. So a finish that chains the sink's next delivery onto the freed slot
(``finish_batch.lua``) also claims the one after it *ahead* — its in-progress mark and
its attempt, but no slot — for the run that now holds the slot (the holder). When the
holder's attempt succeeds, the worker starts the reserve at once on the holder's slot,
and the holder's finish passes the slot's lease on to it (``lib/finish.lua``'s
handoff): the sink never has more than its cap in flight, and the next request goes
while the finish is still on its way. The reserve's claim counts no attempt: the holder's
finish counts it as it hands the slot over. A holder whose attempt fails (the breaker
may be about to open), or that ends any other way, gives its reserve back
(``unreserve.lua``): it is queued again, due, in its place in the sink's line, and a
take is asked for it at once. One the worker could not give back (it died, or Redis
did not answer) runs again once its in-progress mark expires, its attempts as before.

Two things go past the sink's state in the moment: a reserve started when its holder
succeeds goes even if the sink was paused, or its breaker opened on other slots'
failures, since it was claimed — at most one per slot (``concurrency``), as attempts
already in flight finish — and one whose holder's finish fails (Redis away, or the
holder was taken over after a stall) runs without a lease of its own.

A reserve is asked for only for sinks without ``ordering`` (a chat's next event waits
for its finish) or ``rate`` (its turns are the pace's), and never while the worker
stops. Reserves are held by the heartbeat like any started job: a worker that dies
holding one lets it run elsewhere once its mark expires.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import redis.exceptions

from relay.delivery.heartbeat import Running
from relay.delivery.steps import Ref, Steps, Taken

log = logging.getLogger(__name__)

GIVE_BACK_S = 0.5  # bound on giving a reserve back (its mark expires otherwise)


class Reserves:
    """The reserves a worker's runs are owed or hold, by the holder's job id.

    ``hold(job)`` takes a claimed reserve into the worker's hands (its heartbeat renews
    it) and returns it — or, if its claim found the delivery over (a dead letter to
    record, no slot needed), runs it at once and returns None."""

    def __init__(
        self,
        steps: Steps,
        running: dict[str, Running],
        hold: Callable[[Taken], Taken | None],
        requeued: Callable[[str], None],
    ) -> None:
        self._steps = steps
        self._running = running
        self._hold = hold
        self._requeued = requeued  # a reserve went back: take it now
        self._owed: dict[str, asyncio.Future[Taken | None]] = {}
        self._giving_back: set[asyncio.Task[None]] = set()

    def expect(self, holder: Ref) -> asyncio.Future[Taken | None]:
        """A finish on its way may claim a reserve for ``holder``'s run."""
        owed = asyncio.get_running_loop().create_future()
        self._owed[holder.job_id] = owed
        return owed

    def settle(
        self, owed: asyncio.Future[Taken | None], holder: str, got: tuple[str, Taken] | None
    ) -> tuple[str, Taken] | None:
        """The finish expected by :meth:`expect` answered with ``got`` (a reserve and
        its holder's job id, or None): ``holder``'s run is owed it if it is its own; what
        is left, for another holder."""
        if got is not None and got[0] == holder:
            reserve = self._hold(got[1])
            if not owed.done():
                owed.set_result(reserve)
            elif reserve is not None:  # its holder's run is over
                self._later(reserve)
            return None
        if not owed.done():
            owed.set_result(None)
        return got

    def give(self, holder: str, got: tuple[str, Taken] | None) -> tuple[str, Taken] | None:
        """A job the worker starts now (a finish chained it) is ``holder``: it gets the
        reserve in ``got`` if that is its own; what is left."""
        if got is None or got[0] != holder:
            return got
        owed = asyncio.get_running_loop().create_future()
        owed.set_result(self._hold(got[1]))
        self._owed[holder] = owed
        return None

    async def left_over(self, got: tuple[str, Taken] | None) -> None:
        """A reserve claimed for no run of this worker's goes back."""
        if got is not None:
            reserve = self._hold(got[1])
            if reserve is not None:
                await self.give_back(reserve)

    def owed(self, holder: Ref) -> bool:
        return holder.job_id in self._owed

    async def take(self, holder: Ref) -> Taken | None:
        """The reserve claimed for ``holder``'s run, once the finish that claims it has
        answered; None if none was asked for (or none could be claimed)."""
        owed = self._owed.pop(holder.job_id, None)
        if owed is None:
            return None
        try:
            return await asyncio.shield(owed)
        except asyncio.CancelledError:
            owed.add_done_callback(self._arrived_late)  # the run is over: it goes back
            raise

    def _arrived_late(self, owed: asyncio.Future[Taken | None]) -> None:
        if not owed.cancelled() and (reserve := owed.result()) is not None:
            self._later(reserve)

    async def drop(self, holder: Ref) -> None:
        """Give back ``holder``'s reserve, if it has one."""
        reserve = await self.take(holder)
        if reserve is not None:
            await self.give_back(reserve)

    def drop_later(self, holder: Ref) -> None:
        """:meth:`drop`, in the background (``holder``'s run is over: cancelled or
        failed)."""
        self._background(self.drop(holder))

    def _later(self, reserve: Taken) -> None:
        self._background(self.give_back(reserve))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._giving_back.add(task)
        task.add_done_callback(self._giving_back.discard)

    async def drain(self) -> None:
        """Wait for the reserves being given back (the worker stops)."""
        while self._giving_back:
            await asyncio.wait(set(self._giving_back))

    async def give_back(self, job: Taken) -> None:
        """Give back a reserve this worker will not start (``unreserve.lua``)."""
        self._running.pop(job.ref.job_id, None)
        try:
            async with asyncio.timeout(GIVE_BACK_S):
                back = await self._steps.unreserve(job.ref)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as e:
            # its mark, no longer renewed, lets it run again once it expires
            log.debug("could not give back reserve %s (%s)", job.ref.job_id, e)
            return
        if back:
            self._requeued(job.ref.job_id)
