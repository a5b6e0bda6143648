"""Shutdown and crashes: in process (grace, then cancel) and as a real ``chert-relay worker``
process that gets SIGTERM (exit 0, running deliveries finish) or SIGKILL (nothing lost)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from relay.delivery.role import WorkerRole
from relay.keys import Keys
from relay.store.backlog import backlog
from tests.support.common import TENANT, wait_for
from tests.support.delivery import (
    Received,
    Sink,
    config_with,
    ingest,
    runtime,
    sink_conf,
    sinks,
    worker,
    worker_process,
)

Q = Keys("chert-relay").queue


def job_id(sink: str, event_id: str) -> str:
    return Keys("chert-relay").job_id(TENANT, sink, event_id)


async def not_queued(redis: Redis, event_id: str) -> bool:
    return await redis.zscore(Q, job_id("s", event_id)) is None


async def queue_empty(redis: Redis) -> bool:
    return await redis.zcard(Q) == 0


async def test_stop_lets_a_running_delivery_finish(redis: Redis, redis_url: str) -> None:
    gate = asyncio.Event()

    async def slow(sink: Sink, got: Received) -> tuple[int, dict[str, str]]:
        await gate.wait()
        return 200, {}

    async with sinks(Sink(slow)) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, timeout=10)], shutdown_grace=20)
        rt = runtime(redis, cfg)
        await ingest(rt, ["a1"])
        role = WorkerRole(rt)
        await role.start()
        task = asyncio.create_task(role.run())
        await wait_for(lambda: s.running == 1)
        stopping = asyncio.create_task(role.stop())
        await wait_for(lambda: not role.loop.allow_pick_jobs)
        await ingest(rt, ["a2"])  # arrives during shutdown: must not be picked
        assert not stopping.done()  # waiting for the running delivery
        gate.set()
        await stopping
        await task
        assert s.ids() == ["a1"]
        assert await redis.zscore(Q, job_id("s", "a1")) is None  # delivered, not re-queued
        assert await redis.zscore(Q, job_id("s", "a2")) is not None  # still queued


async def test_past_the_grace_period_a_delivery_is_cancelled_and_runs_again(
    redis: Redis, redis_url: str
) -> None:
    gate = asyncio.Event()

    async def hang_once(sink: Sink, got: Received) -> tuple[int, dict[str, str]]:
        if len(sink.received) == 1:
            await gate.wait()
        return 200, {}

    async with sinks(Sink(hang_once)) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, timeout=30)], shutdown_grace=0.2)
        rt = runtime(redis, cfg)
        await ingest(rt, ["b1"])
        try:
            async with worker(rt):
                await wait_for(lambda: s.running == 1)
            # stopped: the delivery was cancelled and put back, its slot given back
            assert await redis.zscore(Q, job_id("s", "b1")) is not None
            assert await redis.zcard(rt.keys.inflight(TENANT, "s")) == 0
            assert await redis.hget(rt.keys.attempts(TENANT, "s", "b1"), "a") == b"1"
            async with worker(rt):
                await wait_for(lambda: len(s.received) == 2, 15)
                await wait_for(lambda: not_queued(redis, "b1"))
        finally:
            gate.set()
        assert [r.attempt for r in s.received] == [1, 2]
        assert {r.event_id for r in s.received} == {"b1"}


# A worker process with room for 20 deliveries at once, and time to finish them on SIGTERM.
SHUTDOWN_WORKER: dict[str, Any] = {"max_jobs": 20, "shutdown_grace": 15}


async def test_sigterm_mid_burst_finishes_running_deliveries_and_exits_0(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    async def slow(sink: Sink, got: Received) -> tuple[int, dict[str, str]]:
        await asyncio.sleep(0.3)  # a slow sink, so that deliveries are running at SIGTERM
        return 200, {}

    async with sinks(Sink(slow)) as (s,):
        sink_list = [sink_conf("s", s.url, concurrency=20, timeout=5)]
        rt = runtime(redis, config_with(redis_url, [sink_conf("s", s.url)]))
        ids = [f"t{i:03d}" for i in range(200)]
        await ingest(rt, ids)
        async with worker_process(tmp_path, redis_url, sink_list, **SHUTDOWN_WORKER) as proc:
            await wait_for(lambda: s.running >= 5, 20)
            proc.signal(signal.SIGTERM)
            assert await proc.wait(40) == 0, proc.log
        got = set(s.ids())
        assert 0 < len(got) < 200
        for event_id in got:  # every delivery running at SIGTERM finished and was recorded
            assert await redis.zscore(Q, job_id("s", event_id)) is None
        assert await backlog(redis, Keys("chert-relay")) == 200 - len(got)  # the rest wait
        async with worker(rt):
            await wait_for(lambda: len(s.received) >= 200, 30)
            await wait_for(lambda: queue_empty(redis), 10)
        assert sorted(s.ids()) == ids  # each exactly once


async def test_sigkill_mid_burst_then_restart_loses_nothing(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    async def steady(sink: Sink, got: Received) -> tuple[int, dict[str, str]]:
        await asyncio.sleep(0.02)
        return 200, {}

    async with sinks(Sink(steady)) as (s,):
        sink_list = [sink_conf("s", s.url, concurrency=20, timeout=0.5)]
        rt = runtime(redis, config_with(redis_url, [sink_conf("s", s.url)]))
        ids = [f"k{i:03d}" for i in range(300)]
        await ingest(rt, ids)
        async with worker_process(tmp_path, redis_url, sink_list, **SHUTDOWN_WORKER) as proc:
            await wait_for(lambda: len(s.received) >= 50, 20)
            proc.signal(signal.SIGKILL)
            await proc.wait()
        assert len(s.received) < 300
        async with worker_process(tmp_path, redis_url, sink_list, **SHUTDOWN_WORKER) as proc:
            # jobs the killed worker held run again once arq's in-progress keys expire
            await wait_for(lambda: set(s.ids()) == set(ids), 60)
            await wait_for(lambda: queue_empty(redis), 60)
            proc.signal(signal.SIGTERM)
            assert await proc.wait(40) == 0, proc.log
        assert await redis.zcard(Q) == 0
        extra = len(s.received) - len(ids)
        assert extra <= 20  # only deliveries in flight at the crash were repeated
        for r in s.received:  # and a repeat carries the same webhook-id and body
            assert r.body == next(x.body for x in s.received if x.event_id == r.event_id)
        assert s.bad_signatures == 0
