"""A worker sets a large backlog aside over several reads of the queue, one take's worth
each (``ASIDE_PER_TAKE``), and reads again at once while a take passes over jobs it could
set aside — even with fewer free slots than it waits for before reading again after a
run ends, since setting a delivery aside takes no slot."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from relay.delivery.steps import ASIDE_PER_TAKE
from relay.keys import Keys
from relay.store.sinks import SinkSwitch
from tests.support.common import TENANT, wait_for
from tests.support.delivery import (
    Received,
    Reply,
    Sink,
    config_with,
    ingest,
    runtime,
    sink_conf,
    sinks,
    waiting_is,
    worker,
)

KEYS = Keys("chert-relay")


async def test_a_nearly_full_worker_sets_a_large_backlog_aside_without_waiting_for_a_poll(
    redis: Redis, redis_url: str
) -> None:
    release = asyncio.Event()

    async def hang(_sink: Sink, _r: Received) -> Reply:
        await release.wait()
        return 200, {}

    async with sinks(Sink(behaviour=hang)) as (h,):
        # 15 of the worker's 16 slots held by requests that hang; a paused sink's backlog
        # of four takes' worth, queued before the worker starts (no wake message names
        # them: reads find them). The poll is 30 s: only reading again at once sets the
        # backlog aside within the wait below.
        cfg = config_with(
            redis_url,
            [
                sink_conf("h", h.url, concurrency=15, events=["h.*"], timeout=60),
                sink_conf("b", h.url, events=["b.*"]),
            ],
            max_jobs=16,
            poll_delay=30,
        )
        rt = runtime(redis, cfg)
        await SinkSwitch(redis, KEYS).pause(TENANT, "b")
        backlog = [f"b{i:03d}" for i in range(4 * ASIDE_PER_TAKE)]
        await ingest(rt, [f"h{i:02d}" for i in range(15)], event_type="h.x")
        await ingest(rt, backlog, event_type="b.x")
        async with worker(rt):
            try:
                await wait_for(lambda: waiting_is(redis, "b", len(backlog)), 15)
                await wait_for(lambda: len(h.received) == 15, 15)
            finally:
                release.set()
