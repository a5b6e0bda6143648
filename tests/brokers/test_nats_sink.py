"""The nats sink against a real nats-server with JetStream: a PubAck is delivered, the
event id dedupes inside the stream's window, chats become subject tokens, and a broker
that goes away and comes back loses nothing."""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio import Redis
from standardwebhooks.webhooks import Webhook

from relay.store.deadletters import DeadLetterStore, Filter
from relay.store.eventlog import EventLog
from tests.support.brokers import NatsServer
from tests.support.common import SINK_SECRET, TENANT, wait_for
from tests.support.delivery import config_with, ingest, metric_sum, runtime, sink_conf, worker


def nats_sink(url: str, subject: str, **extra: Any) -> dict[str, Any]:
    return {**sink_conf("bus", url, subject=subject), **extra}


def delivered(rt: Any, n: int) -> Any:
    labels = {"sink": "bus", "outcome": "delivered"}
    return lambda: metric_sum(rt.metrics, "chert_relay_deliveries_total", **labels) >= n


async def test_each_event_is_one_message_acked_by_the_stream(
    redis: Redis, redis_url: str, nats_server: NatsServer
) -> None:
    await nats_server.add_stream("EVENTS1", ["t1.events"])
    cfg = config_with(redis_url, [nats_sink(nats_server.url, "t1.events")])
    assert cfg.tenants[0].sinks[0].kind == "nats"
    rt = runtime(redis, cfg)
    ids = [f"n-{i:03d}" for i in range(100)]
    await ingest(rt, ids)
    async with worker(rt):
        await wait_for(delivered(rt, 100), 30)
    got = await nats_server.messages("EVENTS1")
    assert sorted(m.headers["webhook-id"] for m in got) == ids  # each exactly once
    first = next(m for m in got if m.headers["webhook-id"] == "n-007")
    assert first.data is not None
    assert first.headers is not None
    assert json.loads(first.data)["event_id"] == "n-007"
    assert first.headers["Nats-Msg-Id"] == "n-007"
    assert first.headers["X-Chert-Event-Type"] == "message.received"
    assert first.headers["X-Chert-Tenant"] == TENANT
    assert first.headers["X-Chert-Chat-Id"] == "17f6e9ed"
    Webhook(SINK_SECRET).verify(first.data, dict(first.headers))
    rec = await EventLog(redis, cfg).get(TENANT, "n-007")
    assert rec is not None
    [attempt] = next(s for s in rec.sinks if s.sink == "bus").attempts
    assert attempt.kind == "ack"
    assert attempt.excerpt.startswith("stream EVENTS1 seq ")


async def test_a_resend_inside_the_window_adds_no_second_message(
    redis: Redis, redis_url: str, nats_server: NatsServer
) -> None:
    await nats_server.add_stream("EVENTS2", ["t2.events"])
    cfg = config_with(redis_url, [nats_sink(nats_server.url, "t2.events")])
    rt = runtime(redis, cfg)
    await ingest(rt, ["again-1"])
    async with worker(rt):
        await wait_for(delivered(rt, 1), 20)
        log = EventLog(redis, cfg)
        assert await log.resend(TENANT, "again-1", "bus") == [("bus", "ok")]
        await wait_for(delivered(rt, 2), 20)
    assert len(await nats_server.messages("EVENTS2")) == 1
    rec = await EventLog(redis, cfg).get(TENANT, "again-1")
    assert rec is not None
    attempts = [a for s in rec.sinks if s.sink == "bus" for a in s.attempts]
    assert attempts[-1].excerpt.endswith("(a duplicate: already in the stream)")


async def test_ordered_chats_become_subject_tokens_in_order(
    redis: Redis, redis_url: str, nats_server: NatsServer
) -> None:
    await nats_server.add_stream("EVENTS3", ["t3.events.>"])
    cfg = config_with(
        redis_url, [nats_sink(nats_server.url, "t3.events", ordering="chat", concurrency=8)]
    )
    rt = runtime(redis, cfg)
    ids = [f"c-{i:03d}" for i in range(60)]
    for i in ids:
        await ingest(rt, [i])
    async with worker(rt):
        await wait_for(delivered(rt, 60), 30)
    got = await nats_server.messages("EVENTS3")
    assert {m.subject for m in got} == {"t3.events.17f6e9ed"}
    assert [m.headers["webhook-id"] for m in got] == ids


async def test_no_stream_for_the_subject_is_retried_not_lost(
    redis: Redis, redis_url: str, nats_server: NatsServer
) -> None:
    cfg = config_with(redis_url, [nats_sink(nats_server.url, "t4.events")], retry_backoff_max=0.3)
    rt = runtime(redis, cfg)
    await ingest(rt, ["late-1", "late-2"])
    async with worker(rt):
        retried = {"sink": "bus", "outcome": "retried", "class": "nack"}
        await wait_for(
            lambda: metric_sum(rt.metrics, "chert_relay_deliveries_total", **retried) >= 2, 20
        )
        await nats_server.add_stream("EVENTS4", ["t4.events"])
        await wait_for(delivered(rt, 2), 20)
    assert {m.headers["webhook-id"] for m in await nats_server.messages("EVENTS4")} == {
        "late-1",
        "late-2",
    }
    assert await DeadLetterStore(redis, cfg).find(Filter()) == []


async def test_a_message_over_the_streams_size_limit_is_refused(
    redis: Redis, redis_url: str, nats_server: NatsServer
) -> None:
    await nats_server.add_stream("EVENTS5", ["t5.events"], max_msg_size=64)
    cfg = config_with(redis_url, [nats_sink(nats_server.url, "t5.events")])
    rt = runtime(redis, cfg)
    await ingest(rt, ["big-1"])
    store = DeadLetterStore(redis, cfg)
    async with worker(rt):
        await wait_for(lambda: store.find(Filter()), 20)
    [d] = await store.find(Filter())
    assert (d.cls, d.attempts) == ("rejected", 1)
    assert "JetStream answered 400" in d.error


async def test_a_broker_restart_under_load_loses_nothing(
    redis: Redis, redis_url: str, make_nats_server: Any
) -> None:
    server: NatsServer = await make_nats_server()
    await server.add_stream("EVENTS6", ["t6.events"], storage="file")
    cfg = config_with(
        redis_url, [nats_sink(server.url, "t6.events", timeout=1)], retry_backoff_max=0.5
    )
    rt = runtime(redis, cfg)
    ids = [f"r-{i:04d}" for i in range(600)]
    async with worker(rt):
        await ingest(rt, ids[:300])
        await wait_for(delivered(rt, 50), 20)
        server.kill()
        await ingest(rt, ids[300:])
        failed = {"sink": "bus", "outcome": "retried"}
        await wait_for(
            lambda: metric_sum(rt.metrics, "chert_relay_deliveries_total", **failed) >= 1, 30
        )  # the broker's absence was met
        await server.restart()
        await wait_for(delivered(rt, 600), 60)
    got = {m.headers["webhook-id"] for m in await server.messages("EVENTS6")}
    assert got == set(ids)  # every acked webhook is in the stream
    assert await DeadLetterStore(redis, cfg).find(Filter()) == []


async def test_a_wrong_password_is_refused_and_never_shown(
    redis: Redis, redis_url: str, make_nats_server: Any, monkeypatch: Any
) -> None:
    server: NatsServer = await make_nats_server(user="relay", password="the-right-one-2468")
    monkeypatch.setenv("NATS_PASSWORD", "a-wrong-one-1357")
    url = f"nats://relay@127.0.0.1:{server.port}"
    cfg = config_with(redis_url, [nats_sink(url, "t7.events", password="env:NATS_PASSWORD")])
    rt = runtime(redis, cfg)
    await ingest(rt, ["auth-1"])
    store = DeadLetterStore(redis, cfg)
    async with worker(rt):
        await wait_for(lambda: store.find(Filter()), 20)
    [d] = await store.find(Filter())
    assert (d.cls, d.attempts) == ("rejected", 1)
    assert "Authorization Violation" in d.error
    assert "a-wrong-one-1357" not in d.error
