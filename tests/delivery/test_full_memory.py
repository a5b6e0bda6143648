"""A Redis at ``maxmemory`` (``noeviction``) refuses new events (503, so Chert retries)
but keeps delivering: the scripts that let a backlog drain are ``allow-oom``, so the
memory the backlog holds comes free as the sink takes it, and ingest is accepted again —
without anyone raising ``maxmemory``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from relay.errors import RedisUnavailableError
from relay.store.embedded import EmbeddedRedis
from tests.support.common import TENANT, wait_for
from tests.support.delivery import Received, Sink, config_with, runtime, sink_conf, sinks, worker
from tests.support.delivery import event as make_event

BIG = "x" * 20_000  # each event stores ~20 KB


async def test_a_full_redis_drains_its_backlog_and_takes_events_again(
    make_redis_server: Callable[[], Awaitable[EmbeddedRedis]],
) -> None:
    server = await make_redis_server()
    url = server.url
    redis = Redis.from_url(url)
    up = asyncio.Event()

    delivered: set[str] = set()

    async def sink(s: Sink, r: Received) -> tuple[int, dict[str, str]]:
        if not up.is_set():
            return 503, {}
        delivered.add(r.event_id)
        return 200, {}

    try:
        async with sinks(Sink(sink)) as (s,):
            # the sink's breaker opens while it is down; it probes again soon (the
            # breaker is not what this test is about)
            cfg = config_with(
                url,
                [sink_conf("s", s.url, max_attempts=1000, max_age=3600)],
                retry_backoff_max=0.2,
                breaker_cooldown=0.5,
            )
            rt = runtime(redis, cfg)
            used = int((await redis.info("memory"))["used_memory"])
            await redis.config_set("maxmemory", used + 2_000_000)
            accepted: list[str] = []
            refused = 0

            async def offer(i: int) -> bool:
                ev = make_event(f"e{i}")
                ev = ev._replace(body=ev.body[:-1] + b',"pad":"' + BIG.encode() + b'"}')
                try:
                    await rt.ingestor.ingest(TENANT, ev, "webhook")
                except RedisUnavailableError:
                    return False
                accepted.append(f"e{i}")
                return True

            async with worker(rt):
                i = 0
                while refused < 3 and i < 2000:  # the sink is down: fill Redis
                    if not await offer(i):
                        refused += 1
                    i += 1
                assert refused == 3, "Redis never filled up"
                # Firmly over the limit (as after a restart with less memory): nothing
                # that writes without allow-oom runs until the backlog has shrunk.
                now_used = int((await redis.info("memory"))["used_memory"])
                await redis.config_set("maxmemory", now_used - 300_000)
                assert await offer(i) is False  # full: new events are refused (503)
                up.set()  # the sink comes back while Redis is still full
                await wait_for(lambda: set(accepted) <= delivered, 60)
                # the backlog drained, its memory came free: events are taken again
                await wait_for(lambda: offer(10_000 + i), 30)
                await wait_for(lambda: f"e{10_000 + i}" in delivered, 30)
            assert await redis.config_get("maxmemory") == {"maxmemory": str(now_used - 300_000)}
    finally:
        await redis.aclose()
