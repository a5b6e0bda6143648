"""Ingest: one atomic step marks an event seen, stores it once, and enqueues its jobs."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from arq.worker import Worker, func
from redis.asyncio import Redis

from relay.ingest import envelope
from relay.ingest.ingestor import Ingestor
from relay.keys import JOB_KEY_PREFIX, Keys
from relay.store import jobs
from tests.support.common import TENANT, make_config, stored_event
from tests.support.common import envelope as make_envelope


def event(event_id: str, etype: str = "message.received") -> envelope.Event:
    return envelope.from_object(make_envelope(event_id, etype))


async def test_new_event_is_stored_once_and_queued_per_matching_sink(redis: Redis) -> None:
    cfg = make_config()
    ing = Ingestor(redis, cfg)
    assert await ing.ingest(TENANT, event("e1"), "webhook") is True
    assert await ing.ingest(TENANT, event("e1"), "poll") is False

    q = Keys(cfg.redis.key_prefix).queue
    ids = sorted(x.decode() for x in await redis.zrange(q, 0, -1))
    assert ids == [
        Keys("chert-relay").job_id(TENANT, "all", "e1"),
        Keys("chert-relay").job_id(TENANT, "crm", "e1"),
    ]
    keys = Keys("chert-relay")
    stored = await stored_event(redis, "e1")
    assert stored is not None
    assert json.loads(stored.body)["event_id"] == "e1"
    assert (stored.source, stored.type, stored.users) == ("webhook", "message.received", 2)
    assert await redis.ttl(keys.seen(TENANT, "e1")) > 0
    assert await redis.get(keys.last_webhook(TENANT)) is not None


async def test_sink_filter_excludes_other_types(redis: Redis) -> None:
    cfg = make_config()
    ing = Ingestor(redis, cfg)
    assert await ing.ingest(TENANT, event("r1", "reaction.added"), "poll")
    ids = [x.decode() for x in await redis.zrange(Keys("chert-relay").queue, 0, -1)]
    assert ids == [Keys("chert-relay").job_id(TENANT, "all", "r1")]
    # Not a webhook: the last-webhook mark is untouched.
    assert await redis.get(Keys("chert-relay").last_webhook(TENANT)) is None


async def test_concurrent_ingests_batch_and_dedupe(redis: Redis) -> None:
    ing = Ingestor(redis, make_config(), max_batch=16)
    ids = [f"b{i % 150}" for i in range(300)]  # every id twice
    results = await asyncio.gather(*(ing.ingest(TENANT, event(i), "webhook") for i in ids))
    assert sum(results) == 150
    assert await redis.zcard(Keys("chert-relay").queue) == 300  # 150 events x 2 sinks


async def test_arq_worker_runs_jobs_ingest_wrote(redis: Redis, redis_url: str) -> None:
    """Contract: a real arq Worker deserializes and runs the jobs the Lua script wrote."""
    cfg = make_config()
    ing = Ingestor(redis, cfg)
    for i in range(5):
        await ing.ingest(TENANT, event(f"c{i}"), "webhook")
    seen: list[tuple[Any, ...]] = []

    async def deliver(ctx: dict[str, Any], *args: Any) -> None:
        seen.append((ctx["job_try"], *args))

    from arq.connections import RedisSettings

    worker = Worker(
        functions=[func(deliver, name=jobs.DELIVER_FUNCTION)],
        queue_name=Keys(cfg.redis.key_prefix).queue,
        redis_settings=RedisSettings.from_dsn(redis_url),
        burst=True,
        handle_signals=False,
        keep_result=0,
        job_serializer=jobs.serialize,
        job_deserializer=jobs.deserialize,
        poll_delay=0.01,
    )
    try:
        await worker.main()
    finally:
        await worker.close()
    assert sorted(seen) == sorted(
        (1, TENANT, sink, f"c{i}") for i in range(5) for sink in ("all", "crm")
    )
    assert worker.jobs_complete == 10
    assert worker.jobs_failed == 0


async def test_a_batch_with_thousands_of_jobs_queues_them_all(redis: Redis) -> None:
    sinks = [{"name": f"s{i}", "url": f"http://127.0.0.1:9/{i}"} for i in range(8)]
    ing = Ingestor(redis, make_config(sinks=sinks), max_batch=400)
    results = await asyncio.gather(
        *(ing.ingest(TENANT, event(f"big{i}"), "poll") for i in range(400))
    )
    assert all(results)
    assert await redis.zcard(Keys("chert-relay").queue) == 400 * 8


async def test_a_reload_that_drops_a_tenant_fails_no_queued_ingest(redis: Redis) -> None:
    cfg = make_config()
    ing = Ingestor(redis, cfg)
    first = asyncio.ensure_future(ing.ingest(TENANT, event("rl1"), "webhook"))
    second = asyncio.ensure_future(ing.ingest("other-1", event("rl2"), "webhook"))
    await asyncio.sleep(0)  # both are queued for the next batch, not yet written
    ing.set_config(make_config(tenants=[cfg.tenants[0].model_dump()]))
    assert list(await asyncio.wait_for(asyncio.gather(first, second), 10)) == [True, True]


async def test_reingest_after_the_seen_mark_expired_keeps_a_dead_letters_payload(
    redis: Redis,
) -> None:
    keys = Keys("chert-relay")
    ing = Ingestor(redis, make_config())
    assert await ing.ingest(TENANT, event("dl1"), "webhook")
    # Both deliveries ended: one delivered, one dead-lettered, which keeps the event.
    for sink in ("crm", "all"):
        job_id = Keys("chert-relay").job_id(TENANT, sink, "dl1")
        await redis.delete(JOB_KEY_PREFIX + job_id)
        await redis.zrem(Keys("chert-relay").queue, job_id)
    await redis.setrange(keys.event(TENANT, "dl1"), 0, b"0001")
    await redis.persist(keys.event(TENANT, "dl1"))
    await redis.delete(keys.seen(TENANT, "dl1"))  # the dedupe window has passed

    assert await ing.ingest(TENANT, event("dl1"), "backfill")
    stored = await stored_event(redis, "dl1")
    assert stored is not None
    assert stored.users == 3  # the dead letter's hold plus two new jobs
    assert stored.source == "webhook"  # the stored event is not replaced
    assert await redis.pttl(keys.event(TENANT, "dl1")) == -1  # still kept for the dead letter
    assert await redis.zcard(Keys("chert-relay").queue) == 2


async def test_the_seen_mark_outlives_the_longest_delivery(redis: Redis) -> None:
    sinks = [{"name": "slow", "url": "http://127.0.0.1:9/s", "max_age": "30d"}]
    ing = Ingestor(redis, make_config(sinks=sinks))  # dedupe_ttl is 1h in tests
    assert await ing.ingest(TENANT, event("long1"), "webhook")
    assert await redis.pttl(Keys("chert-relay").seen(TENANT, "long1")) > 30 * 86400 * 1000


async def test_a_job_already_queued_is_not_counted_again(redis: Redis) -> None:
    # A job for (event, sink) queued without its seen mark (a replayed dead letter whose
    # dedupe window passed): the new copy makes a job for the other sink only.
    crm_job = Keys("chert-relay").job_id(TENANT, "crm", "q1")
    await redis.set(JOB_KEY_PREFIX + crm_job, b"{}", px=60_000)
    assert await Ingestor(redis, make_config()).ingest(TENANT, event("q1"), "webhook")
    stored = await stored_event(redis, "q1")
    assert stored is not None
    assert stored.users == 1
    assert await redis.get(JOB_KEY_PREFIX + crm_job) == b"{}"  # not replaced
    assert await redis.zcard(Keys("chert-relay").queue) == 1


async def test_an_event_stored_by_an_earlier_build_does_not_break_the_batch(
    redis: Redis,
) -> None:
    # An earlier build stored events as a hash; one is still held by a dead letter.
    keys = Keys("chert-relay")
    old = keys.event(TENANT, "old1")
    await redis.hset(old, mapping={"body": b"{}", "type": "message.received", "n": 1})
    ing = Ingestor(redis, make_config())
    both = await asyncio.gather(
        ing.ingest(TENANT, event("old1"), "backfill"), ing.ingest(TENANT, event("new1"), "poll")
    )
    assert list(both) == [True, True]
    stored = await stored_event(redis, "old1")
    assert stored is not None
    assert stored.users == 3  # the dead letter's hold plus two new jobs
    assert json.loads(stored.body)["event_id"] == "old1"
    assert await redis.pttl(old) == -1  # still kept for the dead letter
    assert await redis.zcard(Keys("chert-relay").queue) == 4
