"""The redis-stream sink against a real second redis-server: what an entry carries, and
how each answer of Redis ends the delivery (acked, retried, refused)."""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio import Redis
from standardwebhooks.webhooks import Webhook

from relay.admin.sinks import configured, send_test_event, sink_states
from relay.store.deadletters import DeadLetterStore, Filter
from relay.store.embedded import EmbeddedRedis
from relay.store.eventlog import EventLog
from tests.support.common import SINK_SECRET, TENANT, wait_for
from tests.support.delivery import config_with, ingest, metric_sum, runtime, sink_conf, worker

STREAM = "chert-events"


def stream_sink(url: str, **extra: Any) -> dict[str, Any]:
    conf = sink_conf("stream", url, stream=STREAM)
    del conf["url"]
    return {"url": url, **conf, **extra}


async def entries(client: Redis, stream: str = STREAM) -> list[dict[str, bytes]]:
    found = await client.xrange(stream)
    return [{k.decode(): v for k, v in fields.items()} for _, fields in found]


async def test_each_event_is_one_entry_with_the_http_metadata(
    redis: Redis, redis_url: str, make_redis_server: Any
) -> None:
    other: EmbeddedRedis = await make_redis_server()
    target: Redis = Redis.from_url(other.url)
    try:
        cfg = config_with(redis_url, [stream_sink(other.url + "/2")])
        assert cfg.tenants[0].sinks[0].kind == "redis-stream"  # named by the scheme
        rt = runtime(redis, cfg)
        ids = [f"evt-{i:03d}" for i in range(200)]
        await ingest(rt, ids)
        db2: Redis = Redis.from_url(other.url + "/2")
        async with worker(rt):
            await wait_for(lambda: _count(db2, 200), 30)
        got = await entries(db2)
        await db2.aclose()
        assert sorted(e["webhook-id"].decode() for e in got) == ids  # each exactly once
        first = next(e for e in got if e["webhook-id"] == b"evt-007")
        body = first["body"]
        assert json.loads(body)["event_id"] == "evt-007"
        assert first["X-Chert-Event-Type"] == b"message.received"
        assert first["X-Chert-Tenant"] == TENANT.encode()
        assert first["X-Relay-Attempt"] == b"1"
        assert first["X-Relay-Source"] == b"webhook"
        assert first["X-Chert-Chat-Id"] == b"17f6e9ed"
        headers = {
            k: first[k].decode() for k in ("webhook-id", "webhook-timestamp", "webhook-signature")
        }
        Webhook(SINK_SECRET).verify(body, headers)  # the same signature as over HTTP
        assert (
            metric_sum(
                rt.metrics,
                "chert_relay_deliveries_total",
                sink="stream",
                outcome="delivered",
                **{"class": "ack"},
            )
            == 200
        )
        rec = await EventLog(redis, cfg).get(TENANT, "evt-007")
        assert rec is not None
        [attempt] = next(s for s in rec.sinks if s.sink == "stream").attempts
        assert attempt.kind == "ack"
        assert attempt.status is None
        assert attempt.excerpt.startswith(f"XADD {STREAM} ")
    finally:
        await target.aclose()


async def _count(client: Redis, want: int) -> bool:
    return int(await client.xlen(STREAM)) >= want


async def test_a_redis_restarted_under_load_loses_nothing(
    redis: Redis, redis_url: str, make_redis_server: Any
) -> None:
    """A restart (SIGTERM: Redis writes its AOF out first) in the middle of a drain.
    (After a crash, what Redis acknowledged survives as its appendfsync allows.)"""
    other: EmbeddedRedis = await make_redis_server()
    cfg = config_with(redis_url, [stream_sink(other.url, timeout=1)], retry_backoff_max=0.3)
    rt = runtime(redis, cfg)
    ids = [f"down-{i:03d}" for i in range(400)]
    delivered = {"sink": "stream", "outcome": "delivered"}
    retried = {"sink": "stream", "outcome": "retried", "class": "connection"}
    async with worker(rt):
        await ingest(rt, ids[:200])
        await wait_for(
            lambda: metric_sum(rt.metrics, "chert_relay_deliveries_total", **delivered) >= 20, 20
        )
        await other.stop()  # keeps its port and data
        await ingest(rt, ids[200:])
        await wait_for(
            lambda: metric_sum(rt.metrics, "chert_relay_deliveries_total", **retried) >= 1, 20
        )
        await other.start()
        target: Redis = Redis.from_url(other.url)
        try:
            await wait_for(
                lambda: metric_sum(rt.metrics, "chert_relay_deliveries_total", **delivered) >= 400,
                60,
            )
            got = await entries(target)
        finally:
            await target.aclose()
    assert {e["webhook-id"].decode() for e in got} == set(ids)  # none lost
    assert await DeadLetterStore(redis, cfg).find(Filter()) == []


async def test_a_key_that_is_not_a_stream_is_refused_with_redis_reason(
    redis: Redis, redis_url: str, make_redis_server: Any
) -> None:
    other: EmbeddedRedis = await make_redis_server()
    target: Redis = Redis.from_url(other.url)
    await target.set(STREAM, "not a stream")
    await target.aclose()
    cfg = config_with(redis_url, [stream_sink(other.url)])
    rt = runtime(redis, cfg)
    await ingest(rt, ["wrong-1"])
    store = DeadLetterStore(redis, cfg)
    async with worker(rt):
        await wait_for(lambda: store.find(Filter()), 10)
    [d] = await store.find(Filter())
    assert (d.cls, d.status, d.attempts) == ("rejected", None, 1)
    assert "WRONGTYPE" in d.error


async def test_a_wrong_password_is_refused_and_never_shown(
    redis: Redis, redis_url: str, make_redis_server: Any, monkeypatch: Any
) -> None:
    other: EmbeddedRedis = await make_redis_server()
    target: Redis = Redis.from_url(other.url)
    await target.config_set("requirepass", "the-right-password-1234")
    await target.aclose()
    monkeypatch.setenv("STREAM_PASSWORD", "a-wrong-password-5678")
    cfg = config_with(redis_url, [stream_sink(other.url, password="env:STREAM_PASSWORD")])
    rt = runtime(redis, cfg)
    await ingest(rt, ["auth-1"])
    store = DeadLetterStore(redis, cfg)
    async with worker(rt):
        await wait_for(lambda: store.find(Filter()), 10)
    [d] = await store.find(Filter())
    assert d.cls == "rejected"
    assert "credentials" in d.error
    assert "a-wrong-password-5678" not in d.error


async def test_max_len_trims_the_stream_and_chat_order_holds(
    redis: Redis, redis_url: str, make_redis_server: Any
) -> None:
    other: EmbeddedRedis = await make_redis_server()
    cfg = config_with(
        redis_url, [stream_sink(other.url, max_len=10, ordering="chat", concurrency=8)]
    )
    rt = runtime(redis, cfg)
    ids = [f"o-{i:03d}" for i in range(300)]
    for i in ids:  # one chat: taken in this order
        await ingest(rt, [i])
    target: Redis = Redis.from_url(other.url)
    try:
        async with worker(rt):
            await wait_for(
                lambda: (
                    metric_sum(
                        rt.metrics,
                        "chert_relay_deliveries_total",
                        sink="stream",
                        outcome="delivered",
                    )
                    >= 300
                ),
                30,
            )
        got = [e["webhook-id"].decode() for e in await entries(target)]
        length = await target.xlen(STREAM)
    finally:
        await target.aclose()
    assert length < 300  # trimmed, about max_len (MAXLEN ~ trims whole nodes)
    assert got == ids[-len(got) :]  # the newest, in the order taken in


async def test_a_test_event_is_published_like_a_delivery(
    redis: Redis, redis_url: str, make_redis_server: Any
) -> None:
    other: EmbeddedRedis = await make_redis_server()
    cfg = config_with(redis_url, [stream_sink(other.url)])
    out = await send_test_event(cfg, TENANT, "stream", "test")
    assert out.ok
    assert (out.status, out.kind) == (None, "ack")
    assert out.excerpt.startswith(f"XADD {STREAM} ")
    target: Redis = Redis.from_url(other.url)
    try:
        [entry] = await entries(target)
    finally:
        await target.aclose()
    assert entry["webhook-id"].decode() == out.event_id
    assert entry["X-Relay-Source"] == b"test"
    [state] = await sink_states(redis, cfg, configured(cfg))  # what `sinks list` shows
    assert (state.sink, state.kind, state.gone) == ("stream", "redis-stream", False)
