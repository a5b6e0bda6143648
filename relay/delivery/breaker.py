"""Per-sink circuit breakers, kept in Redis so every worker process shares them.

A breaker is one hash per (tenant, sink):

- ``s``: ``o`` open, ``h`` half-open (absent or ``c``: closed)
- ``u``: while open, the time (unix ms) it may let a probe through
- ``p``, ``pu``: the half-open probe's job id and the end of its lease (unix ms)
- ``w``, ``cf``, ``cs``, ``pf``, ``ps``: the judgement's window — the number of the
  current bucket (``breaker_window`` long), the failed and the successful attempts
  counted in it, and those of the bucket before

Closed, every attempt that ends counts in the window: a failure (connection error,
timeout, 408/425/429/5xx) or a success (any 2xx — or any answer that shows the sink is
alive, such as a 400). A failure opens the breaker once, over the last
``breaker_window`` (the current bucket plus the share of the previous one it still
covers), at least ``breaker_failures`` attempts failed and they were at least
``breaker_failure_rate`` of the attempts. A rate, not a run of consecutive failures: a
sink where a minority of requests time out — and their timeouts end together, in a
run — keeps its breaker closed, while one that answers nothing opens it after
``breaker_failures`` failures.

Open, due deliveries are put off until ``u`` (plus a little jitter, so they do not all
return at once) without an HTTP call. After that the first one through becomes the
probe (half-open) while the others keep waiting; the probe's success closes the breaker
with a fresh window, its failure opens it for another cooldown. Attempts that were
already in flight when it opened change nothing. A probe that never reports (its worker
died) loses its lease after the sink's timeout and another job probes.

The checks and updates are Lua functions (``relay/store/lua/lib/breaker.lua``) that
the delivery's scripts use, so admitting a delivery, taking its in-flight slot and
counting its attempt happen in one atomic step. The finish that changes a breaker says
so, and the worker logs it: opened (WARNING, with the counts and the last error),
half-open (INFO, when the probe goes), opened again (WARNING), closed (INFO).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from redis import Redis as SyncRedis
from redis.asyncio import Redis

from relay.config import WorkerConfig
from relay.keys import Keys
from relay.logs import Throttle

log = logging.getLogger(__name__)

# Numeric values of the ``chert_relay_breaker_state`` gauge.
CLOSED, HALF_OPEN, OPEN = 0, 1, 2
STATE_NAMES = {CLOSED: "closed", HALF_OPEN: "half_open", OPEN: "open"}
TTL_MS = 86_400_000  # an idle breaker's record goes away a day after its last attempt


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


# A probe goes every breaker_cooldown (2 s) while a sink fails: its lines are throttled.
PROBE_LOG_EVERY_S = 60.0
_PROBES = Throttle(PROBE_LOG_EVERY_S)
_REOPENS = Throttle(PROBE_LOG_EVERY_S)


def log_change(tenant: str, sink: str, change: str, error: str, worker: WorkerConfig) -> None:
    """Log what a finish did to the breaker of ``tenant``/``sink``: ``change`` is
    ``finish.lua``'s (``open <failed> <attempts>``, ``reopen`` or ``close``) and ``error``
    the attempt's, the last error."""
    what, *counts = change.split()
    if what == "open" and len(counts) == 2:
        log.warning(
            "breaker of sink %s/%s opened: %s of %s attempts failed in the last %gs, last "
            "error: %s; its deliveries wait %gs, then one goes as a probe",
            tenant,
            sink,
            counts[0],
            counts[1],
            worker.breaker_window,
            error or "none",
            worker.breaker_cooldown,
        )
        _PROBES.forget((tenant, sink))
        _REOPENS.forget((tenant, sink))
    elif what == "reopen":
        held_back = _REOPENS.allow((tenant, sink))
        if held_back is None:
            return
        log.warning(
            "breaker of sink %s/%s opened again: the probe failed (%s)%s; the next one in %gs",
            tenant,
            sink,
            error or "no error text",
            f", as {held_back} more did since the last line" if held_back else "",
            worker.breaker_cooldown,
        )
    elif what == "close":
        log.info("breaker of sink %s/%s closed: the probe succeeded", tenant, sink)
        _PROBES.forget((tenant, sink))
        _REOPENS.forget((tenant, sink))


def log_probe(tenant: str, sink: str, attempt: int) -> None:
    """The breaker of ``tenant``/``sink`` is half-open: this worker sends its probe. (A
    probe goes every ``breaker_cooldown`` while the sink fails: these lines, and those of
    failed probes, come at most once a minute per sink.)"""
    if _PROBES.allow((tenant, sink)) is None:
        return
    log.info(
        "breaker of sink %s/%s half-open: one delivery goes as a probe (its attempt %d)",
        tenant,
        sink,
        attempt,
    )
