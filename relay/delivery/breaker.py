"""Per-sink circuit breakers, kept in Redis so every worker process shares them.

A breaker is one hash per (tenant, sink) — absent while the sink is healthy:

- ``s``: ``o`` open, ``h`` half-open (absent or ``c``: closed)
- ``f``: consecutive failed attempts (connection errors, timeouts, 408/425/429/5xx)
- ``u``: while open, the time (unix ms) it may let a probe through
- ``p``, ``pu``: the half-open probe's job id and the end of its lease (unix ms)

Closed, every due delivery goes ahead; ``breaker_failures`` consecutive failures open
it. Open, due deliveries are put off until ``u`` (plus a little jitter, so they do not
all return at once) without an HTTP call. After that the first one through becomes the
probe (half-open) while the others keep waiting; the probe's success closes the
breaker, its failure opens it for another cooldown. Any 2xx — or any answer that shows
the sink is alive, such as a 400 — closes it. A probe that never reports (its worker
died) loses its lease after the sink's timeout and another job probes.

The checks and updates are Lua functions (``relay/store/lua/lib/breaker.lua``) that
the delivery's scripts use, so admitting a delivery, taking its in-flight slot and
counting its attempt happen in one atomic step.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from redis import Redis as SyncRedis
from redis.asyncio import Redis

from relay.keys import Keys

# Numeric values of the ``chert_relay_breaker_state`` gauge.
CLOSED, HALF_OPEN, OPEN = 0, 1, 2
STATE_NAMES = {CLOSED: "closed", HALF_OPEN: "half_open", OPEN: "open"}
TTL_MS = 86_400_000  # an idle breaker's record goes away a day after its last failure


def _state(fields: list[bytes | None], now_ms: float) -> int:
    s = fields[0]
    if s == b"o":
        until = float(fields[1] or 0)
        return OPEN if now_ms < until else HALF_OPEN
    if s == b"h":
        return HALF_OPEN
    return CLOSED


async def states(
    redis_client: Redis, keys: Keys, sinks: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], int]:
    """The breaker state of each ``(tenant, sink)``: CLOSED, HALF_OPEN or OPEN."""
    pairs = list(sinks)
    async with redis_client.pipeline(transaction=False) as pipe:
        for tenant, sink in pairs:
            pipe.hmget(keys.breaker(tenant, sink), ["s", "u"])
        found = await pipe.execute()
    now = time.time() * 1000
    return {pair: _state(f, now) for pair, f in zip(pairs, found, strict=True)}


def states_sync(
    redis_client: SyncRedis, keys: Keys, sinks: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], int]:
    """:func:`states` for a scrape-time collector (blocking client, short timeout)."""
    pairs = list(sinks)
    with redis_client.pipeline(transaction=False) as pipe:
        for tenant, sink in pairs:
            pipe.hmget(keys.breaker(tenant, sink), ["s", "u"])
        found = pipe.execute()
    now = time.time() * 1000
    return {pair: _state(f, now) for pair, f in zip(pairs, found, strict=True)}
