"""The worker outlives Redis refusing writes (out of memory with ``noeviction``): it logs
why, backs off, polls again, and delivers once Redis accepts writes again."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest
from redis.asyncio import Redis

from relay.delivery.role import WorkerRole
from relay.keys import Keys
from relay.store.embedded import EmbeddedRedis
from tests.support.common import wait_for
from tests.support.delivery import Sink, config_with, ingest, runtime, sink_conf, sinks


async def drained(client: Redis) -> bool:
    return await client.zcard(Keys("chert-relay").queue) == 0


async def test_worker_keeps_going_while_redis_is_out_of_memory(
    make_redis_server: Callable[[], Awaitable[EmbeddedRedis]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="relay.delivery.role")
    server = await make_redis_server()  # private: the CONFIG change cannot leak
    client: Redis = Redis.from_url(server.url)
    try:
        async with sinks(Sink()) as (s,):
            cfg = config_with(server.url, [sink_conf("s", s.url)])
            rt = runtime(client, cfg)
            await ingest(rt, ["e1", "e2"])
            await client.config_set("maxmemory", "1")  # full, noeviction: writes fail (OOM)
            role = WorkerRole(rt)
            await role.start()
            task = asyncio.create_task(role.run())
            try:

                def oom_logged() -> bool:
                    return any(
                        r.name == "relay.delivery.role" and "out of memory" in r.getMessage()
                        for r in caplog.records
                    )

                await wait_for(oom_logged, 10)
                assert not task.done(), "the worker role ended on a Redis write error"
                # The delivery scripts are allow-oom: a full Redis still delivers (and so
                # frees memory); only ingest is refused.
                await wait_for(lambda: sorted(s.ids()) == ["e1", "e2"], 30)
                await wait_for(lambda: drained(client), 10)
                assert not task.done()
            finally:
                await client.config_set("maxmemory", "0")
                await role.stop()
                await task
    finally:
        await client.aclose()
