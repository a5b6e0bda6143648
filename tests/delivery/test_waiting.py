"""Deliveries that wait for their sink (``lua/lib/wait.lua``): set aside once, handed a
slot the moment one frees — by a finish, a lapsed lease, a breaker that lets them by —
shared correctly by several workers, and never crowding another sink's deliveries out."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from relay.keys import Keys
from relay.store.backlog import waiting
from relay.store.deadletters import DeadLetterStore, Filter
from tests.support.common import TENANT, wait_for
from tests.support.delivery import (
    Received,
    Sink,
    config_with,
    drained,
    ingest,
    metric_sum,
    runtime,
    sink_conf,
    sinks,
    waiting_is,
    worker,
)

KEYS = Keys("chert-relay")


async def test_two_workers_share_a_sinks_cap_and_deliver_each_event_once(
    redis: Redis, redis_url: str
) -> None:
    async def slow(_s: Sink, _r: Received) -> tuple[int, dict[str, str]]:
        await asyncio.sleep(0.01)
        return 200, {}

    async with sinks(Sink(slow)) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, concurrency=3)])
        rt_a, rt_b = runtime(redis, cfg), runtime(redis, cfg)
        ids = [f"w{i:03d}" for i in range(120)]  # the two workers share the sink's 3 slots
        await ingest(rt_a, ids)
        async with worker(rt_a), worker(rt_b):
            await wait_for(lambda: len(set(s.ids())) == len(ids), 60)
            await wait_for(lambda: drained(redis), 10)
        assert s.max_running <= 3
        assert sorted(s.ids()) == ids  # each once: no run was taken twice
        a = metric_sum(rt_a.metrics, "chert_relay_deliveries_total", outcome="delivered")
        b = metric_sum(rt_b.metrics, "chert_relay_deliveries_total", outcome="delivered")
        assert a + b == len(ids)


async def test_a_slot_whose_lease_lapsed_goes_to_the_waiting_delivery(
    redis: Redis, redis_url: str
) -> None:
    # A worker died mid-attempt: its slot's lease lapses without any finish. The sweep
    # hands the slot to the delivery waiting for it.
    async with sinks(Sink()) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, concurrency=1)])
        rt = runtime(redis, cfg)
        lapses = time.time() * 1000 + 1500
        await redis.zadd(KEYS.inflight(TENANT, "s"), {"dead-worker-run": lapses})
        await ingest(rt, ["e1"])
        async with worker(rt):
            await wait_for(lambda: waiting(redis, KEYS), 10)
            assert s.ids() == []
            await wait_for(lambda: s.ids() == ["e1"], 10)
            assert time.time() * 1000 >= lapses - 50  # not before the lease lapsed
            await wait_for(lambda: drained(redis), 10)
        assert metric_sum(rt.metrics, "chert_relay_delivery_waits_total", reason="busy") == 1


async def test_a_sink_back_from_an_outage_gets_its_backlog_at_full_concurrency(
    redis: Redis, redis_url: str
) -> None:
    down = [True]
    ok: list[str] = []

    async def flaky(_s: Sink, r: Received) -> tuple[int, dict[str, str]]:
        if down[0]:
            return 503, {}
        await asyncio.sleep(0.02)
        ok.append(r.event_id)
        return 200, {}

    async with sinks(Sink(flaky)) as (s,):
        cfg = config_with(
            redis_url,
            [sink_conf("s", s.url, concurrency=4)],
            breaker_failures=3,
            breaker_cooldown=0.3,
            retry_backoff=0.05,
        )
        rt = runtime(redis, cfg)
        ids = [f"b{i:02d}" for i in range(40)]
        await ingest(rt, ids)
        async with worker(rt):
            await wait_for(
                lambda: (
                    metric_sum(
                        rt.metrics,
                        "chert_relay_delivery_waits_total",
                        reason="breaker_open",
                    )
                    > 0
                ),
                10,
            )
            tried_while_down = len(s.received)
            s.max_running = 0
            down[0] = False
            await wait_for(lambda: set(ok) == set(ids), 30)
            await wait_for(lambda: drained(redis), 10)
        # while open only probes went, one at a time; back, the backlog went 4 at a time
        assert tried_while_down < len(ids)
        assert s.max_running == 4
        assert await DeadLetterStore(redis, cfg).find(Filter()) == []


async def test_one_sinks_backlog_does_not_hold_up_another_sink(
    redis: Redis, redis_url: str
) -> None:
    async def slow(_s: Sink, _r: Received) -> tuple[int, dict[str, str]]:
        await asyncio.sleep(0.02)
        return 200, {}

    async with sinks(Sink(slow), Sink()) as (a, b):
        cfg = config_with(
            redis_url,
            [
                sink_conf("a", a.url, concurrency=2, events=["message.received"]),
                sink_conf("b", b.url, concurrency=32, events=["message.sent"]),
            ],
        )
        rt = runtime(redis, cfg)
        backed_up = [f"a{i:03d}" for i in range(400)]
        await ingest(rt, backed_up, event_type="message.received")
        async with worker(rt):
            await wait_for(lambda: len(a.ids()) >= 4, 10)  # the backlog is draining
            later = [f"b{i:02d}" for i in range(20)]
            await ingest(rt, later, event_type="message.sent")
            await wait_for(lambda: sorted(b.ids()) == later, 10)
            # the other sink got all of its events while the backlog had most of its own
            # still waiting, each set aside once
            assert (await waiting(redis, KEYS)).get((TENANT, "a"), 0) > 200
        assert metric_sum(rt.metrics, "chert_relay_delivery_waits_total", sink="a") <= len(
            backed_up
        )
        assert metric_sum(rt.metrics, "chert_relay_delivery_waits_total", sink="b") == 0


async def test_the_waiting_deliveries_of_a_removed_sink_end_as_gone(
    redis: Redis, redis_url: str
) -> None:
    sink = sink_conf("old", "http://127.0.0.1:9/hook", concurrency=1)
    keep = sink_conf("keep", "http://127.0.0.1:9/other", events=["message.sent"])
    cfg = config_with(redis_url, [sink, keep], unknown_sink_grace=0.3)
    rt = runtime(redis, cfg)
    await redis.zadd(KEYS.inflight(TENANT, "old"), {"elsewhere": time.time() * 1000 + 600_000})
    await ingest(rt, ["g1", "g2", "g3"])
    store = DeadLetterStore(redis, cfg)
    async with worker(rt) as role:
        await wait_for(lambda: waiting_is(redis, "old", 3), 10)
        role.reload(config_with(redis_url, [keep], unknown_sink_grace=0.3))

        async def gone() -> bool:
            found = await store.find(Filter())
            return len(found) == 3 and all(d.cls == "gone" for d in found)

        await wait_for(gone, 20)
    assert await waiting(redis, KEYS) == {}
    assert await redis.scard(KEYS.waiting_sinks) == 0
