"""New work reaches a worker by message (``ingest.lua``'s wake channel): a small batch's
message names its jobs, and a worker takes them at once, without reading the queue and
beside a read in flight, never starting more than ``max_jobs`` at a time."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis

from relay.keys import Keys
from tests.support.common import TENANT, wait_for
from tests.support.delivery import (
    Received,
    Sink,
    config_with,
    drained,
    event,
    ingest,
    runtime,
    sink_conf,
    sinks,
    worker,
)

KEYS = Keys("chert-relay")


async def _messages(redis: Redis, act: Any, expect: int) -> list[bytes]:
    """The wake channel's messages while ``act()`` runs, once ``expect`` have come."""
    got: list[bytes] = []
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(KEYS.wake)
    try:
        await act()
        async with asyncio.timeout(10):
            while len(got) < expect:
                message = await pubsub.get_message(timeout=1.0)
                if message is not None:
                    got.append(message["data"])
    finally:
        await pubsub.aclose()
    return got


async def test_a_small_batchs_wake_message_names_its_jobs_and_a_large_ones_does_not(
    redis: Redis, redis_url: str
) -> None:
    few = config_with(redis_url, [sink_conf(f"s{k}", f"http://127.0.0.1:9/{k}") for k in range(2)])
    rt = runtime(redis, few)
    (named,) = await _messages(redis, lambda: ingest(rt, ["e1"]), 1)
    assert sorted(named.decode().split("\n")) == [
        KEYS.job_id(TENANT, "s0", "e1"),
        KEYS.job_id(TENANT, "s1", "e1"),
    ]
    # one event for 40 sinks is one batch of 40 jobs: the message only wakes the workers
    many = config_with(
        redis_url, [sink_conf(f"s{k}", f"http://127.0.0.1:9/{k}") for k in range(40)]
    )
    rt = runtime(redis, many)
    assert await _messages(
        redis, lambda: rt.ingestor.ingest(TENANT, event("e2"), "webhook"), 1
    ) == [b""]


async def _reads(redis: Redis) -> int:
    """How many reads of the queue's newest due jobs (the delivery loop's alone) Redis has
    served."""
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_zrevrangebyscore", {}).get("calls", 0))


async def test_named_jobs_start_without_a_read_of_the_queue(redis: Redis, redis_url: str) -> None:
    async with sinks(Sink()) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url)], poll_delay="60s")
        rt = runtime(redis, cfg)
        async with worker(rt):
            await wait_for(lambda: _subscribed(redis), 10)
            before = await _reads(redis)
            for n in range(5):  # one batch at a time, each delivered before the next
                await ingest(rt, [f"n{n}"])
                await wait_for(lambda n=n: len(s.ids()) == n + 1, 10)
            await wait_for(lambda: drained(redis), 10)
            # a read per batch before; now at most the one listening began with
            assert await _reads(redis) - before <= 1
        assert s.ids() == [f"n{n}" for n in range(5)]


async def _subscribed(redis: Redis) -> bool:
    ((_, n),) = await redis.pubsub_numsub(KEYS.wake)
    return int(n) >= 1


async def test_takes_beside_a_read_never_start_more_than_max_jobs(
    redis: Redis, redis_url: str
) -> None:
    async def slow(_s: Sink, _r: Received) -> tuple[int, dict[str, str]]:
        await asyncio.sleep(0.01)
        return 200, {}

    async with sinks(Sink(slow)) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, concurrency=64)], max_jobs=4)
        rt = runtime(redis, cfg)
        queued = [f"q{i:03d}" for i in range(150)]
        await ingest(rt, queued)  # read by the loop
        named = [f"n{i:03d}" for i in range(150)]
        most = 0
        async with worker(rt) as role:

            async def watch() -> None:
                nonlocal most
                while True:
                    most = max(most, len(role.loop.tasks))
                    await asyncio.sleep(0)  # every turn of the event loop

            watcher = asyncio.create_task(watch())
            for i in range(0, len(named), 3):  # named, a few at a time, while reads run
                await ingest(rt, named[i : i + 3])
            await wait_for(lambda: len(set(s.ids())) == len(queued) + len(named), 60)
            await wait_for(lambda: drained(redis), 10)
            watcher.cancel()
        # a finish's chained job takes over its run's slot just before that run ends
        assert most <= 4 + 1
        assert sorted(s.ids()) == sorted(queued + named)  # each once
