"""Sink filters in the pipeline: decided once at ingest — whatever way the event came —
so a filtered sink gets no job, the event log says "not routed: filter" even after the
configuration changes, a duplicate or a resend keeps the routing, and
``events_filtered_total`` counts each new event once."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from redis.asyncio import Redis

from relay.config import Config, parse_config
from relay.config.filters import compile_filter
from relay.errors import EventLogError
from relay.ingest import envelope
from relay.keys import Keys
from relay.store.eventlog import EventLog
from relay.upstream.rows import ingest_rows
from tests.support.common import TENANT, log_row, wait_for
from tests.support.common import envelope as make_envelope
from tests.support.delivery import (
    Sink,
    delivery_config,
    drained,
    metric_sum,
    runtime,
    sink_conf,
    sinks,
    worker,
)

KEYS = Keys("chert-relay")
GROUPS = {"data": {"chat": {"is_group": True}}}
READER = envelope.reader_for(compile_filter(GROUPS).paths)


def body(event_id: str, group: bool) -> dict[str, Any]:
    return make_envelope(event_id, data={"chat": {"id": f"c-{event_id}", "is_group": group}})


def config(
    redis_url: str,
    all_url: str = "http://127.0.0.1:9/all",
    groups_url: str = "http://127.0.0.1:9/groups",
    groups_filter: Any = GROUPS,
) -> Config:
    extra = {} if groups_filter is None else {"filter": groups_filter}
    sink_list = [sink_conf("all", all_url), sink_conf("groups", groups_url, **extra)]
    return parse_config(delivery_config(redis_url, sink_list), env={})


async def _jobs(redis: Redis) -> list[str]:
    return sorted(x.decode() for x in await redis.zrange(KEYS.queue, 0, -1))


def filtered_count(rt: Any, sink: str = "groups") -> float:
    return metric_sum(rt.metrics, "chert_relay_events_filtered_total", tenant=TENANT, sink=sink)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda b: envelope.from_object(b), id="poll-or-sse-object"),
        pytest.param(
            lambda b: envelope.from_object(log_row(b["event_id"], data=b["data"])), id="log-row"
        ),
        pytest.param(lambda b: envelope.from_body(json.dumps(b).encode()), id="fast-parse"),
        pytest.param(
            lambda b: envelope.from_body(json.dumps(b).encode(), reader=READER), id="filter-reader"
        ),
    ],
)
async def test_a_filter_decides_at_ingest_whatever_the_events_shape(
    redis: Redis, redis_url: str, make: Any
) -> None:
    rt = runtime(redis, config(redis_url))
    assert await rt.ingestor.ingest(TENANT, make(body("p1", False)), "poll")
    assert await rt.ingestor.ingest(TENANT, make(body("g1", True)), "webhook")
    assert await _jobs(redis) == sorted(
        [
            KEYS.job_id(TENANT, "all", "p1"),
            KEYS.job_id(TENANT, "all", "g1"),
            KEYS.job_id(TENANT, "groups", "g1"),
        ]
    )
    assert filtered_count(rt) == 1
    assert filtered_count(rt, "all") == 0


async def test_only_the_sink_whose_filter_takes_the_event_gets_it_and_the_log_says_why(
    redis: Redis, redis_url: str
) -> None:
    async with sinks(Sink(), Sink()) as (to_all, to_groups):
        cfg = config(redis_url, to_all.url, to_groups.url)
        rt = runtime(redis, cfg)
        for event_id, group in (("p1", False), ("g1", True), ("p2", False)):
            await rt.ingestor.ingest(TENANT, envelope.from_object(body(event_id, group)), "webhook")
        # a duplicate is not routed again, nor counted again
        assert not await rt.ingestor.ingest(TENANT, envelope.from_object(body("p1", False)), "poll")
        assert filtered_count(rt) == 2
        async with worker(rt):
            await wait_for(lambda: len(to_all.received) + len(to_groups.received) == 4, 10)
            await wait_for(lambda: drained(redis), 10)
        assert sorted(to_all.ids()) == ["g1", "p1", "p2"]
        assert to_groups.ids() == ["g1"]
        log = EventLog(redis, cfg)
        rec = await log.get(TENANT, "p1")
        assert rec is not None
        states = {x.sink: (x.state, x.detail) for x in rec.sinks}
        assert states["all"] == ("delivered", "")
        assert states["groups"][0] == "not_routed"
        assert states["groups"][1].startswith("filter:")
        rec = await log.get(TENANT, "g1")
        assert rec is not None
        assert {x.sink: x.state for x in rec.sinks} == {"all": "delivered", "groups": "delivered"}


async def test_the_routing_stays_when_the_filter_changes_for_duplicates_and_resends(
    redis: Redis, redis_url: str
) -> None:
    async with sinks(Sink(), Sink()) as (to_all, to_groups):
        rt = runtime(redis, config(redis_url, to_all.url, to_groups.url))
        await rt.ingestor.ingest(TENANT, envelope.from_object(body("p1", False)), "webhook")
        async with worker(rt):
            await wait_for(lambda: len(to_all.received) == 1, 10)
            await wait_for(lambda: drained(redis), 10)
        # the filter is gone: the event keeps the routing it got
        now = config(redis_url, to_all.url, to_groups.url, groups_filter=None)
        rt.ingestor.set_config(now)
        assert not await rt.ingestor.ingest(
            TENANT, envelope.from_object(body("p1", False)), "replay"
        )
        log = EventLog(redis, now)
        rec = await log.get(TENANT, "p1")
        assert rec is not None
        assert {x.sink: x.state for x in rec.sinks} == {"all": "delivered", "groups": "not_routed"}
        assert next(x.detail for x in rec.sinks if x.sink == "groups").startswith("filter:")
        assert await log.resend(TENANT, "p1") == [("all", "ok")]
        with pytest.raises(EventLogError, match="not routed to sink 'groups' \\(filter:"):
            await log.resend(TENANT, "p1", "groups")
        async with worker(runtime(redis, now)):
            await wait_for(lambda: len(to_all.received) == 2, 10)
            await wait_for(lambda: drained(redis), 10)
        assert to_all.ids() == ["p1", "p1"]
        assert to_all.received[1].headers["X-Relay-Source"] == "resend"
        assert to_groups.received == []
        assert await redis.exists(KEYS.job(KEYS.job_id(TENANT, "groups", "p1"))) == 0


async def test_an_event_every_filter_keeps_out_is_logged_with_its_copy(
    redis: Redis, redis_url: str
) -> None:
    sink_list = [
        sink_conf("a", "http://127.0.0.1:9/a", filter={"data": {"chat": {"id": "x"}}}),
        sink_conf("b", "http://127.0.0.1:9/b", filter={"$not": {"event": "message.received"}}),
    ]
    cfg = parse_config(delivery_config(redis_url, sink_list), env={})
    rt = runtime(redis, cfg)
    assert await rt.ingestor.ingest(TENANT, envelope.from_object(body("n1", False)), "webhook")
    assert await _jobs(redis) == []
    assert await redis.exists(KEYS.event(TENANT, "n1")) == 0  # no delivery holds it
    rec = await EventLog(redis, cfg).get(TENANT, "n1")
    assert rec is not None
    assert {x.sink: x.state for x in rec.sinks} == {"a": "not_routed", "b": "not_routed"}
    assert b'"event_id": "n1"' in rec.body or b'"event_id":"n1"' in rec.body
    assert filtered_count(rt, "a") == filtered_count(rt, "b") == 1


async def test_one_batch_of_new_and_duplicate_filtered_events_reads_every_route(
    redis: Redis, redis_url: str
) -> None:
    rt = runtime(redis, config(redis_url))
    assert await rt.ingestor.ingest(TENANT, envelope.from_object(body("d1", False)), "webhook")
    batch = [("d1", False), ("n1", True), ("n2", False), ("d1", False), ("n3", True)]
    found = await asyncio.gather(
        *(rt.ingestor.ingest(TENANT, envelope.from_object(body(i, g)), "poll") for i, g in batch)
    )
    assert found == [False, True, True, False, True]
    expected = [KEYS.job_id(TENANT, "all", i) for i in ("d1", "n1", "n2", "n3")]
    expected += [KEYS.job_id(TENANT, "groups", i) for i in ("n1", "n3")]
    assert await _jobs(redis) == sorted(expected)
    assert filtered_count(rt) == 2  # d1 and n2, once each
    rec = await EventLog(redis, rt.config).get(TENANT, "n2")
    assert rec is not None
    assert {x.sink: x.state for x in rec.sinks} == {"all": "due", "groups": "not_routed"}


@pytest.mark.parametrize("source", ["poll", "sse", "backfill"])
async def test_rows_from_chert_s_events_api_are_filtered_as_webhooks_are(
    redis: Redis, redis_url: str, source: str
) -> None:
    rt = runtime(redis, config(redis_url))
    rows = [
        log_row(f"{source}-p", data=body("x", False)["data"]),
        log_row(f"{source}-g", data=body("y", True)["data"]),
    ]
    result = await ingest_rows(rt.ingestor, TENANT, rows, source)
    assert result.new == 2
    assert await _jobs(redis) == sorted(
        [
            KEYS.job_id(TENANT, "all", f"{source}-p"),
            KEYS.job_id(TENANT, "all", f"{source}-g"),
            KEYS.job_id(TENANT, "groups", f"{source}-g"),
        ]
    )
    assert filtered_count(rt) == 1
