"""A sink's next delivery claimed ahead (``finish_batch.lua``'s reserve): a run whose
sink has deliveries waiting holds the next one, claimed but without a slot, and starts
it on its own slot the moment its attempt succeeds; its finish passes the slot's lease
on. The sink never gets more than its ``concurrency`` at once, and a reserve that is
not used goes back with its attempt not counted."""

from __future__ import annotations

import asyncio

from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis

from relay.delivery.heartbeat import Running
from relay.delivery.reserves import Reserves
from relay.delivery.steps import Ref, Steps, Taken
from relay.keys import Keys
from tests.support.common import TENANT, wait_for
from tests.support.delivery import (
    Received,
    Sink,
    config_with,
    drained,
    ingest,
    runtime,
    sink_conf,
    sinks,
    worker,
)

KEYS = Keys("chert-relay")


async def _marks(redis: Redis) -> set[str]:
    """The job ids marked in progress."""
    found = redis.scan_iter(match=in_progress_key_prefix + "*")
    return {k.decode().removeprefix(in_progress_key_prefix) async for k in found}


async def test_a_run_holds_the_next_delivery_ahead_and_hands_it_its_slot(
    redis: Redis, redis_url: str
) -> None:
    gates = {2: asyncio.Event(), 3: asyncio.Event()}

    async def waits(sink: Sink, _got: Received) -> tuple[int, dict[str, str]]:
        gate = gates.get(len(sink.received))
        if gate is not None:
            await gate.wait()
        return 200, {}

    async def leased() -> set[str]:
        return {m.decode() for m in await redis.zrange(KEYS.inflight(TENANT, "s"), 0, -1)}

    async with sinks(Sink(waits)) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, concurrency=1)])
        rt = runtime(redis, cfg)
        ids = [f"r{i}" for i in range(6)]
        await ingest(rt, ids)
        async with worker(rt):
            await wait_for(lambda: len(s.received) == 2, 10)
            # the second delivery holds the one slot; a third is claimed ahead of it,
            # marked in progress, with no slot of its own
            second = KEYS.job_id(TENANT, "s", s.received[1].event_id)
            assert await leased() == {second}
            ahead = await _marks(redis) - {second}
            assert len(ahead) == 1
            # nor an attempt counted: a worker that died now would leave it untried
            [ahead_id] = ahead
            record = KEYS.attempts(TENANT, "s", ahead_id.rsplit(":", 1)[1])
            assert await redis.hget(record, "a") is None
            gates[2].set()
            # it goes the moment the second succeeds, and the second's finish passes
            # the slot's lease on to it
            await wait_for(lambda: len(s.received) == 3, 10)
            assert {KEYS.job_id(TENANT, "s", s.received[2].event_id)} == ahead

            async def handed_over() -> bool:
                return await leased() == ahead

            await wait_for(handed_over, 10)
            assert await redis.hget(record, "a") == b"1"  # counted as the slot passed on
            gates[3].set()
            await wait_for(lambda: drained(redis), 10)
        assert sorted(s.ids()) == ids
        assert s.max_running == 1
        assert [r.attempt for r in s.received] == [1] * len(ids)


async def test_a_reserve_goes_back_uncounted_when_the_attempt_before_it_fails(
    redis: Redis, redis_url: str
) -> None:
    async def second_fails(sink: Sink, _got: Received) -> tuple[int, dict[str, str]]:
        return (503, {}) if len(sink.received) == 2 else (200, {})

    async with sinks(Sink(second_fails)) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, concurrency=1)])
        rt = runtime(redis, cfg)
        ids = [f"f{i}" for i in range(6)]
        await ingest(rt, ids)
        async with worker(rt):
            await wait_for(lambda: drained(redis), 20)
        assert sorted(set(s.ids())) == ids
        assert s.max_running == 1
        failed = s.received[1].event_id
        # the delivery held ahead of the failed attempt was not tried then: its first
        # attempt is its first, and only the failed one was tried twice
        for event_id in ids:
            got = [r.attempt for r in s.for_event(event_id)]
            assert got == ([1, 2] if event_id == failed else [1]), (event_id, got)


async def test_a_worker_that_stops_gives_its_reserve_back(redis: Redis, redis_url: str) -> None:
    go_on = asyncio.Event()

    async def second_waits(sink: Sink, _got: Received) -> tuple[int, dict[str, str]]:
        if len(sink.received) == 2:
            await go_on.wait()
        return 200, {}

    async with sinks(Sink(second_waits)) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, concurrency=1)])
        rt = runtime(redis, cfg)
        ids = [f"s{i}" for i in range(5)]
        await ingest(rt, ids)
        async with worker(rt) as role:
            await wait_for(lambda: len(s.received) == 2, 10)
            second = KEYS.job_id(TENANT, "s", s.received[1].event_id)
            [ahead] = await _marks(redis) - {second}
            stopping = asyncio.create_task(role.stop())
            await wait_for(lambda: role.deliverer is not None and role.deliverer.draining, 10)
            go_on.set()
            await stopping
        # the worker stopped after the second, without starting the one it held ahead:
        # that one is queued again, untried, its mark gone
        assert len(s.received) == 2
        assert ahead not in await _marks(redis)
        event_id = ahead.rsplit(":", 1)[1]
        assert await redis.hget(KEYS.attempts(TENANT, "s", event_id), "a") is None
        async with worker(rt):
            await wait_for(lambda: drained(redis), 10)
        assert sorted(s.ids()) == ids
        assert [r.attempt for r in s.received] == [1] * len(ids)


async def test_a_reserve_that_comes_after_its_runs_end_goes_back(
    redis: Redis, redis_url: str
) -> None:
    # the run waiting for its reserve was cancelled (its time was up, or the worker
    # stopped past its grace) before the finish that claimed the reserve answered
    cfg = config_with(redis_url, [sink_conf("s", "http://127.0.0.1:9/hook")])
    running: dict[str, Running] = {}
    requeued: list[str] = []

    def hold(job: Taken) -> Taken:
        running[job.ref.job_id] = Running(job.ref.job_id, job.ref.token)
        return job

    reserves = Reserves(Steps(redis, KEYS, cfg.worker), running, hold, requeued.append)
    holder = Ref(TENANT, "s", "h1", KEYS.job_id(TENANT, "s", "h1"), None, "f.1.1")
    ahead = Ref(TENANT, "s", "a1", KEYS.job_id(TENANT, "s", "a1"), None, "f.1.r1")
    await redis.set(KEYS.job_in_progress(ahead.job_id), ahead.token)
    owed = reserves.expect(holder)
    waiting = asyncio.create_task(reserves.take(holder))
    await asyncio.sleep(0)  # a turn of the loop: the run now waits for its reserve
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert reserves.settle(owed, holder.job_id, (holder.job_id, Taken(ahead, None))) is None

    async def given_back() -> bool:
        return await redis.get(KEYS.job_in_progress(ahead.job_id)) is None

    await wait_for(given_back, 10)
    await reserves.drain()
    assert requeued == [ahead.job_id]
    assert ahead.job_id not in running
