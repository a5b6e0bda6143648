"""The worker outlives a Redis restart: it polls again, and deliveries resume."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.exceptions
from redis.asyncio import Redis

from relay.store.embedded import EmbeddedRedis
from tests.support.common import wait_for
from tests.support.delivery import (
    Sink,
    config_with,
    ingest,
    runtime,
    sink_conf,
    sinks,
    worker,
)


async def test_worker_survives_a_redis_restart(
    make_redis_server: Callable[[], Awaitable[EmbeddedRedis]], tmp_path: Path
) -> None:
    server = await make_redis_server()
    client: Redis = Redis.from_url(server.url)
    try:
        async with sinks(Sink()) as (s,):
            cfg = config_with(server.url, [sink_conf("s", s.url)])
            rt = runtime(client, cfg)
            async with worker(rt) as role:
                await ingest(rt, ["before"])
                await wait_for(lambda: s.ids() == ["before"], 10)
                server.kill()
                await server.start()  # same port, same data

                async def ingested() -> bool:
                    try:
                        await ingest(rt, ["after"])
                    except (redis.exceptions.ConnectionError, OSError):
                        return False
                    return True

                await wait_for(ingested, 10)
                await wait_for(lambda: s.ids() == ["before", "after"], 20)
                assert role.loop is not None
    finally:
        await client.aclose()
