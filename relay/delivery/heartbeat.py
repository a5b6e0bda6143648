"""A worker's heartbeat: short holds on the deliveries it runs, renewed while it lives.

arq marks a job in progress for ``in_progress_timeout_s`` (by default the job timeout +
10 s, 23 s here) and a delivery's HTTP attempt leases one of its sink's in-flight slots
for about as long. Held that long, a SIGKILLed worker's deliveries waited 18-23 s
before another worker ran them, and its slots stayed taken as long. Instead, both holds
last :data:`HOLD_S` and a live worker renews those of every job it is running every
:data:`BEAT_S` (``renew.lua``): a dead worker's deliveries run again, and its slots come
free, within :data:`HOLD_S`, while a live worker's are never taken from it unless its
event loop (or Redis) stalls for ``HOLD_S - BEAT_S`` — then a delivery may run twice
(at least once is kept; that is all that is risked).

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

log = logging.getLogger(__name__)

HOLD_S = 10.0  # arq's in-progress mark and an attempt's in-flight lease, from each renewal
BEAT_S = 2.0  # how often a live worker renews them
_CHUNK = 500  # jobs per renewal call


@dataclass(frozen=True, slots=True)
class Running:
    """A job this worker runs: its in-flight and breaker keys while it is attempting."""

    job_id: str
    inflight: str = ""
    breaker: str = ""


class Heartbeat:
    """Renews this worker's holds every :data:`BEAT_S` until cancelled."""

    def __init__(self, client: Redis, running: dict[str, Running]) -> None:
        self._renew = scripts.script("renew").bind(client)
        self._running = running
        self._trouble: float | None = None  # since when renewals have failed (monotonic)

    async def beat(self) -> int:
        """Renew once; how many in-progress marks were renewed."""
        jobs = list(self._running.values())
        renewed = 0
        for i in range(0, len(jobs), _CHUNK):
            rest: list[str] = []
            for r in jobs[i : i + _CHUNK]:
                rest += [r.job_id, in_progress_key_prefix + r.job_id, r.inflight, r.breaker]
            renewed += int(
                await self._renew(
                    keys={},
                    args={"now": int(time.time() * 1000), "hold_ms": int(HOLD_S * 1000)},
                    rest=rest,
                )
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
