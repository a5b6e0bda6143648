"""The worker's batched job start keeps arq's rules: a job runs on one worker at a time,
and not before it is due."""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

import pytest
import redis.exceptions as redis_errors
from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis

from relay.keys import JOB_KEY_PREFIX, Keys
from tests.support.common import TENANT, wait_for
from tests.support.delivery import (
    Sink,
    config_with,
    ingest,
    runtime,
    sink_conf,
    sinks,
    worker,
)


def job_id(event_id: str) -> str:
    return Keys("chert-relay").job_id(TENANT, "s", event_id)


async def test_jobs_in_progress_elsewhere_or_not_due_are_not_started(
    redis: Redis, redis_url: str
) -> None:
    q = Keys("chert-relay").queue
    async with sinks(Sink()) as (s,):
        rt = runtime(redis, config_with(redis_url, [sink_conf("s", s.url)]))
        await ingest(rt, ["j1", "j2", "j3"])
        await redis.set(in_progress_key_prefix + job_id("j1"), b"1", px=60_000)  # elsewhere
        await redis.zadd(q, {job_id("j2"): (time.time() + 3600) * 1000})  # due in an hour
        async with worker(rt) as role:
            await wait_for(lambda: s.ids() == ["j3"])
            await wait_for(lambda: role.loop.jobs_complete == 1)
        assert s.ids() == ["j3"]
        assert await redis.zscore(q, job_id("j1")) is not None
        assert await redis.zscore(q, job_id("j2")) is not None
        await redis.delete(in_progress_key_prefix + job_id("j1"))  # the other worker died
        async with worker(rt):
            await wait_for(lambda: s.ids() == ["j3", "j1"])


async def test_a_job_whose_key_expired_is_reported_not_dropped_silently(
    redis: Redis, redis_url: str
) -> None:
    q = Keys("chert-relay").queue
    async with sinks(Sink()) as (s,):
        rt = runtime(redis, config_with(redis_url, [sink_conf("s", s.url)]))
        await ingest(rt, ["x1", "x2"])
        await redis.delete(JOB_KEY_PREFIX + job_id("x1"))  # as if its TTL ran out
        async with worker(rt):
            await wait_for(lambda: s.ids() == ["x2"])
            await wait_for(lambda: 'outcome="expired",sink="s"' in rt.metrics.render().decode())
        assert await redis.zscore(q, job_id("x1")) is None


async def test_a_job_run_arq_fails_is_logged_briefly_and_its_exception_retrieved(
    redis: Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Redis went away under arq's own calls around a job: the run's task ends with a
    # ConnectionError. It is read and logged once, not "never retrieved" per job.
    loop = asyncio.get_running_loop()
    unretrieved: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: unretrieved.append(ctx))

    async def fails() -> None:
        raise redis_errors.ConnectionError("Connection closed by server.")

    try:
        async with sinks(Sink()) as (s,):
            rt = runtime(redis, config_with(redis_url, [sink_conf("s", s.url)]))
            async with worker(rt) as role:
                for _ in range(20):
                    t = loop.create_task(fails())
                    t.add_done_callback(role.loop.job_done)
                    await asyncio.wait({t})
                    del t
                gc.collect()
        warned = [r for r in caplog.records if "failed in the scheduler" in r.getMessage()]
        assert len(warned) == 1
        assert "ConnectionError: Connection closed by server." in warned[0].getMessage()
        assert unretrieved == []
    finally:
        loop.set_exception_handler(None)
