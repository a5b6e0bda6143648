"""A delivery's deadline (the sink's ``max_age``) measures the sink's failure, not the
relay's queueing: waiting on the sink's in-flight cap moves the deadline back, and a
delivery is never ended by its deadline before it has had one attempt (unless its
sink's breaker is open), and its dead letter says why it ended."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from relay.store.deadletters import DeadLetterStore, Filter
from tests.support.common import wait_for
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


async def _slow(sink: Sink, r: Received) -> tuple[int, dict[str, str]]:
    await asyncio.sleep(0.05)
    return 200, {}


async def test_waiting_on_the_concurrency_cap_does_not_use_up_max_age(
    redis: Redis, redis_url: str
) -> None:
    # 60 deliveries one at a time at 50 ms or more each take several times max_age (0.5 s):
    # every one of them waits on the cap, and none may expire for it.
    async with sinks(Sink(_slow)) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, max_age=0.5, concurrency=1)])
        rt = runtime(redis, cfg)
        ids = [f"cap-{i:03d}" for i in range(60)]
        await ingest(rt, ids)
        store = DeadLetterStore(redis, cfg)
        async with worker(rt):
            await wait_for(lambda: len(set(s.ids())) == len(ids), 120)
            await wait_for(lambda: drained(redis), 10)
        assert sorted(s.ids()) == ids
        assert await store.find(Filter()) == []
        assert s.max_running == 1


async def test_a_replay_of_many_dead_letters_delivers_every_one_behind_the_cap(
    redis: Redis, redis_url: str
) -> None:
    # The outage of the issue: dead letters exhausted past max_age, replayed with the
    # sink healthy and a small concurrency; none may go straight back to the store.
    async with sinks(Sink(lambda s, r: (503, {}))) as (s,):
        cfg = config_with(
            redis_url,
            [sink_conf("s", s.url, max_age=0.5, concurrency=2)],
            retry_backoff=0.1,
        )
        rt = runtime(redis, cfg)
        ids = [f"rp-{i:03d}" for i in range(80)]
        await ingest(rt, ids)
        store = DeadLetterStore(redis, cfg)
        async with worker(rt):
            await wait_for(lambda: _count(store, len(ids)), 60)
            await wait_for(lambda: drained(redis), 10)
            s.behaviour = _slow
            s.received.clear()
            out = await store.replay(Filter(), dry_run=False)
            assert len(out.done) == len(ids)
            await wait_for(lambda: len(set(s.ids())) == len(ids), 120)
            await wait_for(lambda: drained(redis), 10)
        assert sorted(s.ids()) == ids
        assert await store.find(Filter()) == []


async def _count(store: DeadLetterStore, n: int) -> bool:
    return len(await store.find(Filter())) == n


def _past(t: float) -> bool:
    return time.time() > t


async def test_an_untried_delivery_past_its_deadline_gets_its_attempt(
    redis: Redis, redis_url: str
) -> None:
    # The worker comes only after the deadline: the delivery still gets one attempt.
    async with sinks(Sink()) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, max_age=0.2)])
        rt = runtime(redis, cfg)
        await ingest(rt, ["late"])
        start = time.time()
        await wait_for(lambda: _past(start + 0.3), 5)
        async with worker(rt):
            await wait_for(lambda: drained(redis), 10)
        assert s.ids() == ["late"]
        assert await DeadLetterStore(redis, cfg).find(Filter()) == []


async def test_an_untried_delivery_ends_past_max_age_only_while_the_breaker_is_open(
    redis: Redis, redis_url: str
) -> None:
    # The sink's breaker is open (its sink kept failing) when the worker first claims a
    # delivery already past its deadline: it ends with 0 attempts, and says why.
    async with sinks(Sink()) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, max_age=0.2)])
        rt = runtime(redis, cfg)
        await ingest(rt, ["untried"])
        start = time.time()
        await wait_for(lambda: _past(start + 0.3), 5)
        await redis.hset(
            rt.keys.breaker("acme-7a3f", "s"),
            mapping={"s": "o", "f": 5, "u": int((time.time() + 600) * 1000)},
        )
        store = DeadLetterStore(redis, cfg)
        async with worker(rt):
            await wait_for(lambda: _count(store, 1), 10)
        [d] = await store.find(Filter())
        assert s.received == []
        assert (d.event_id, d.cls, d.attempts) == ("untried", "exhausted", 0)
        assert d.error.startswith("past max_age (0.2s) without an attempt")
        assert "breaker was open" in d.error


async def test_a_dead_letter_past_max_age_says_after_how_many_attempts(
    redis: Redis, redis_url: str
) -> None:
    async with sinks(Sink(lambda s, r: (503, {}))) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, max_age=0.5)], retry_backoff=0.1)
        rt = runtime(redis, cfg)
        await ingest(rt, ["tried"])
        store = DeadLetterStore(redis, cfg)
        async with worker(rt):
            await wait_for(lambda: _count(store, 1), 20)
        [d] = await store.find(Filter())
        assert d.attempts == len(s.received) >= 1
        assert d.error.startswith(f"past max_age (0.5s) after {d.attempts} attempt(s)")
        assert "HTTP 503" in d.error
