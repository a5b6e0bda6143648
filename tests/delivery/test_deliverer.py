"""Delivery end to end: real Redis, real aiohttp sinks, the worker role running arq."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time

import pytest
from redis.asyncio import Redis

from relay.delivery import breaker
from relay.delivery.retry import backoff, parse_retry_after
from relay.delivery.role import WorkerRole
from relay.delivery.sink_client import scrub
from relay.keys import JOB_KEY_PREFIX, Keys
from relay.store.deadletters import DeadLetterStore, Filter
from relay.store.embedded import free_port
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
    worker,
)


async def test_fan_out_1000_events_to_3_sinks(redis: Redis, redis_url: str) -> None:
    """Every (event, sink) pair arrives once, signed, with the stable webhook-id."""
    async with sinks(Sink(), Sink(), Sink()) as (a, b, c):
        cfg = config_with(
            redis_url,
            [
                sink_conf("a", a.url, concurrency=64, headers={"X-Static": "yes"}),
                sink_conf("b", b.url, concurrency=64),
                sink_conf("c", c.url, concurrency=64),
            ],
        )
        rt = runtime(redis, cfg)
        ids = [f"evt-{i:04d}" for i in range(1000)]
        await ingest(rt, ids)
        async with worker(rt):
            await wait_for(lambda: all(len(s.received) >= 1000 for s in (a, b, c)), 60)
            await wait_for(lambda: drained(redis), 10)
        for s in (a, b, c):
            assert sorted(s.ids()) == ids  # each exactly once: no crash, no duplicate
            assert s.bad_signatures == 0
        first = a.for_event("evt-0007")[0]
        body = json.loads(first.body)
        assert body["event_id"] == "evt-0007"
        assert first.headers["X-Chert-Event-Type"] == "message.received"
        assert first.headers["X-Chert-Tenant"] == TENANT
        assert first.headers["X-Relay-Attempt"] == "1"
        assert first.headers["X-Relay-Source"] == "webhook"
        assert first.headers["X-Static"] == "yes"
        assert "X-Static" not in b.for_event("evt-0007")[0].headers
        # Nothing is left behind: no attempt records, and the payloads are gone.
        assert await redis.keys("chert-relay:att:*") == []
        assert await redis.keys("chert-relay:ev:*") == []
        text = rt.metrics.render().decode()
        assert 'chert_relay_deliveries_total{class="2xx",outcome="delivered",sink="a"' in text


async def test_500_three_times_then_200_delivers_on_attempt_4(redis: Redis, redis_url: str) -> None:
    def flaky(sink: Sink, got: Received) -> tuple[int, dict[str, str]]:
        return (500, {}) if len(sink.received) <= 3 else (200, {})

    async with sinks(Sink(flaky)) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url)], retry_backoff=0.2)
        rt = runtime(redis, cfg)
        await ingest(rt, ["e1"])
        async with worker(rt):
            await wait_for(lambda: len(s.received) >= 4, 20)
            await wait_for(lambda: drained(redis), 10)
        assert [r.attempt for r in s.received] == [1, 2, 3, 4]
        assert {r.event_id for r in s.received} == {"e1"}
        assert s.bad_signatures == 0
        times = [r.at for r in s.received]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert gaps[0] < gaps[1] < gaps[2], gaps
        assert await DeadLetterStore(redis, cfg).find(Filter()) == []


async def test_400_dead_letters_at_once(redis: Redis, redis_url: str) -> None:
    async with sinks(Sink(lambda s, r: (400, {}))) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url)])
        rt = runtime(redis, cfg)
        await ingest(rt, ["bad-1"])
        store = DeadLetterStore(redis, cfg)
        async with worker(rt):
            await wait_for(lambda: store.find(Filter()), 10)
        [d] = await store.find(Filter())
        assert len(s.received) == 1
        assert (d.sink, d.event_id, d.cls, d.status, d.attempts) == (
            "s",
            "bad-1",
            "rejected",
            400,
            1,
        )
        assert d.error.startswith("HTTP 400")
        assert d.first_attempt is not None
        assert d.last_attempt is not None
        assert await drained(redis)
        # The dead letter holds the event: stored, without an expiry.
        assert json.loads(await store.payload(TENANT, "bad-1") or b"")["event_id"] == "bad-1"
        assert await redis.ttl(rt.keys.event(TENANT, "bad-1")) == -1


async def test_a_dead_letter_after_several_attempts_keeps_when_the_first_was(
    redis: Redis, redis_url: str
) -> None:
    async with sinks(Sink(lambda s, r: (503, {}))) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, max_attempts=3)], retry_backoff=0.2)
        rt = runtime(redis, cfg)
        await ingest(rt, ["tired-1"])
        store = DeadLetterStore(redis, cfg)
        async with worker(rt):
            await wait_for(lambda: store.find(Filter()), 10)
        [d] = await store.find(Filter())
        assert (d.cls, d.attempts, len(s.received)) == ("exhausted", 3, 3)
        assert d.first_attempt is not None
        assert d.last_attempt is not None
        # the first attempt's time is kept from the first claim on: the dead letter's
        # span covers the sink's gap between its first and second requests too
        first_gap = s.received[1].at - s.received[0].at
        second_gap = s.received[2].at - s.received[1].at
        assert d.last_attempt - d.first_attempt > second_gap + first_gap / 2


async def test_down_past_max_age_is_exhausted_then_replay_delivers(
    redis: Redis, redis_url: str
) -> None:
    port = free_port()  # nothing listens here yet: connection refused
    url = f"http://127.0.0.1:{port}/hook"
    cfg = config_with(redis_url, [sink_conf("s", url, max_age=0.6)], retry_backoff=0.05)
    rt = runtime(redis, cfg)
    ids = [f"x{i}" for i in range(5)]
    await ingest(rt, ids)
    store = DeadLetterStore(redis, cfg)
    async with worker(rt):
        await wait_for(lambda: drained(redis), 15)
    found = await store.find(Filter())
    assert sorted(d.event_id for d in found) == ids
    assert {d.cls for d in found} == {"exhausted"}
    assert all(d.attempts >= 2 and "past max_age" in d.error for d in found)
    assert all(d.status is None and "Connect" in d.error for d in found)

    async with sinks(Sink(port=port)) as (s,):
        dry = await store.replay(Filter(sink="s"), dry_run=True)
        assert len(dry.done) == 5
        assert len(await store.find(Filter())) == 5
        out = await store.replay(Filter(sink="s"))
        assert len(out.done) == 5
        assert not out.skipped
        assert await store.find(Filter()) == []
        async with worker(rt):
            await wait_for(lambda: len(s.received) >= 5, 15)
            await wait_for(lambda: drained(redis), 10)
        assert sorted(s.ids()) == ids
        assert {r.headers["X-Relay-Source"] for r in s.received} == {"replay"}
        assert {r.attempt for r in s.received} == {1}  # fresh attempts
    assert await store.find(Filter()) == []
    assert await redis.keys("chert-relay:ev:*") == []  # nothing holds the events any more
    assert await store.counts() == {
        (TENANT, "rejected"): 0,
        (TENANT, "exhausted"): 0,
        (TENANT, "gone"): 0,
    }


async def test_hung_sink_does_not_stop_a_healthy_one_and_its_breaker_opens(
    redis: Redis, redis_url: str
) -> None:
    release = asyncio.Event()

    async def hang(sink: Sink, got: Received) -> tuple[int, dict[str, str]]:
        await release.wait()
        return 200, {}

    async with sinks(Sink(hang), Sink()) as (hung, ok):
        cfg = config_with(
            redis_url,
            [sink_conf("hung", hung.url, timeout=0.3, concurrency=2), sink_conf("ok", ok.url)],
            max_jobs=10,
            breaker_failures=3,
            breaker_cooldown=60,
        )
        rt = runtime(redis, cfg)
        ids = [f"h{i}" for i in range(60)]
        await ingest(rt, ids)
        try:
            async with worker(rt):
                await wait_for(lambda: len(ok.received) >= 60, 30)

                async def is_open() -> bool:
                    st = await breaker.states(redis, rt.keys, [(TENANT, "hung")])
                    return st[(TENANT, "hung")] == breaker.OPEN

                await wait_for(is_open, 15)
                await wait_for(
                    lambda: (
                        metric_sum(
                            rt.metrics,
                            "chert_relay_delivery_waits_total",
                            reason="breaker_open",
                            sink="hung",
                        )
                        > 0
                    )
                )
                count = len(hung.received)
                text = rt.metrics.render().decode()
                assert 'chert_relay_breaker_state{sink="hung",tenant="acme-7a3f"} 2.0' in text
        finally:
            release.set()
        assert sorted(ok.ids()) == sorted(ids)
        assert count < 60  # most of the hung sink's jobs were put off without an HTTP call


async def test_410_marks_the_sink_gone_and_replay_clears_it(redis: Redis, redis_url: str) -> None:
    answer = [410]
    async with sinks(Sink(lambda s, r: (answer[0], {}))) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url)])
        rt = runtime(redis, cfg)
        store = DeadLetterStore(redis, cfg)
        async with worker(rt):
            await ingest(rt, ["g1"])
            await wait_for(lambda: store.find(Filter()), 10)
            await ingest(rt, ["g2"])  # the sink is gone: no HTTP call for this one
            await wait_for(lambda: store_has(store, 2), 10)
        assert s.ids() == ["g1"]
        found = {d.event_id: d for d in await store.find(Filter(cls="gone"))}
        assert set(found) == {"g1", "g2"}
        assert found["g1"].status == 410
        assert found["g2"].attempts == 0
        assert await redis.get(rt.keys.sink_gone(TENANT, "s")) == s.url.encode()
        answer[0] = 200
        out = await store.replay(Filter(cls="gone"))
        assert len(out.done) == 2
        assert await redis.get(rt.keys.sink_gone(TENANT, "s")) is None
        async with worker(rt):
            await wait_for(lambda: sorted(set(s.ids())) == ["g1", "g2"] and len(s.ids()) == 3, 10)


async def store_has(store: DeadLetterStore, n: int) -> bool:
    return len(await store.find(Filter())) == n


async def test_retry_after_is_honoured(redis: Redis, redis_url: str) -> None:
    async with sinks(Sink(lambda s, r: (429, {"Retry-After": "1"}))) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url)])
        rt = runtime(redis, cfg)
        await ingest(rt, ["r1"])
        att = rt.keys.attempts(TENANT, "s", "r1")
        async with worker(rt):
            await wait_for(lambda: redis.hget(att, "due"), 10)
            due, last, status = await redis.hmget(att, ["due", "last", "st"])
            assert status == b"429"
            assert 1000 <= int(due) - int(last) < 2000  # Retry-After: 1, not the 0.05s backoff
            assert len(s.received) == 1


async def test_in_flight_cap_defers_instead_of_waiting(redis: Redis, redis_url: str) -> None:
    async def slow(sink: Sink, got: Received) -> tuple[int, dict[str, str]]:
        await asyncio.sleep(0.05)  # the sink is slow; the relay must not pile onto it
        return 200, {}

    async with sinks(Sink(slow)) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, concurrency=2)])
        rt = runtime(redis, cfg)
        ids = [f"c{i}" for i in range(20)]
        await ingest(rt, ids)
        async with worker(rt):
            await wait_for(lambda: len(s.received) >= 20, 20)
        assert sorted(s.ids()) == sorted(ids)
        assert s.max_running <= 2
        assert metric_sum(rt.metrics, "chert_relay_delivery_waits_total", reason="busy") > 0


async def test_a_removed_sink_dead_letters_as_gone_after_the_grace(
    redis: Redis, redis_url: str
) -> None:
    async with sinks(Sink()) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url), sink_conf("old", s.url)])
        rt = runtime(redis, cfg)
        await ingest(rt, ["o1"])
        # "old" was removed
        rt.config = config_with(redis_url, [sink_conf("s", s.url)], unknown_sink_grace=0.3)
        store = DeadLetterStore(redis, rt.config)
        async with worker(rt):
            await wait_for(lambda: drained(redis), 10)
        assert s.ids() == ["o1"]
        [d] = await store.find(Filter())
        assert (d.sink, d.cls) == ("old", "gone")
        assert d.error == (
            "the sink is not configured (on this worker, for longer than "
            "worker.unknown_sink_grace, 0.3s)"
        )
        assert 'reason="unknown_sink"' in rt.metrics.render().decode()
        out = await store.replay(Filter())
        assert out.done == []
        assert [r for _, r in out.skipped] == ["sink is no longer configured"]


def test_backoff_grows_and_is_bounded() -> None:
    assert [backoff(n, 1.0, 100.0, rand=1.0) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff(1, 1.0, 100.0, rand=0.0) == 0.75
    assert backoff(50, 1.0, 100.0, rand=1.0) == 100.0
    assert backoff(5000, 1.0, 100.0) <= 100.0
    assert backoff(1, 1.0, 100.0, retry_after=7.0) == 7.0
    assert backoff(1, 1.0, 100.0, retry_after=1e9, retry_after_max=60.0) == 60.0


def test_retry_after_forms() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_errors_never_carry_secrets() -> None:
    cfg = config_with(
        "redis://127.0.0.1:1/0",
        [
            sink_conf(
                "s",
                "https://user:pw123456@sink.example/hook?token=abcdef123",
                headers={"X-Auth": "Bearer tok-987654"},  # not Authorization: see check-config
            ),
        ],
    )
    sink = cfg.tenants[0].sinks[0]
    text = scrub(
        "failed https://user:pw123456@sink.example/hook?token=abcdef123 with Bearer tok-987654 "
        f"and {sink.secret.get() if sink.secret else ''}\n" + "x" * 1000,
        sink,
    )
    for secret in ("pw123456", "token=abcdef123", "tok-987654", "whsec_"):
        assert secret not in text
    assert "\n" not in text
    assert len(text) <= 300


def test_errors_never_carry_the_parts_of_a_credential_a_sink_echoes() -> None:
    cfg = config_with(
        "redis://127.0.0.1:1/0",
        [
            sink_conf(
                "s",
                "https://sink.example/hook?v=2&token=q5ecret7777xyz",
                headers={"Authorization": "Bearer tok-9876543210abcdef"},
            ),
        ],
    )
    sink = cfg.tenants[0].sinks[0]
    text = scrub('HTTP 400: {"error":"bad token tok-9876543210abcdef","q":"q5ecret7777xyz"}', sink)
    assert "tok-9876543210abcdef" not in text
    assert "q5ecret7777xyz" not in text
    assert "bad token" in text  # the rest stays readable


async def test_a_sink_that_echoes_its_credential_does_not_leak_it(
    redis: Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    token = "tok-9876543210abcdef"

    async with sinks(
        Sink(lambda s, r: (401, {}), body=f"invalid token {token}"),
        Sink(lambda s, r: (400, {}), body="x" * 190 + token),
    ) as (a, b):
        cfg = config_with(
            redis_url,
            [
                sink_conf("a", a.url, headers={"Authorization": f"Bearer {token}"}),
                sink_conf("b", b.url, headers={"Authorization": f"Bearer {token}"}),
            ],
        )
        rt = runtime(redis, cfg)
        store = DeadLetterStore(redis, cfg)
        await ingest(rt, ["e1"])
        async with worker(rt):
            await wait_for(lambda: _dead_letters(store, 2, redis), 15)
        for d in await store.find(Filter()):
            assert token not in d.error
            assert token[:8] not in d.error  # not even the part before a cut
        assert token not in caplog.text


def test_errors_never_carry_a_token_in_the_sink_urls_path() -> None:
    url = "https://hooks.example/services/T0ABCDEF1/B0GHIJKL2/xYz123secretToken456"
    cfg = config_with("redis://127.0.0.1:1/0", [sink_conf("s", url)])
    sink = cfg.tenants[0].sinks[0]
    for error in (f"InvalidUrlClientError: {url}", "bad segment xYz123secretToken456 seen"):
        text = scrub(error, sink)
        assert "xYz123secretToken456" not in text
        assert "T0ABCDEF1" not in text
    # A short path is not taken for a secret: the error stays readable.
    short = config_with("redis://127.0.0.1:1/0", [sink_conf("s", "http://127.0.0.1:9/hook")])
    assert scrub("POST /hook failed", short.tenants[0].sinks[0]) == "POST /hook failed"


async def test_metrics_read_queue_and_breakers_at_scrape_time(redis: Redis, redis_url: str) -> None:
    cfg = config_with(redis_url, [sink_conf("s", "http://127.0.0.1:9/hook")])
    rt = runtime(redis, cfg)
    role = WorkerRole(rt)
    await role.start()  # registers the collector; nothing runs
    try:
        await ingest(rt, ["q1", "q2", "q3"])
        await redis.hset(rt.keys.breaker(TENANT, "s"), mapping={"s": "o", "u": 2**50})
        text = rt.metrics.render().decode()
        assert "chert_relay_queue_ready_jobs 3.0" in text
        assert "chert_relay_queue_scheduled_jobs 0.0" in text
        assert 'chert_relay_breaker_state{sink="s",tenant="acme-7a3f"} 2.0' in text
        assert 'chert_relay_dead_letters{class="rejected",tenant="acme-7a3f"} 0.0' in text
    finally:
        await role.stop()
    assert "chert_relay_queue_ready_jobs" not in rt.metrics.render().decode()


async def test_breaker_opens_then_a_half_open_probe_closes_it(
    redis: Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery.breaker")
    down = [True]

    def flaky(sink: Sink, got: Received) -> tuple[int, dict[str, str]]:
        return (503, {}) if down[0] else (200, {})

    async with sinks(Sink(flaky)) as (s,):
        cfg = config_with(
            redis_url,
            [sink_conf("s", s.url, concurrency=4)],
            breaker_failures=3,
            breaker_cooldown=0.3,
            retry_backoff=0.05,
        )
        rt = runtime(redis, cfg)
        ids = [f"p{i}" for i in range(30)]
        await ingest(rt, ids)

        async def state() -> int:
            return (await breaker.states(redis, rt.keys, [(TENANT, "s")]))[(TENANT, "s")]

        async def is_open() -> bool:
            return await state() == breaker.OPEN

        async with worker(rt):
            await wait_for(is_open, 10)
            tried = len(s.received)
            down[0] = False
            await wait_for(lambda: drained(redis), 20)
            assert await state() == breaker.CLOSED
        assert tried < 30  # while open, the jobs made no HTTP call
        assert sorted({r.event_id for r in s.received[tried:]}) == sorted(ids)
        # after the cooldown one probe went alone; its 2xx closed the breaker
        assert s.received[tried].headers["webhook-id"] in ids
        assert metric_sum(rt.metrics, "chert_relay_delivery_waits_total", reason="breaker_open") > 0
        # closed, its window started afresh by the probe's success
        assert await redis.hget(rt.keys.breaker(TENANT, "s"), "s") is None
        assert await redis.hget(rt.keys.breaker(TENANT, "s"), "cf") == b"0"
        lines = [r.getMessage() for r in caplog.records if r.name == "relay.delivery.breaker"]
        opened = [m for m in lines if " opened" in m]
        assert len(opened) == 1, lines
        assert "3 of 3 attempts failed in the last 30s, last error: HTTP 503: nope" in opened[0]
        assert any("half-open: one delivery goes as a probe" in m for m in lines), lines
        assert sum("closed: the probe succeeded" in m for m in lines) == 1, lines


async def test_an_unreadable_stored_event_is_dropped_not_retried_forever(
    redis: Redis, redis_url: str
) -> None:
    async with sinks(Sink(), Sink()) as (a, b):
        cfg = config_with(redis_url, [sink_conf("a", a.url), sink_conf("b", b.url)])
        rt = runtime(redis, cfg)
        await ingest(rt, ["garbled", "hashed"])
        # Damaged by hand, or written by an earlier build as a hash.
        await redis.set(f"chert-relay:ev:{TENANT}:garbled", b"not a stored event")
        await redis.delete(f"chert-relay:ev:{TENANT}:hashed")
        await redis.hset(f"chert-relay:ev:{TENANT}:hashed", "body", b"{}")  # type: ignore[arg-type]
        async with worker(rt):
            await wait_for(lambda: drained(redis), 15)
        assert a.received == b.received == []
        for sink in ("a", "b"):
            assert (
                rt.metrics.registry.get_sample_value(
                    "chert_relay_deliveries_total",
                    {"tenant": TENANT, "sink": sink, "outcome": "missing", "class": "none"},
                )
                == 2
            )
        assert await DeadLetterStore(redis, cfg).find(Filter()) == []
        assert await redis.keys(JOB_KEY_PREFIX + "*") == []  # nothing left to run


async def test_a_second_dead_letter_for_the_same_delivery_lets_the_event_go(
    redis: Redis, redis_url: str
) -> None:
    async with sinks(Sink(lambda s, r: (400, {}))) as (a,):
        cfg = config_with(redis_url, [sink_conf("crm", a.url)])
        rt = runtime(redis, cfg)
        store = DeadLetterStore(redis, cfg)
        ev = f"chert-relay:ev:{TENANT}:e1"
        async with worker(rt):
            await ingest(rt, ["e1"])
            await wait_for(lambda: _dead_letters(store, 1, redis), 15)
            # The dedupe window passes and the event comes again; its new job fails too.
            await redis.delete(f"chert-relay:seen:{TENANT}:e1")
            await ingest(rt, ["e1"], source="backfill")
            await wait_for(lambda: _received(a, 2), 15)
            await wait_for(lambda: _dead_letters(store, 1, redis), 15)
        assert await redis.pttl(ev) == -1  # the one dead letter holds it
        assert (await store.purge(Filter())).done
        assert await redis.exists(ev) == 0  # nothing holds it any more


async def _received(sink: Sink, n: int) -> bool:
    return len(sink.received) >= n


async def _dead_letters(store: DeadLetterStore, n: int, redis: Redis) -> bool:
    return len(await store.find(Filter())) == n and await drained(redis)


async def test_a_delivery_put_off_keeps_its_job_and_event_until_its_deadline(
    redis: Redis, redis_url: str
) -> None:
    url = "http://127.0.0.1:9/hook"
    rt = runtime(redis, config_with(redis_url, [sink_conf("s", url, max_age=60)]))
    await ingest(rt, ["e1"])
    # The sink will be down a while: max_age goes up to 10 days by a reload, and its
    # breaker is open, so the job only ever waits (set aside) and must not expire.
    rt.config = config_with(redis_url, [sink_conf("s", url, max_age=10 * 86400)])
    opened = int(time.time() * 1000) + 3_600_000
    await redis.hset(rt.keys.breaker(TENANT, "s"), mapping={"s": "o", "u": opened})
    att = rt.keys.attempts(TENANT, "s", "e1")
    job_id = Keys("chert-relay").job_id(TENANT, "s", "e1")
    async with worker(rt):
        await wait_for(lambda: redis.zscore(rt.keys.waiting(TENANT, "s"), job_id), 10)
    left = int(await redis.hget(att, "dl")) - int(time.time() * 1000)
    assert left > 9 * 86400_000
    for key in (JOB_KEY_PREFIX + job_id, rt.keys.event(TENANT, "e1"), att):
        ttl = await redis.pttl(key)
        assert ttl == -1 or ttl >= left, key


async def test_a_delivery_whose_sink_is_busy_waits_set_aside_until_a_slot_frees(
    redis: Redis, redis_url: str
) -> None:
    # The sink's one slot is taken (a delivery elsewhere holds it for a minute): the job
    # is set aside once — out of the queue, not read again and again — and goes the
    # moment the slot is given back, with its deadline moved back by its wait.
    async with sinks(Sink()) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, concurrency=1)])
        rt = runtime(redis, cfg)
        keys = rt.keys
        lease = keys.inflight(TENANT, "s")
        await redis.zadd(lease, {"elsewhere": time.time() * 1000 + 60_000})
        await ingest(rt, ["e1"])
        job_id = keys.job_id(TENANT, "s", "e1")
        async with worker(rt):
            await wait_for(lambda: redis.zscore(keys.waiting(TENANT, "s"), job_id), 10)
            assert await redis.zcard(keys.queue) == 0
            assert await redis.pttl(JOB_KEY_PREFIX + job_id) == -1  # no expiry while waiting
            dl = int(await redis.hget(keys.attempts(TENANT, "s", "e1"), "dl"))
            await redis.zrem(lease, "elsewhere")
            await wait_for(lambda: s.ids() == ["e1"], 10)
            await wait_for(lambda: drained(redis), 10)
        assert metric_sum(rt.metrics, "chert_relay_delivery_waits_total", reason="busy") == 1
        assert metric_sum(rt.metrics, "chert_relay_delivery_deferrals_total") == 0
        assert await redis.scard(keys.waiting_sinks) == 0
        assert dl > 0


async def test_a_busy_sink_gets_its_backlog_in_order_never_over_its_cap_without_rereads(
    redis: Redis, redis_url: str
) -> None:
    # 60 deliveries to a sink that takes 2 at a time: each waits at most once (no
    # deliveries put off and read again), they go in the order they were queued, and
    # the sink never has more than 2 in flight.
    async def slow(_s: Sink, _r: Received) -> tuple[int, dict[str, str]]:
        await asyncio.sleep(0.005)
        return 200, {}

    async with sinks(Sink(slow)) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, concurrency=2)])
        rt = runtime(redis, cfg)
        ids = [f"o{i:02d}" for i in range(60)]
        await ingest(rt, ids)
        async with worker(rt):
            await wait_for(lambda: len(set(s.ids())) == 60, 30)
            await wait_for(lambda: drained(redis), 10)
        assert s.max_running <= 2
        got = s.ids()
        assert len(got) == 60  # each once
        late = sum(1 for a, b in itertools.pairwise(got) if a > b)
        assert late <= 2, got  # in queue order, but for the two slots' own interleaving
        assert metric_sum(rt.metrics, "chert_relay_delivery_waits_total", reason="busy") <= 60
        assert metric_sum(rt.metrics, "chert_relay_delivery_deferrals_total") == 0


async def test_a_wait_past_the_deadline_still_leaves_a_last_attempt(
    redis: Redis, redis_url: str
) -> None:
    # The sink asks for an hour; the delivery has 4 s: one more try at the end, then done.
    async with sinks(Sink(lambda s, r: (503, {"Retry-After": "3600"}))) as (a,):
        cfg = config_with(
            redis_url, [sink_conf("s", a.url, timeout=0.5, max_age=4)], retry_after_max=3600
        )
        rt = runtime(redis, cfg)
        store = DeadLetterStore(redis, cfg)
        before = time.monotonic()
        await ingest(rt, ["e1"])
        async with worker(rt):
            await wait_for(lambda: _dead_letters(store, 1, redis), 20)
        assert [r.attempt for r in a.received] == [1, 2]
        # Not before max_age minus the sink's timeout minus 1 s after the event came in.
        assert a.received[1].at - before >= 4 - 0.5 - 1 - 0.1
        [d] = await store.find(Filter())
        assert d.cls == "exhausted"
        assert d.error.startswith("past max_age")


async def test_a_sink_added_by_a_reload_that_reached_serve_first_waits_for_the_worker(
    redis: Redis, redis_url: str
) -> None:
    # serve is reloaded first: it queues deliveries to "new", a sink the worker does not
    # know yet. They wait (put off, no attempt, no dead letter) until the worker's own
    # reload, then go.
    async with sinks(Sink(), Sink()) as (s, new):
        both = config_with(redis_url, [sink_conf("s", s.url), sink_conf("new", new.url)])
        served = runtime(redis, both)
        rt = runtime(redis, config_with(redis_url, [sink_conf("s", s.url)]))
        async with worker(rt) as role:
            await ingest(served, ["n1", "n2"])
            await wait_for(lambda: sorted(s.ids()) == ["n1", "n2"], 10)
            deferred = 'reason="unknown_sink",sink="new"'
            await wait_for(lambda: deferred in rt.metrics.render().decode(), 10)
            assert new.ids() == []
            assert await redis.zcard(rt.keys.dead_letters(TENANT)) == 0
            role.reload(both)
            await wait_for(lambda: sorted(new.ids()) == ["n1", "n2"], 10)
            await wait_for(lambda: drained(redis), 10)
        assert await redis.zcard(rt.keys.dead_letters(TENANT)) == 0
