"""A paced sink's claims, script by script (``lua/lib/rate.lua``): one take of a due
backlog starts the burst, promises each of the next deliveries its own turn, one
interval apart and at most the horizon ahead, and sets the rest aside in order; a turn
moves the delivery's deadline back by its wait; a Retry-After puts every turn off."""

from __future__ import annotations

from itertools import pairwise

from redis.asyncio import Redis

from relay.delivery.limits import SinkTable
from relay.delivery.steps import Go, Parked, Steps
from relay.keys import Keys
from tests.support.common import TENANT
from tests.support.delivery import config_with, ingest, runtime, sink_conf

KEYS = Keys("chert-relay")
URL = "http://127.0.0.1:9/"


async def test_one_take_of_a_backlog_promises_turns_an_interval_apart(
    redis: Redis, redis_url: str
) -> None:
    cfg = config_with(redis_url, [sink_conf("s", URL, rate="10/s")])  # 100 ms apart
    ids = [f"t{i:02d}" for i in range(40)]
    await ingest(runtime(redis, cfg), ids)
    steps = Steps(redis, KEYS, cfg.worker)
    jobs = [KEYS.job_id(TENANT, "s", i) for i in ids]
    taken, _, _ = await steps.take(jobs, SinkTable(cfg, lambda _: True).claim_limits, 100, 10_000)
    went = [t for t in taken if isinstance(t.claim, Go)]
    assert len(went) == 2  # the burst: 1 + max(1, 10/s x 50 ms)
    parked = [t.claim for t in taken if isinstance(t.claim, Parked)]
    assert {p.reason for p in parked} == {"rate"}
    turns = [p.wait_ms for p in parked if p.wait_ms is not None]
    # each its own turn, one interval after the last, none past the 2 s horizon
    assert turns == sorted(turns)
    assert all(b - a == 100 for a, b in pairwise(turns))
    assert 0 < turns[0] <= 100
    assert turns[-1] <= 2000
    assert len(turns) >= 19
    # the rest wait set aside, in the order they were queued
    aside = [m.decode() for m in await redis.zrange(KEYS.waiting(TENANT, "s"), 0, -1)]
    assert aside == [
        t.ref.job_id for t in taken if isinstance(t.claim, Parked) and t.claim.wait_ms is None
    ]
    assert len(went) + len(turns) + len(aside) == len(ids)
    # a turn is due in the queue then, and its deadline moved back by as long
    first = next(t for t in taken if isinstance(t.claim, Parked) and t.claim.wait_ms)
    event_id = first.ref.event_id
    dl = int(await redis.hget(KEYS.attempts(TENANT, "s", event_id), "dl") or 0)
    held = int(await redis.hget(KEYS.attempts(TENANT, "s", event_id), "held") or 0)
    assert isinstance(first.claim, Parked)
    assert held == first.claim.wait_ms
    assert isinstance(went[0].claim, Go)  # the events came in within the same second
    assert abs(dl - held - went[0].claim.deadline_ms) < 1000
    # and it is in the queue, due at its turn (not set aside)
    assert await redis.zscore(KEYS.queue, first.ref.job_id) is not None
    assert await redis.zscore(KEYS.waiting(TENANT, "s"), first.ref.job_id) is None


async def test_a_retry_after_puts_every_turn_off_until_it_passes(
    redis: Redis, redis_url: str
) -> None:
    cfg = config_with(redis_url, [sink_conf("s", URL, rate="10/s")])
    ids = [f"h{i}" for i in range(3)]
    await ingest(runtime(redis, cfg), ids)
    steps = Steps(redis, KEYS, cfg.worker)
    assert await steps.hold_pace(TENANT, "s", 1500, 100.0)
    assert not await steps.hold_pace(TENANT, "s", 1000, 100.0)  # a shorter one changes nothing
    jobs = [KEYS.job_id(TENANT, "s", i) for i in ids]
    taken, _, _ = await steps.take(jobs, SinkTable(cfg, lambda _: True).claim_limits, 10, 10_000)
    waits = [t.claim.wait_ms for t in taken if isinstance(t.claim, Parked) and t.claim.wait_ms]
    assert len(waits) == 3  # none now
    # the first at the hold's end, then the configured pace with no burst
    assert 1400 <= waits[0] <= 1500
    assert [b - a for a, b in pairwise(waits)] == [100, 100]
