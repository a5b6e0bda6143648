"""Fast and ``always`` polls are incremental: after one full window, each asks only from
the watermark less a few seconds, so a poll's cost follows the event rate, not the rate
times ``overlap``; reconciliation sweeps (and a fast-polling spell's first window) keep
the full overlap."""

from __future__ import annotations

from redis.asyncio import Redis

from relay.ingest.envelope import parse_timestamp
from relay.upstream.tenant_poller import INCREMENTAL_OVERLAP_S
from tests.support.common import TENANT, wait_for
from tests.support.upstream import (
    enqueued,
    expected_jobs,
    relay_config,
    running_relay,
    simulator,
    wait_enqueued,
)


def _lookbacks(sim: object) -> list[float]:
    """For each window's first request: how far before its arrival ``since`` reached."""
    out = []
    for r in sim.api_requests:  # type: ignore[attr-defined]
        if r.path.endswith("/events") and r.tenant == TENANT and "cursor" not in r.query:
            since = parse_timestamp(r.query["since"])
            assert since is not None
            out.append(r.time - since)
    return out


async def test_always_mode_polls_incrementally_after_one_full_window(
    redis_url: str, redis: Redis
) -> None:
    async with simulator() as sim:
        config = relay_config(
            redis_url, sim.base_url, "always", overlap=120.0, reconcile_every=3600.0
        )
        async with running_relay(config):
            rows = []
            for _ in range(4):
                rows += sim.emit(TENANT, count=5)
                await wait_enqueued(redis, rows)
            await wait_for(lambda: len(_lookbacks(sim)) >= 6)
            assert await enqueued(redis) == expected_jobs(rows)
    first, *later = _lookbacks(sim)
    assert first >= 120.0 - 1
    # Every later window reaches back only a few seconds before the newest row it had.
    assert later
    assert all(back < INCREMENTAL_OVERLAP_S + 30 for back in later), later


async def test_fast_polling_is_full_once_then_incremental(redis_url: str, redis: Redis) -> None:
    async with simulator() as sim:
        sim.faults.webhooks_enabled = False
        config = relay_config(redis_url, sim.base_url, "fallback", overlap=120.0, lapse_after=0.5)
        async with running_relay(config):
            rows = []
            for _ in range(4):
                rows += sim.emit(TENANT, count=5)
                await wait_enqueued(redis, rows, timeout=20)
            await wait_for(lambda: len(_lookbacks(sim)) >= 6, 20)
            assert await enqueued(redis) == expected_jobs(rows)
    backs = _lookbacks(sim)
    # The sweep on taking the lease (and the first fast window, if the lapse came after
    # it): the full overlap; every fast window after those two: incremental.
    assert backs[0] >= 120.0 - 1
    assert all(back < INCREMENTAL_OVERLAP_S + 30 for back in backs[2:]), backs
