"""A worker's heartbeat: short holds on the deliveries it runs, renewed while it lives.

arq marks a job in progress for ``in_progress_timeout_s`` (by default the job timeout +
10 s, 23 s here) and a delivery's HTTP attempt leases one of its sink's in-flight slots
for about as long. Held that long, a SIGKILLed worker's deliveries waited 18-23 s
before another worker ran them, and its slots stayed taken as long. Instead, both holds
last :data:`HOLD_S` and a live worker renews those of every job it is running every
:data:`BEAT_S` (``renew.lua``): a dead worker's deliveries run again, and its slots come
free, within :data:`HOLD_S`, while a live worker's are never taken from it unless its
event loop (or Redis) stalls for ``HOLD_S - BEAT_S`` — then a delivery may run twice
(at least once is kept; that is all that is risked). The holds are fenced: a run's
in-progress mark holds its token, and a worker that comes back from such a stall finds
another token (or none), renews nothing of it and drops the job from its list; its
finish then changes nothing either (``lib/finish.lua``) — a stall costs a duplicate
delivery, never an event.

:func:`census` tells a starting worker what it inherits: deliveries marked in progress
by other workers (alive, or dead and about to expire) and in-flight leases held — not
those of the jobs the worker itself has started meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Container
from dataclasses import dataclass

import redis.exceptions
from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis

from relay.config import Config
from relay.keys import Keys
from relay.store import scripts
from relay.store.clock import CLOCK

log = logging.getLogger(__name__)

HOLD_S = 10.0  # arq's in-progress mark and an attempt's in-flight lease, from each renewal
BEAT_S = 2.0  # how often a live worker renews them
_CHUNK = 500  # jobs per renewal call


@dataclass(frozen=True, slots=True)
class Running:
    """A job this worker runs: its in-flight and breaker keys while it is attempting."""

    job_id: str
    token: str  # the run's fencing token (take.lua)
    inflight: str = ""
    breaker: str = ""


class Heartbeat:
    """Renews this worker's holds every :data:`BEAT_S` until cancelled."""

    def __init__(self, client: Redis, running: dict[str, Running]) -> None:
        self._renew = scripts.script("renew").bind(client)
        self._running = running
        self._trouble: float | None = None  # since when renewals have failed (monotonic)
        self._absent: set[str] = set()  # jobs found without a mark at the last beat

    async def beat(self) -> int:
        """Renew once; how many in-progress marks were renewed. A job whose mark no
        longer holds its run's token is dropped from the running list (and logged)."""
        jobs = list(self._running.values())
        renewed = 0
        taken: list[str] = []
        absent: set[str] = set()
        for i in range(0, len(jobs), _CHUNK):
            rest: list[str] = []
            for r in jobs[i : i + _CHUNK]:
                mark = in_progress_key_prefix + r.job_id
                rest += [r.job_id, r.token, mark, r.inflight, r.breaker]
            sent = time.time()
            n, other, none, redis_ms = await self._renew(
                keys={}, args={"hold_ms": int(HOLD_S * 1000)}, rest=rest
            )
            CLOCK.observe(int(redis_ms), sent, time.time())
            renewed += int(n)
            taken += [_text(j) for j in other]
            absent.update(_text(j) for j in none)
        # A run that has just finished deleted its own mark: a missing mark means a lost
        # hold only if the run is still listed at the next beat too.
        lost = taken + [j for j in absent & self._absent if j in self._running]
        self._absent = absent
        for job_id in lost:
            self._running.pop(job_id, None)
        if lost:
            log.warning(
                "worker heartbeat: %d running deliver%s lost %s hold (this worker was paused "
                "or its loop blocked for more than %.0fs); another worker may run them "
                "again, and their outcome here will not be recorded",
                len(lost),
                "y" if len(lost) == 1 else "ies",
                "its" if len(lost) == 1 else "their",
                HOLD_S,
            )
        return renewed

    async def run(self) -> None:
        while True:
            await asyncio.sleep(BEAT_S)
            await self.step()

    async def step(self) -> None:
        """One beat, and what it means for the log: a warning when holds on running
        deliveries could not be renewed, a line when renewing them works again. With
        nothing to renew, nothing was at stake: neither trouble nor a recovery."""
        holding = len(self._running)
        try:
            async with asyncio.timeout(BEAT_S):
                await self.beat()
        except Exception as e:  # the heartbeat must outlive any one failure
            if self._trouble is None and holding:
                log.warning(
                    "worker heartbeat: could not renew the holds on %d running deliveries "
                    "(%s: %s); after %.0fs another worker may run them too",
                    holding,
                    type(e).__name__,
                    e,
                    HOLD_S,
                    exc_info=not isinstance(e, redis.exceptions.RedisError | OSError),
                )
                self._trouble = time.monotonic()
            return
        if self._trouble is not None and holding:
            log.info(
                "worker heartbeat: renewed the holds on %d running deliveries again, %.0fs "
                "after renewing first failed",
                holding,
                time.monotonic() - self._trouble,
            )
            self._trouble = None


@dataclass(frozen=True, slots=True)
class Inherited:
    """What a starting worker finds held by others."""

    in_progress: int  # deliveries marked in progress by some worker
    leases: int  # in-flight slots leased, over every configured sink
    sinks: int  # sinks with at least one lease


async def census(
    client: Redis,
    config: Config,
    mine: Container[str] = (),
    settle: Callable[[], Awaitable[None]] | None = None,
) -> Inherited:
    """Count the in-progress marks of this relay's jobs and the live in-flight leases,
    but for those of the jobs in ``mine``: the census runs beside the worker's start, and
    the jobs the worker starts meanwhile are its own, not inherited. ``settle`` waits for
    the worker's take in flight, if any, so that a mark or lease it made, found here,
    is in ``mine`` before the jobs are told apart."""
    keys = Keys(config.redis.key_prefix)
    skip = len(in_progress_key_prefix)
    match = f"{in_progress_key_prefix}{config.redis.key_prefix}:*"
    marked = [_text(key)[skip:] async for key in client.scan_iter(match=match, count=1000)]
    now = int(time.time() * 1000)
    held = [
        [_text(m) for m in await client.zrangebyscore(keys.inflight(t.slug, s.name), now, "+inf")]
        for t in config.tenants
        for s in t.sinks
    ]
    if settle is not None:
        await settle()
    leases = [sum(m not in mine for m in members) for members in held]
    return Inherited(sum(j not in mine for j in marked), sum(leases), sum(n > 0 for n in leases))


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


async def log_census(
    client: Redis,
    config: Config,
    mine: Container[str] = (),
    settle: Callable[[], Awaitable[None]] | None = None,
) -> Inherited | None:
    """Log what a starting worker inherits (nothing if Redis cannot say); ``mine`` and
    ``settle``: the jobs it has started meanwhile (see :func:`census`)."""
    with contextlib.suppress(redis.exceptions.RedisError, OSError):
        found = await census(client, config, mine, settle)
        if found.in_progress or found.leases:
            log.info(
                "worker: found %d deliveries in progress elsewhere and %d in-flight lease(s) "
                "on %d sink(s); those of a worker that died run again (and their slots come "
                "free) within %.0fs",
                found.in_progress,
                found.leases,
                found.sinks,
                HOLD_S,
            )
        else:
            log.info("worker: no deliveries in progress elsewhere, no in-flight leases")
        return found
    return None
