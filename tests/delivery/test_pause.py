"""A sink an operator paused (``relay.store.sinks``): nothing is sent to it, its
deliveries wait without attempts and do not expire, the pause outlives a worker's
restart, attempts in flight finish, and on resume everything goes, in queue order."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import cast

from redis.asyncio import Redis

from relay.ingest import envelope
from relay.keys import Keys
from relay.runtime import Runtime
from relay.store.backlog import backlog
from relay.store.deadletters import DeadLetterStore, Filter
from relay.store.sinks import SinkSwitch
from tests.support.common import TENANT, wait_for
from tests.support.common import envelope as make_envelope
from tests.support.delivery import (
    Received,
    Sink,
    config_with,
    metric_sum,
    runtime,
    sink_conf,
    sinks,
    waiting_is,
    worker,
)

KEYS = Keys("chert-relay")


async def redis_ms(redis: Redis) -> int:
    seconds, micros = cast(tuple[int, int], await redis.time())
    return int(seconds) * 1000 + int(micros) // 1000


async def past(redis: Redis, at_ms: int) -> None:
    """Wait until Redis' clock (the one deadlines are kept by) is past ``at_ms``."""

    async def passed() -> bool:
        return await redis_ms(redis) > at_ms

    await wait_for(passed, 30, interval=0.05)


async def ingest_now(rt: Runtime, ids: list[str]) -> None:
    """Ingest ``ids`` one by one (queue order is theirs), stamped now: a short max_age
    runs from now, not from the test envelope's fixed date."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    for i in ids:
        body = make_envelope(i, timestamp=stamp)
        await rt.ingestor.ingest(TENANT, envelope.from_object(body), "webhook")


async def deadlines(redis: Redis, sink: str, ids: list[str]) -> list[int]:
    return [int(await redis.hget(KEYS.attempts(TENANT, sink, i), "dl") or 0) for i in ids]


async def test_a_paused_sink_gets_nothing_and_loses_nothing_then_gets_it_all_in_order(
    redis: Redis, redis_url: str
) -> None:
    async with sinks(Sink()) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, concurrency=1, max_age=1)])
        rt = runtime(redis, cfg)
        switch = SinkSwitch(redis, KEYS)
        first = await switch.pause(TENANT, "s")
        again = await switch.pause(TENANT, "s")
        assert first.changed
        assert not again.changed
        assert again.since == first.since
        ids = [f"p{i:02d}" for i in range(8)]
        store = DeadLetterStore(redis, cfg)
        async with worker(rt):
            await ingest_now(rt, ids)
            await wait_for(lambda: waiting_is(redis, "s", len(ids)), 10)
            assert metric_sum(rt.metrics, "chert_relay_sink_paused", sink="s") == 1
            await wait_for(
                lambda: (
                    metric_sum(rt.metrics, "chert_relay_delivery_waits_total", reason="paused")
                    == len(ids)
                ),
                10,
            )
            # past every deadline (max_age 1 s), and several sweeps later: still waiting
            await past(redis, max(await deadlines(redis, "s", ids)) + 1500)
            assert s.received == []
            assert await store.find(Filter()) == []
            for i in ids:
                att = KEYS.attempts(TENANT, "s", i)
                assert await redis.hget(att, "a") is None  # no attempt
                assert await redis.pttl(att) == -1  # kept while it waits
                assert await redis.pttl(KEYS.job(KEYS.job_id(TENANT, "s", i))) == -1
        # a new worker: the pause is in Redis, not in a process
        rt2 = runtime(redis, cfg)
        async with worker(rt2):
            await past(redis, await redis_ms(redis) + 1200)
            assert s.received == []
            assert await waiting_is(redis, "s", len(ids))
            out = await switch.resume(TENANT, "s")
            assert out.changed
            assert out.paused_for is not None
            assert out.paused_for > 1
            assert not (await switch.resume(TENANT, "s")).changed
            await wait_for(lambda: len(s.received) == len(ids), 10)
            await wait_for(lambda: backlog_is_zero(redis), 10)
            assert metric_sum(rt2.metrics, "chert_relay_sink_paused", sink="s") == 0
        assert s.ids() == ids  # in queue order, each once
        assert [r.attempt for r in s.received] == [1] * len(ids)
        assert await store.find(Filter()) == []


async def backlog_is_zero(redis: Redis) -> bool:
    return await backlog(redis, KEYS) == 0


async def test_a_pause_does_not_count_against_the_deadline(redis: Redis, redis_url: str) -> None:
    # The first attempt fails after the resume; its retry still goes, though the event
    # is older than max_age by then: the pause moved the deadline back.
    async def once_503(sink: Sink, r: Received) -> tuple[int, dict[str, str]]:
        return (503, {}) if r.attempt == 1 else (200, {})

    async with sinks(Sink(once_503)) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, max_age=1.5)], retry_backoff=0.05)
        rt = runtime(redis, cfg)
        await SinkSwitch(redis, KEYS).pause(TENANT, "s")
        async with worker(rt):
            await ingest_now(rt, ["d1"])
            await wait_for(lambda: waiting_is(redis, "s", 1), 10)
            (dl,) = await deadlines(redis, "s", ["d1"])
            await past(redis, dl + 1000)
            await SinkSwitch(redis, KEYS).resume(TENANT, "s")
            await wait_for(lambda: [r.attempt for r in s.received] == [1, 2], 10)
            await wait_for(lambda: backlog_is_zero(redis), 10)
        assert await DeadLetterStore(redis, cfg).find(Filter()) == []


async def test_an_attempt_in_flight_when_the_sink_is_paused_finishes(
    redis: Redis, redis_url: str
) -> None:
    go_on = asyncio.Event()

    async def held(sink: Sink, r: Received) -> tuple[int, dict[str, str]]:
        if r.event_id == "f1":
            await go_on.wait()
        return 200, {}

    async with sinks(Sink(held)) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, concurrency=4)])
        rt = runtime(redis, cfg)
        switch = SinkSwitch(redis, KEYS)
        async with worker(rt):
            await ingest_now(rt, ["f1"])
            await wait_for(lambda: s.running == 1, 10)
            await switch.pause(TENANT, "s")
            await ingest_now(rt, ["f2"])
            await wait_for(lambda: waiting_is(redis, "s", 1), 10)
            go_on.set()

            async def f1_done() -> bool:
                return (
                    await redis.zcard(KEYS.queue) == 0
                    and await redis.zcard(KEYS.inflight(TENANT, "s")) == 0
                )

            await wait_for(f1_done, 10)
            await past(redis, await redis_ms(redis) + 1200)  # its finish, then sweeps
            assert s.ids() == ["f1"]
            await switch.resume(TENANT, "s")
            await wait_for(lambda: s.ids() == ["f1", "f2"], 10)


async def test_an_open_breaker_does_not_end_a_paused_sinks_late_deliveries(
    redis: Redis, redis_url: str
) -> None:
    async with sinks(Sink()) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, max_age=2)])
        rt = runtime(redis, cfg)
        switch = SinkSwitch(redis, KEYS)
        now = await redis_ms(redis)
        await redis.hset(KEYS.breaker(TENANT, "s"), mapping={"s": "o", "u": now + 600_000})
        async with worker(rt):
            await ingest_now(rt, ["b1", "b2"])
            await wait_for(lambda: waiting_is(redis, "s", 2), 10)  # on the breaker
            await switch.pause(TENANT, "s")
            # unpaused, the sweep would dead-letter them once past their deadline
            await past(redis, max(await deadlines(redis, "s", ["b1", "b2"])) + 1500)
            assert await DeadLetterStore(redis, cfg).find(Filter()) == []
            await switch.resume(TENANT, "s")  # the pause's share of the wait is not counted
            await past(redis, await redis_ms(redis) + 700)
            assert await waiting_is(redis, "s", 2)
            await redis.delete(KEYS.breaker(TENANT, "s"))  # the sink is back
            await wait_for(lambda: sorted(s.ids()) == ["b1", "b2"], 10)
        assert await DeadLetterStore(redis, cfg).find(Filter()) == []
