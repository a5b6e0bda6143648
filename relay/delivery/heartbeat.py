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
by other workers (alive, or dead and about to expire) and in-flight leases held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
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
        self._trouble = False
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
            try:
                async with asyncio.timeout(BEAT_S):
                    await self.beat()
                if self._trouble:
                    log.info("worker heartbeat: renewing holds again")
                self._trouble = False
            except Exception as e:  # the heartbeat must outlive any one failure
                if not self._trouble:
                    log.warning(
                        "worker heartbeat: could not renew the holds on running deliveries "
                        "(%s: %s); after %.0fs another worker may run them too",
                        type(e).__name__,
                        e,
                        HOLD_S,
                        exc_info=not isinstance(e, redis.exceptions.RedisError | OSError),
                    )
                self._trouble = True


@dataclass(frozen=True, slots=True)
class Inherited:
    """What a starting worker finds held by others."""

    in_progress: int  # deliveries marked in progress by some worker
    leases: int  # in-flight slots leased, over every configured sink
    sinks: int  # sinks with at least one lease


async def census(client: Redis, config: Config) -> Inherited:
    """Count the in-progress marks of this relay's jobs and the live in-flight leases."""
    keys = Keys(config.redis.key_prefix)
    in_progress = 0
    match = f"{in_progress_key_prefix}{config.redis.key_prefix}:*"
    async for _ in client.scan_iter(match=match, count=1000):
        in_progress += 1
    now = int(time.time() * 1000)
    leases = sinks = 0
    for t in config.tenants:
        for s in t.sinks:
            n = int(await client.zcount(keys.inflight(t.slug, s.name), now, "+inf"))
            leases += n
            sinks += 1 if n else 0
    return Inherited(in_progress, leases, sinks)


async def log_census(client: Redis, config: Config) -> Inherited | None:
    """Log what a starting worker inherits (nothing if Redis cannot say)."""
    with contextlib.suppress(redis.exceptions.RedisError, OSError):
        found = await census(client, config)
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


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
