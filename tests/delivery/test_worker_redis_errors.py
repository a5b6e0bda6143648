"""The worker outlives Redis refusing writes (out of memory with ``noeviction``): it logs
why, backs off, polls again, and delivers once Redis accepts writes again."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest
import redis.exceptions
from redis.asyncio import Redis

from relay.delivery.role import WorkerRole
from relay.store.embedded import EmbeddedRedis
from tests.support.common import wait_for
from tests.support.delivery import Sink, config_with, drained, ingest, runtime, sink_conf, sinks


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
                with pytest.raises(redis.exceptions.OutOfMemoryError):
                    await client.set("probe", "x")  # Redis is full indeed
                assert not task.done(), "the worker role ended on a Redis write error"
                # The delivery scripts are allow-oom: a full Redis still delivers (and so
                # frees memory); only ingest is refused.
                await wait_for(lambda: sorted(s.ids()) == ["e1", "e2"], 30)
                await wait_for(lambda: drained(client), 10)
                assert not task.done()
                # the loop itself writes only through the allow-oom scripts: no fault
                assert not [r for r in caplog.records if r.name == "relay.delivery.role"]
            finally:
                await client.config_set("maxmemory", "0")
                await role.stop()
                await task
    finally:
        await client.aclose()
