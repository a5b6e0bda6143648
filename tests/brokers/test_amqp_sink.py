"""The amqp sink against a real RabbitMQ node: a publisher confirm is delivered, an
unroutable message is retried, a missing exchange is refused, chats become routing-key
tokens, and a broker restart under load loses nothing."""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio import Redis
from standardwebhooks.webhooks import Webhook

from relay.store.deadletters import DeadLetterStore, Filter
from relay.store.eventlog import EventLog
from tests.support.brokers import RabbitServer
from tests.support.common import SINK_SECRET, TENANT, wait_for
from tests.support.delivery import config_with, ingest, metric_sum, runtime, sink_conf, worker


def amqp_sink(url: str, exchange: str, routing_key: str, **extra: Any) -> dict[str, Any]:
    return {**sink_conf("mq", url, exchange=exchange, routing_key=routing_key), **extra}


def delivered(rt: Any, n: int) -> Any:
    labels = {"sink": "mq", "outcome": "delivered"}
    return lambda: metric_sum(rt.metrics, "chert_relay_deliveries_total", **labels) >= n


def headers_of(message: Any) -> dict[str, str]:
    return {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in message.headers.items()}


async def test_each_event_is_one_confirmed_persistent_message(
    redis: Redis, redis_url: str, rabbit_server: RabbitServer
) -> None:
    await rabbit_server.declare("chert1", "direct", "q1", "events")
    cfg = config_with(redis_url, [amqp_sink(rabbit_server.url, "chert1", "events")])
    assert cfg.tenants[0].sinks[0].kind == "amqp"
    rt = runtime(redis, cfg)
    ids = [f"a-{i:03d}" for i in range(100)]
    await ingest(rt, ids)
    async with worker(rt):
        await wait_for(delivered(rt, 100), 30)
    got = await rabbit_server.messages("q1")
    assert sorted(str(m.message_id) for m in got) == ids  # each exactly once
    first = next(m for m in got if m.message_id == "a-007")
    assert json.loads(first.body)["event_id"] == "a-007"
    assert first.delivery_mode == 2  # persistent
    assert first.type == "message.received"
    assert first.content_type == "application/json"
    headers = headers_of(first)
    assert headers["webhook-id"] == "a-007"
    assert headers["X-Chert-Tenant"] == TENANT
    assert headers["X-Chert-Chat-Id"] == "17f6e9ed"
    Webhook(SINK_SECRET).verify(first.body, headers)
    rec = await EventLog(redis, cfg).get(TENANT, "a-007")
    assert rec is not None
    [attempt] = next(s for s in rec.sinks if s.sink == "mq").attempts
    assert attempt.kind == "ack"
    assert attempt.excerpt.startswith("confirmed by the broker")


async def test_an_unroutable_message_is_retried_until_a_queue_is_bound(
    redis: Redis, redis_url: str, rabbit_server: RabbitServer
) -> None:
    await rabbit_server.declare("chert2", "direct", "q2-other", "other-key")
    cfg = config_with(
        redis_url, [amqp_sink(rabbit_server.url, "chert2", "events")], retry_backoff_max=0.3
    )
    rt = runtime(redis, cfg)
    await ingest(rt, ["u-1"])
    async with worker(rt):
        retried = {"sink": "mq", "outcome": "retried", "class": "nack"}
        await wait_for(
            lambda: metric_sum(rt.metrics, "chert_relay_deliveries_total", **retried) >= 2, 20
        )
        await rabbit_server.declare("chert2", "direct", "q2", "events")
        await wait_for(delivered(rt, 1), 20)
    assert [m.message_id for m in await rabbit_server.messages("q2")] == ["u-1"]
    rec = await EventLog(redis, cfg).get(TENANT, "u-1")
    assert rec is not None
    first = next(s for s in rec.sinks if s.sink == "mq").attempts[0]
    assert "unroutable" in first.error


async def test_a_missing_exchange_is_refused_then_a_replay_delivers(
    redis: Redis, redis_url: str, rabbit_server: RabbitServer
) -> None:
    cfg = config_with(redis_url, [amqp_sink(rabbit_server.url, "chert5", "events")])
    rt = runtime(redis, cfg)
    await ingest(rt, ["m-1", "m-2"])
    store = DeadLetterStore(redis, cfg)
    async with worker(rt):
        await wait_for(lambda: _count(store, 2), 20)
        for d in await store.find(Filter()):
            assert (d.cls, d.attempts) == ("rejected", 1)
            assert "NOT_FOUND" in d.error
        # The operator declares the exchange and replays: the same worker (its channel
        # was closed by the broker) delivers them.
        await rabbit_server.declare("chert5", "direct", "q5", "events")
        out = await store.replay(Filter(sink="mq"))
        assert len(out.done) == 2
        await wait_for(delivered(rt, 2), 20)
    assert sorted(str(m.message_id) for m in await rabbit_server.messages("q5")) == ["m-1", "m-2"]
    assert await store.find(Filter()) == []


async def _count(store: DeadLetterStore, n: int) -> bool:
    return len(await store.find(Filter())) >= n


async def test_a_wrong_password_is_refused_and_never_shown(
    redis: Redis, redis_url: str, rabbit_server: RabbitServer, monkeypatch: Any
) -> None:
    monkeypatch.setenv("MQ_PASSWORD", "not-the-password-4321")
    url = rabbit_server.url.replace("guest:guest@", "guest@")
    cfg = config_with(redis_url, [amqp_sink(url, "x", "k", password="env:MQ_PASSWORD")])
    rt = runtime(redis, cfg)
    await ingest(rt, ["p-1"])
    store = DeadLetterStore(redis, cfg)
    async with worker(rt):
        await wait_for(lambda: store.find(Filter()), 20)
    [d] = await store.find(Filter())
    assert d.cls == "rejected"
    assert "ACCESS_REFUSED" in d.error
    assert "not-the-password-4321" not in d.error


async def test_ordered_chats_become_routing_key_tokens_in_order(
    redis: Redis, redis_url: str, rabbit_server: RabbitServer
) -> None:
    await rabbit_server.declare("chert3", "topic", "q3", "events.#")
    cfg = config_with(
        redis_url,
        [amqp_sink(rabbit_server.url, "chert3", "events", ordering="chat", concurrency=8)],
    )
    rt = runtime(redis, cfg)
    ids = [f"c-{i:03d}" for i in range(60)]
    for i in ids:
        await ingest(rt, [i])
    async with worker(rt):
        await wait_for(delivered(rt, 60), 30)
    got = await rabbit_server.messages("q3")
    assert {m.routing_key for m in got} == {"events.17f6e9ed"}
    assert [m.message_id for m in got] == ids


async def test_a_broker_restart_under_load_loses_nothing(
    redis: Redis, redis_url: str, make_rabbit_server: Any
) -> None:
    server: RabbitServer = await make_rabbit_server()
    await server.declare("chert4", "direct", "q4", "events")
    cfg = config_with(
        redis_url, [amqp_sink(server.url, "chert4", "events", timeout=2)], retry_backoff_max=0.5
    )
    rt = runtime(redis, cfg)
    ids = [f"r-{i:04d}" for i in range(400)]
    async with worker(rt):
        await ingest(rt, ids[:200])
        await wait_for(delivered(rt, 50), 30)
        server.kill()
        await ingest(rt, ids[200:])
        failed = {"sink": "mq", "outcome": "retried"}
        await wait_for(
            lambda: metric_sum(rt.metrics, "chert_relay_deliveries_total", **failed) >= 1, 30
        )  # the broker's absence was met
        await server.restart()
        await wait_for(delivered(rt, 400), 90)
    got = [m.message_id for m in await server.messages("q4")]
    assert set(got) == set(ids)  # every acked webhook is in the queue, at least once
    assert await DeadLetterStore(redis, cfg).find(Filter()) == []
