"""The event log (:mod:`relay.store.eventlog`): a record of each event taken in — its
arrivals, each sink's state and every attempt — written by the pipeline's own scripts,
found by id or by search, resent from, and kept within its retention and byte cap."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from relay.config import Config, WorkerConfig, parse_config
from relay.delivery.steps import Steps
from relay.keys import Keys
from relay.store.eventlog import EventLog, Query, decode_cursor
from tests.support.common import TENANT, wait_for
from tests.support.delivery import (
    Received,
    Sink,
    delivery_config,
    drained,
    ingest,
    runtime,
    sink_conf,
    sinks,
    worker,
)

KEYS = Keys("chert-relay")


def log_config(redis_url: str, sink_list: list[dict[str, Any]], **event_log: Any) -> Config:
    data = delivery_config(redis_url, sink_list)
    data["event_log"] = event_log
    return parse_config(data, env={})


async def test_a_delivered_event_has_its_arrivals_routes_and_attempt(
    redis: Redis, redis_url: str
) -> None:
    async with sinks(Sink()) as (s,):
        cfg = log_config(
            redis_url,
            [sink_conf("s", s.url), sink_conf("audit", s.url, events=["message.sent"])],
        )
        rt = runtime(redis, cfg)
        await ingest(rt, ["e1"])
        await ingest(rt, ["e1"], source="poll")  # the same event again, by polling
        await ingest(rt, ["e1"], source="poll")
        async with worker(rt):
            await wait_for(lambda: s.ids() == ["e1"], 10)
            await wait_for(lambda: drained(redis), 10)
        rec = await EventLog(redis, cfg).get(TENANT, "e1")
        assert rec is not None
        assert rec.type == "message.received"
        assert rec.chat_id == "17f6e9ed"
        assert [(a.source, a.count) for a in rec.arrivals] == [("webhook", 1), ("poll", 2)]
        assert rec.duplicates == 2
        states = {x.sink: x for x in rec.sinks}
        assert states["audit"].state == "not_routed"
        assert states["audit"].attempts == []
        done = states["s"]
        assert done.state == "delivered"
        assert done.attempts_made == 1
        (a,) = done.attempts
        assert (a.n, a.status, a.kind, a.error, a.source, a.stale) == (
            1, 200, "http", "", "webhook", False,
        )  # fmt: skip
        assert a.ms >= 0
        assert rec.at_ms - 60_000 <= a.at_ms <= time.time() * 1000 + 60_000
        assert b'"event_id": "e1"' in rec.body or b'"event_id":"e1"' in rec.body
        assert rec.size > len(rec.stored)


async def test_each_attempt_is_recorded_with_its_answer(redis: Redis, redis_url: str) -> None:
    answers = [500, 503, 200]

    def flaky(_s: Sink, _r: Received) -> tuple[int, dict[str, str]]:
        return answers.pop(0), {}

    async with sinks(Sink(flaky, body="database is down")) as (s,):
        cfg = log_config(redis_url, [sink_conf("s", s.url)])
        rt = runtime(redis, cfg)
        await ingest(rt, ["e2"])
        async with worker(rt):
            await wait_for(lambda: len(s.ids()) == 3, 10)
            await wait_for(lambda: drained(redis), 10)
        log = EventLog(redis, cfg)
        rec = await log.get(TENANT, "e2")
        assert rec is not None
        (st,) = rec.sinks
        assert st.state == "delivered"
        assert [(a.n, a.status) for a in st.attempts] == [(1, 500), (2, 503), (3, 200)]
        assert st.attempts[0].error == "HTTP 500: database is down"
        assert st.attempts[0].at_ms <= st.attempts[1].at_ms <= st.attempts[2].at_ms
        # found as an event with a failed attempt, and as delivered; not as a dead letter
        failed = await log.search(Query(tenants=[TENANT], state="failed"))
        assert [r.event_id for r in failed.records] == ["e2"]
        assert (await log.search(Query(tenants=[TENANT], state="dead_letter"))).records == []


async def test_a_rejected_delivery_is_recorded_as_a_dead_letter(
    redis: Redis, redis_url: str
) -> None:
    async with sinks(Sink(lambda _s, _r: (422, {}), body="unknown chat")) as (s,):
        cfg = log_config(redis_url, [sink_conf("s", s.url)])
        rt = runtime(redis, cfg)
        await ingest(rt, ["e3"])
        async with worker(rt):
            await wait_for(lambda: s.ids() == ["e3"], 10)
            await wait_for(lambda: drained(redis), 10)
        rec = await EventLog(redis, cfg).get(TENANT, "e3")
        assert rec is not None
        (st,) = rec.sinks
        assert (st.state, st.detail) == ("dead_letter", "rejected")
        assert [(a.status, a.error) for a in st.attempts] == [(422, "HTTP 422: unknown chat")]


async def test_a_queued_delivery_shows_what_it_is_doing_now(redis: Redis, redis_url: str) -> None:
    cfg = log_config(redis_url, [sink_conf("s", "http://127.0.0.1:9/hook")])
    rt = runtime(redis, cfg)
    await ingest(rt, ["e4"])  # no worker: due, not started
    rec = await EventLog(redis, cfg).get(TENANT, "e4")
    assert rec is not None
    assert [(x.sink, x.state) for x in rec.sinks] == [("s", "due")]
    assert rec.sinks[0].due_ms is not None


async def test_resend_delivers_a_delivered_event_again_with_its_webhook_id(
    redis: Redis, redis_url: str
) -> None:
    async with sinks(Sink()) as (s,):
        cfg = log_config(redis_url, [sink_conf("s", s.url)])
        rt = runtime(redis, cfg)
        await ingest(rt, ["e5"])
        log = EventLog(redis, cfg)
        async with worker(rt):
            await wait_for(lambda: s.ids() == ["e5"], 10)
            await wait_for(lambda: drained(redis), 10)
            # the stored event is gone once delivered: the record's copy is resent
            assert not await redis.exists(KEYS.event(TENANT, "e5"))
            assert await log.resend(TENANT, "e5") == [("s", "ok")]
            await wait_for(lambda: s.ids() == ["e5", "e5"], 10)
            await wait_for(lambda: drained(redis), 10)
        first, again = s.received
        assert again.headers["webhook-id"] == first.headers["webhook-id"] == "e5"
        assert again.headers["X-Relay-Source"] == "resend"
        assert again.body == first.body
        assert s.bad_signatures == 0
        rec = await log.get(TENANT, "e5")
        assert rec is not None
        assert {a.source for a in rec.arrivals} == {"webhook", "resend"}
        (st,) = rec.sinks
        assert st.state == "delivered"
        assert [(a.n, a.source) for a in st.attempts] == [(1, "webhook"), (2, "resend")]
        assert not await redis.exists(KEYS.event(TENANT, "e5"))  # let go again


async def test_a_record_an_earlier_build_wrote_keeps_its_copy_in_an_ev_field(
    redis: Redis, redis_url: str
) -> None:
    # Earlier builds wrote the kept event into the record's `ev` field; an upgrade
    # finds such records, which must still read, resend and trim.
    async with sinks(Sink()) as (s,):
        cfg = log_config(redis_url, [sink_conf("s", s.url)])
        rt = runtime(redis, cfg)
        await ingest(rt, ["e9"])
        log = EventLog(redis, cfg)
        async with worker(rt):
            await wait_for(lambda: s.ids() == ["e9"], 10)
            await wait_for(lambda: drained(redis), 10)
            copy = await redis.get(KEYS.event_log_copy(TENANT, "e9"))
            assert copy is not None  # kept by renaming the stored event
            assert not await redis.exists(KEYS.event(TENANT, "e9"))
            await redis.hset(KEYS.event_log(TENANT, "e9"), "ev", copy)
            await redis.hdel(KEYS.event_log(TENANT, "e9"), "eb")
            await redis.delete(KEYS.event_log_copy(TENANT, "e9"))
            rec = await log.get(TENANT, "e9")
            assert rec is not None
            assert rec.type == "message.received"
            assert rec.chat_id == "17f6e9ed"
            assert await log.resend(TENANT, "e9") == [("s", "ok")]
            await wait_for(lambda: s.ids() == ["e9", "e9"], 10)
            await wait_for(lambda: drained(redis), 10)
        assert s.received[1].body == s.received[0].body
        # its second ending kept the event the new way (the header: users, resend time),
        # and the old field went, its bytes no longer counted
        again = await redis.get(KEYS.event_log_copy(TENANT, "e9"))
        assert again is not None
        assert again[18:] == copy[18:]
        record = KEYS.event_log(TENANT, "e9")
        assert not await redis.hexists(record, "ev")
        eb = await redis.memory_usage(KEYS.event_log_copy(TENANT, "e9"), samples=0)
        assert int(await redis.hget(record, "eb")) == eb
        assert int(await redis.get(KEYS.event_log_bytes)) == int(await redis.hget(record, "sz"))
        rec = await log.get(TENANT, "e9")
        assert rec is not None
        assert rec.type == "message.received"


async def test_a_resend_moves_an_earlier_builds_copy_out_of_the_record_before_using_it(
    redis: Redis, redis_url: str
) -> None:
    # The resent delivery's stored event expires, and goes without being kept when
    # Redis is short of memory or its dead letter is purged: the record must hold its
    # own copy from the resend on, not only the stored event.
    async with sinks(Sink()) as (s,):
        cfg = log_config(redis_url, [sink_conf("s", s.url)])
        rt = runtime(redis, cfg)
        await ingest(rt, ["e8"])
        async with worker(rt):
            await wait_for(lambda: s.ids() == ["e8"], 10)
            await wait_for(lambda: drained(redis), 10)
    record, copy_key = KEYS.event_log(TENANT, "e8"), KEYS.event_log_copy(TENANT, "e8")
    copy = await redis.get(copy_key)
    assert copy is not None
    await redis.hset(record, "ev", copy)  # the earlier build's layout
    await redis.hdel(record, "eb")
    await redis.delete(copy_key)
    log = EventLog(redis, cfg)
    assert await log.resend(TENANT, "e8") == [("s", "ok")]
    assert await redis.get(copy_key) == copy
    assert not await redis.hexists(record, "ev")
    eb = await redis.memory_usage(copy_key, samples=0)
    assert int(await redis.hget(record, "eb")) == eb
    assert int(await redis.get(KEYS.event_log_bytes)) == int(await redis.hget(record, "sz"))
    await redis.delete(KEYS.event(TENANT, "e8"))  # let go, not kept
    rec = await log.get(TENANT, "e8")
    assert rec is not None
    assert rec.type == "message.received"


async def test_resend_leaves_a_delivery_under_way_alone(redis: Redis, redis_url: str) -> None:
    cfg = log_config(redis_url, [sink_conf("s", "http://127.0.0.1:9/hook")])
    rt = runtime(redis, cfg)
    await ingest(rt, ["e6"])
    assert await EventLog(redis, cfg).resend(TENANT, "e6") == [("s", "pending")]
    assert await redis.zcard(KEYS.queue) == 1


async def test_search_pages_newest_first_and_matches_inside_the_payload(
    redis: Redis, redis_url: str
) -> None:
    cfg = log_config(redis_url, [sink_conf("s", "http://127.0.0.1:9/hook")])
    rt = runtime(redis, cfg)
    ids = [f"p{i:02d}" for i in range(25)]
    for i in ids:  # one by one: each first arrival is later than the one before
        await ingest(rt, [i])
    log = EventLog(redis, cfg)
    seen: list[str] = []
    cursor = None
    while True:
        page = await log.search(Query(tenants=[TENANT], limit=10, cursor=cursor))
        seen += [r.event_id for r in page.records]
        if page.cursor is None:
            break
        cursor = page.cursor
        decode_cursor(cursor)
    assert seen == ids[::-1]
    text = await log.search(Query(tenants=[TENANT], text="P07"))  # case-insensitive
    assert [r.event_id for r in text.records] == ["p07"]
    assert text.scanned == 25
    field = await log.search(
        Query(tenants=[TENANT], field_path="data.message.id", field_value="p11")
    )
    assert [r.event_id for r in field.records] == ["p11"]
    bounded = await log.search(Query(tenants=[TENANT], text="nowhere", scan=5))
    assert (bounded.records, bounded.scanned, bounded.exhausted_scan) == ([], 5, True)
    assert bounded.cursor is not None
    assert (await log.search(Query(tenants=["other-1"]))).records == []


async def test_the_log_keeps_within_its_byte_cap_oldest_first(redis: Redis, redis_url: str) -> None:
    # A record grows as its deliveries go (attempts, and the event's copy once they let
    # it go); past the cap the oldest records go, at the next ingest or sweep.
    cap = 1_048_576
    async with sinks(Sink()) as (s,):
        cfg = log_config(redis_url, [sink_conf("s", s.url)], max_memory=cap)
        rt = runtime(redis, cfg)
        log = EventLog(redis, cfg)
        ids = [f"c{i:04d}" for i in range(1500)]
        async with worker(rt):
            for k in range(0, len(ids), 100):
                await ingest(rt, ids[k : k + 100])
            await wait_for(lambda: drained(redis), 60)
            await wait_for(lambda: _within(log, cap), 10)  # the sweep trims
        records, size = await log.usage()
        assert 0 < records < len(ids)
        assert await log.get(TENANT, ids[-1]) is not None
        assert await log.get(TENANT, ids[0]) is None  # the oldest went
        assert not await redis.exists(KEYS.event_log(TENANT, ids[0]))
        # the count is Redis' own: what the records and their copies take, with the
        # index's share
        total, copies = 0, 0
        for member in await redis.zrange(KEYS.event_log_index, 0, -1):
            tenant, _, event_id = member.decode().partition(":")
            for key in (KEYS.event_log(tenant, event_id), KEYS.event_log_copy(tenant, event_id)):
                found = await redis.memory_usage(key, samples=0)
                total += found or 0
            copies += await redis.exists(KEYS.event_log_copy(tenant, event_id))
        assert copies == records
        assert total <= size
        # a record that went took its copy with it: no copy is left without a record
        assert len(await redis.keys("chert-relay:logev:*")) == records


async def _within(log: EventLog, cap: int) -> bool:
    return (await log.usage())[1] <= cap


async def test_records_past_their_retention_go(redis: Redis, redis_url: str) -> None:
    async with sinks(Sink()) as (s,):
        cfg = log_config(redis_url, [sink_conf("s", s.url)], retention="1h")
        rt = runtime(redis, cfg)
        await ingest(rt, ["old1", "old2", "new1"])
        log = EventLog(redis, cfg)
        async with worker(rt):
            await wait_for(lambda: drained(redis), 10)
            two_hours_ago = (time.time() - 7200) * 1000
            for i in ("old1", "old2"):  # first seen two hours ago
                await redis.zadd(KEYS.event_log_index, {f"{TENANT}:{i}": two_hours_ago})
            await wait_for(lambda: _gone(log, "old1", "old2"), 10)  # the sweep trims
        assert await log.get(TENANT, "new1") is not None
        records, size = await log.usage()
        assert records == 1
        assert 0 < size == int(await redis.hget(KEYS.event_log(TENANT, "new1"), "sz"))


async def _gone(log: EventLog, *ids: str) -> bool:
    return all([await log.get(TENANT, i) is None for i in ids])


async def test_with_the_log_off_nothing_is_recorded(redis: Redis, redis_url: str) -> None:
    async with sinks(Sink()) as (s,):
        cfg = log_config(redis_url, [sink_conf("s", s.url)], enabled=False)
        rt = runtime(redis, cfg)
        await ingest(rt, ["e7"])
        async with worker(rt):
            await wait_for(lambda: s.ids() == ["e7"], 10)
            await wait_for(lambda: drained(redis), 10)
        assert await EventLog(redis, cfg).usage() == (0, 0)
        assert not await redis.exists(KEYS.event_log(TENANT, "e7"))


async def test_the_log_gives_way_before_redis_refuses_an_event(
    redis: Redis, redis_url: str
) -> None:
    # Redis' maxmemory leaves room for a few thousand records, the log's own cap far
    # above it: as Redis nears full the log keeps no copies and gives its oldest records
    # up, so events keep being taken in.
    used = int((await redis.info("memory"))["used_memory"])
    await redis.config_set("maxmemory", used + 3_000_000)
    try:
        async with sinks(Sink()) as (s,):
            cfg = log_config(redis_url, [sink_conf("s", s.url)])
            rt = runtime(redis, cfg)
            log = EventLog(redis, cfg)
            ids = [f"m{i:05d}" for i in range(4000)]
            async with worker(rt):
                for k in range(0, len(ids), 100):
                    await ingest(rt, ids[k : k + 100])  # a refusal raises
                    await wait_for(lambda: drained(redis), 30)
            records, _ = await log.usage()
            assert records < len(ids)  # it gave way...
            assert await log.get(TENANT, ids[-1]) is not None  # ...oldest first
            assert len(set(s.ids())) == len(ids)
    finally:
        await redis.config_set("maxmemory", 0)


async def test_the_worker_says_when_the_event_log_gives_way_to_a_full_redis(
    redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="relay.delivery.steps")
    steps = Steps(redis, KEYS, WorkerConfig())
    assert await steps.check_memory() is False
    used = int((await redis.info("memory"))["used_memory"])
    await redis.config_set("maxmemory", used + 1000)  # past 90 % of it
    try:
        assert await steps.check_memory() is True
        assert "the event log keeps no new copies and gives its oldest records up" in caplog.text
    finally:
        await redis.config_set("maxmemory", 0)
    assert await steps.check_memory() is False
    assert "the event log keeps copies again" in caplog.text
