"""Delivery faults: a finish whose reply was lost, a sink secret that is not a key, a
``Retry-After: 0`` that must not cut the backoff short, and a claim that fails part way
on a damaged record."""

from __future__ import annotations

import time
from typing import Any

import redis.exceptions
from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
from redis.asyncio import Redis

from relay.config import Config
from relay.config.values import Secret
from relay.delivery.retry import backoff
from relay.delivery.role import WorkerRole
from relay.keys import Keys
from relay.store.deadletters import DeadLetterStore, Filter
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
)

QUEUE = Keys("chert-relay").queue
BAD_SECRET = "whsec_not-base64!!"


def job_id(sink: str, event_id: str) -> str:
    return Keys("chert-relay").job_id(TENANT, sink, event_id)


def runs_settled(role: WorkerRole, runs: int) -> bool:
    """``runs`` job runs have ended, including arq's own bookkeeping after each."""
    w = role.loop
    ended = w.jobs_complete + w.jobs_retried + w.jobs_failed
    return ended >= runs and all(t.done() for t in w.tasks.values())


def lose_finish_reply(role: WorkerRole, *, before: bool) -> dict[str, int]:
    """The next finish-script call fails with a connection error, once: ``before`` it
    reaches Redis, or after it ran (its reply lost)."""
    deliverer = role.deliverer
    assert deliverer is not None
    real = deliverer.steps.commit_finish
    state = {"lost": 0}

    async def finish(*args: Any, **kwargs: Any) -> Any:
        if state["lost"]:
            return await real(*args, **kwargs)
        state["lost"] += 1
        if not before:
            await real(*args, **kwargs)
        raise redis.exceptions.ConnectionError("connection lost while reading the reply")

    deliverer.steps.commit_finish = finish
    return state


async def test_a_lost_finish_reply_does_not_requeue_a_delivered_job(
    redis: Redis, redis_url: str
) -> None:
    async with sinks(Sink()) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url)])
        rt = runtime(redis, cfg)
        async with worker(rt) as role:
            state = lose_finish_reply(role, before=False)
            await ingest(rt, ["f1"])
            await wait_for(lambda: runs_settled(role, 1), 10)
            assert state["lost"] == 1
            jid = job_id("s", "f1")
            # The delivery was recorded; arq did not re-create the queue entry.
            assert await redis.zcard(QUEUE) == 0
            assert await redis.exists(job_key_prefix + jid, retry_key_prefix + jid) == 0
            assert await redis.exists(in_progress_key_prefix + jid) == 0
        assert s.ids() == ["f1"]
        expired = {"tenant": TENANT, "sink": "s", "outcome": "expired", "class": "none"}
        assert rt.metrics.registry.get_sample_value("chert_relay_deliveries_total", expired) == 0


async def test_a_fault_before_finish_reschedules_the_job_later(
    redis: Redis, redis_url: str
) -> None:
    async with sinks(Sink()) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url)])
        rt = runtime(redis, cfg)
        async with worker(rt) as role:
            state = lose_finish_reply(role, before=True)
            await ingest(rt, ["f2"])
            await wait_for(lambda: runs_settled(role, 1), 10)
            assert state["lost"] == 1
            jid = job_id("s", "f2")
            score = await redis.zscore(QUEUE, jid)
            assert score is not None
            assert score > time.time() * 1000  # later, not now
            assert await redis.exists(job_key_prefix + jid) == 1
        assert s.ids() == ["f2"]


def with_sink_secret(cfg: Config, value: str) -> Config:
    """``cfg`` with its one sink's secret replaced, unvalidated (as a reload could bring)."""
    tenant = cfg.tenants[0]
    sink = tenant.sinks[0].model_copy(update={"secret": Secret(value, "literal")})
    return cfg.model_copy(update={"tenants": [tenant.model_copy(update={"sinks": [sink]})]})


async def test_a_secret_that_is_not_base64_dead_letters_without_an_attempt(
    redis: Redis, redis_url: str
) -> None:
    async with sinks(Sink()) as (s,):
        cfg = with_sink_secret(config_with(redis_url, [sink_conf("s", s.url)]), BAD_SECRET)
        rt = runtime(redis, cfg)
        await ingest(rt, ["k1"])
        store = DeadLetterStore(redis, cfg)
        async with worker(rt):
            await wait_for(lambda: store.find(Filter()), 10)
        [d] = await store.find(Filter())
        assert (d.sink, d.event_id, d.cls, d.attempts, d.status) == ("s", "k1", "rejected", 0, None)
        assert "not valid base64" in d.error
        assert BAD_SECRET not in d.error
        assert s.received == []
        assert await redis.zcard(QUEUE) == 0
        assert await redis.exists(rt.keys.inflight(TENANT, "s"), rt.keys.breaker(TENANT, "s")) == 0
        assert await redis.exists(rt.keys.attempts(TENANT, "s", "k1")) == 0


async def test_retry_after_zero_does_not_cut_the_backoff_short(
    redis: Redis, redis_url: str
) -> None:
    def busy(sink: Sink, got: Received) -> tuple[int, dict[str, str]]:
        return (429, {"Retry-After": "0"}) if len(sink.received) <= 3 else (200, {})

    base = 0.1
    async with sinks(Sink(busy)) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, max_attempts=10)], retry_backoff=base)
        rt = runtime(redis, cfg)
        await ingest(rt, ["z1"])
        async with worker(rt):
            await wait_for(lambda: len(s.received) == 4, 20)
        assert [r.attempt for r in s.received] == [1, 2, 3, 4]
        gaps = [b.at - a.at for a, b in zip(s.received, s.received[1:], strict=False)]
        # Each wait is at least the jittered backoff (75% of base * 2**(n-1)), less 5 ms
        # for millisecond rounding of the due time.
        floors = [0.75 * base * 2**n - 0.005 for n in range(3)]
        assert all(g >= f for g, f in zip(gaps, floors, strict=True)), (gaps, floors)


def test_retry_after_lengthens_but_never_shortens_the_backoff() -> None:
    assert backoff(3, 1.0, 100.0, retry_after=0.0, rand=1.0) == 4.0
    assert backoff(1, 1.0, 100.0, retry_after=0.0, rand=0.0) == 0.75
    assert backoff(1, 1.0, 100.0, retry_after=7.0, rand=1.0) == 7.0
    assert backoff(1, 1.0, 100.0, retry_after=1e9, retry_after_max=60.0) == 60.0
    assert backoff(8, 1.0, 100.0, retry_after=5.0, retry_after_max=60.0, rand=1.0) == 100.0


async def test_a_claim_that_fails_on_a_damaged_record_holds_that_job_and_the_rest_go(
    redis: Redis, redis_url: str
) -> None:
    # e1's attempts record is a string (damaged by hand): its claim fails part way and
    # fails the take. The job is held by its in-progress mark, as a take always held it,
    # so the next take passes it by and e2 is delivered; without the mark every take
    # would fail on e1 again at once, and nothing would be delivered.
    async with sinks(Sink()) as (s,):
        rt = runtime(redis, config_with(redis_url, [sink_conf("s", s.url)]))
        await ingest(rt, ["e1", "e2"])
        await redis.set(rt.keys.attempts(TENANT, "s", "e1"), "damaged")
        async with worker(rt):
            await wait_for(lambda: s.ids() == ["e2"], 30)
        assert await redis.exists(in_progress_key_prefix + job_id("s", "e1"))
