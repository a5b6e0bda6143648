"""One clock: a worker whose machine's clock is off by minutes still finds the jobs that
are due, and never takes in-flight slots other workers still hold — every due time,
lease and deadline is Redis' clock (lua/lib/clock.lua). The worker runs under
libfaketime (Debian's faketime), its clock 10 minutes behind or ahead."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import pytest
from redis.asyncio import Redis

from tests.support.common import wait_for
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

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def skewed(offset: str) -> dict[str, str]:
    """The environment that puts a process's clock ``offset`` (e.g. "-600s") off."""
    lib = LIBFAKETIME if LIBFAKETIME.exists() else None
    if lib is None:
        found = shutil.which("faketime")
        assert found, "libfaketime is missing: apt-get install faketime"
        lib = next(Path("/usr/lib").rglob("libfaketime.so.1"))
    return {
        "LD_PRELOAD": str(lib),
        "FAKETIME": offset,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",  # asyncio's timers keep real time
        "FAKETIME_NO_CACHE": "1",
    }


@pytest.mark.parametrize("offset", ["-600s", "+600s"])
async def test_a_worker_with_a_skewed_clock_delivers(
    redis: Redis, redis_url: str, tmp_path: Path, offset: str
) -> None:
    async with sinks(Sink()) as (s,):
        sink_list = [sink_conf("s", s.url)]
        rt = runtime(redis, config_with(redis_url, sink_list))
        async with worker_process(tmp_path, redis_url, sink_list, env=skewed(offset)) as proc:
            await ingest(rt, ["k1", "k2", "k3"])
            await wait_for(lambda: sorted(s.ids()) == ["k1", "k2", "k3"], 30)
            await wait_for(lambda: "Redis' clock" in proc.log, 30)  # and it says so
    word = "behind" if offset.startswith("-") else "ahead of"
    said = re.search(rf"clock is (\d+\.\d)s {word} Redis' clock", proc.log)
    assert said is not None
    assert 590 <= float(said[1]) <= 610


async def test_a_worker_ahead_never_takes_slots_still_held(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    # Two workers share a sink capped at 2 in flight; one's clock is 10 minutes ahead.
    # Were leases judged by the worker's clock, it would find every slot expired and
    # start more than 2 at once.
    async def slow(s: Sink, r: Received) -> tuple[int, dict[str, str]]:
        await asyncio.sleep(0.2)  # the sink's own pace, not a synchronization
        return 200, {}

    ids = [f"c{i}" for i in range(30)]
    async with sinks(Sink(slow)) as (s,):
        sink_list = [sink_conf("s", s.url, concurrency=2)]
        rt = runtime(redis, config_with(redis_url, sink_list))
        async with (
            worker_process(tmp_path, redis_url, sink_list, env=skewed("+600s")),
            worker(rt),
        ):
            await ingest(rt, ids)
            await wait_for(lambda: set(s.ids()) == set(ids), 60)
    assert s.max_running <= 2
