"""A worker holds its running deliveries briefly and renews the holds while it lives: a
killed worker's deliveries run again (and its in-flight slots come free) within
``heartbeat.HOLD_S``, while a live worker's long attempt is never run twice."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

import pytest
from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis

from relay.delivery import heartbeat
from relay.delivery.role import WorkerRole
from relay.keys import Keys
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


def job_id(event_id: str) -> str:
    return Keys("chert-relay").job_id(TENANT, "s", event_id)


async def test_a_live_workers_long_attempt_keeps_its_holds(
    redis: Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Holds of 0.5 s renewed every 0.1 s; an attempt that takes several holds' time. A
    # second worker must neither run it again nor take the sink's only in-flight slot.
    monkeypatch.setattr(heartbeat, "HOLD_S", 0.5)
    monkeypatch.setattr(heartbeat, "BEAT_S", 0.1)
    release = asyncio.Event()

    async def slow_first(s: Sink, r: Received) -> tuple[int, dict[str, str]]:
        if r.event_id == "long":
            await release.wait()
        return 200, {}

    async with sinks(Sink(slow_first)) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, timeout=10, concurrency=1)])
        rt = runtime(redis, cfg)
        await ingest(rt, ["long"])
        async with worker(rt):
            await wait_for(lambda: s.ids() == ["long"], 10)
            await ingest(rt, ["next"])
            other = WorkerRole(rt)
            await other.start()
            task = asyncio.create_task(other.run())
            try:
                # Four holds' time pass: the in-progress mark is still there, renewed.
                start = time.monotonic()
                await wait_for(lambda: time.monotonic() > start + 2.0, 5)
                pttl = await redis.pttl(in_progress_key_prefix + job_id("long"))
                assert 0 < pttl <= 500
                assert s.ids() == ["long"]
                release.set()
                await wait_for(lambda: sorted(s.ids()) == ["long", "next"], 10)
            finally:
                await other.stop()
                await task
    assert s.ids() == ["long", "next"]
    assert s.max_running == 1


async def test_a_killed_workers_delivery_runs_again_within_the_hold(
    redis: Redis, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hang = asyncio.Event()

    async def hanging(s: Sink, r: Received) -> tuple[int, dict[str, str]]:
        if r.attempt == 1:
            await hang.wait()
        return 200, {}

    async with sinks(Sink(hanging)) as (s,):
        sink_list = [sink_conf("s", s.url, timeout=30, concurrency=1)]
        rt = runtime(redis, config_with(redis_url, sink_list))
        await ingest(rt, ["orphan"])
        async with worker_process(tmp_path, redis_url, sink_list) as proc:
            await wait_for(lambda: s.ids() == ["orphan"], 30)
            proc.signal(signal.SIGKILL)
            await proc.wait()
        # Held for at most HOLD_S (not the job timeout + 10 s = 43 s here).
        assert 0 < await redis.pttl(in_progress_key_prefix + job_id("orphan")) <= 10_000
        caplog.set_level(logging.INFO, logger="relay.delivery.heartbeat")
        async with worker(rt):
            await wait_for(lambda: len(s.ids()) == 2, 30)
        assert s.ids() == ["orphan", "orphan"]  # the killed attempt, then the retry
        assert any(
            "found 1 deliveries in progress elsewhere and 1 in-flight lease(s) on 1 sink(s)"
            in r.getMessage()
            for r in caplog.records
        )
        hang.set()
