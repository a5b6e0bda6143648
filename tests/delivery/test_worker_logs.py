"""What the worker's log says at INFO and above: no line per delivery, a summary per
sink, a warning when a sink answers nothing (and a line when it answers again); and
the lines that misled: a starting worker's census, the heartbeat's recovery, a timeout's
duration."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis

from relay.config import SinkConfig
from relay.delivery import activity, heartbeat
from relay.delivery.activity import SinkActivity
from relay.delivery.sink_client import Answer, SinkClient
from relay.keys import Keys
from relay.store.embedded import EmbeddedRedis, free_port
from tests.support.common import TENANT, wait_for
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


def _summaries(caplog: pytest.LogCaptureFixture) -> list[tuple[object, ...]]:
    return [
        (r.args[2], r.args[3], r.args[4])
        for r in caplog.records
        if r.name == "relay.delivery.activity" and "dead-lettered in the last" in r.msg
    ]


async def test_deliveries_are_summed_per_sink_not_logged_one_by_one(
    redis: Redis, redis_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(activity, "SUMMARY_S", 0.2)
    monkeypatch.setattr(activity, "TICK_S", 0.05)
    caplog.set_level(logging.INFO, logger="relay.delivery")

    def answer(sink: Sink, got: Received) -> tuple[int, dict[str, str]]:
        if got.event_id == "flaky" and got.attempt == 1:
            return 503, {}
        return (400, {}) if got.event_id == "bad" else (200, {})

    async with sinks(Sink(answer)) as (s,):
        rt = runtime(redis, config_with(redis_url, [sink_conf("s", s.url)]))
        async with worker(rt):
            await ingest(rt, [f"ok{i}" for i in range(8)] + ["flaky", "bad"])
            await wait_for(lambda: len(s.received) == 11, 15)
            await wait_for(lambda: drained(redis), 15)
            await wait_for(lambda: _summaries(caplog), 15)  # one came while it ran
    # Each line is a sink's deliveries since the last; the worker's stop adds the rest.
    lines = _summaries(caplog)
    assert tuple(map(sum, zip(*lines, strict=True))) == (9, 1, 1), lines
    deliverer = [r for r in caplog.records if r.name == "relay.delivery.deliverer"]
    # Delivered and retried: DEBUG only. The dead letter: one warning.
    assert [(r.levelname, r.getMessage().split(":")[0]) for r in deliverer] == [
        ("WARNING", "delivery ended")
    ]
    assert "dead-lettered as rejected" in deliverer[0].getMessage()


async def test_a_sink_that_answers_nothing_is_warned_about_once_until_it_answers(
    redis: Redis, redis_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(activity, "TICK_S", 0.05)
    caplog.set_level(logging.INFO, logger="relay.delivery.activity")
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"  # nothing listens: every attempt fails to connect
    rt = runtime(redis, config_with(redis_url, [sink_conf("s", url)], sink_silence_warn=0.5))
    await ingest(rt, [f"e{i}" for i in range(5)])

    def lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "relay.delivery.activity"]

    async with worker(rt):
        await wait_for(lambda: any("answered nothing" in r.getMessage() for r in lines()), 15)
        async with sinks(Sink(port=port)) as (s,):
            await wait_for(lambda: len(set(s.ids())) == 5, 15)
    silent = [r for r in lines() if "answered nothing" in r.getMessage()]
    again = [r for r in lines() if "answers again" in r.getMessage()]
    assert [r.levelname for r in silent] == ["WARNING"]
    assert silent[0].getMessage().startswith(f"sink {TENANT}/s has answered nothing for ")
    assert "timed out or failed to connect)" in silent[0].getMessage()
    assert [r.levelname for r in again] == ["INFO"]
    assert again[0].getMessage().startswith(f"sink {TENANT}/s answers again (HTTP 200) after ")


def test_silence_is_judged_between_attempts_too(caplog: pytest.LogCaptureFixture) -> None:
    # An open breaker sends one probe per cooldown: the silence must show without one.
    caplog.set_level(logging.INFO, logger="relay.delivery.activity")
    now = [10.0]
    a = SinkActivity(60, clock=lambda: now[0])
    a.attempt_ended("t", "s", Answer(None, "timeout", "no answer", None, 10.0))  # began at 0
    now[0] = 59.0
    a.tick()
    assert caplog.records == []
    now[0] = 61.0
    a.tick()
    now[0] = 90.0
    a.attempt_ended("t", "s", Answer(None, "connection", "refused", None, 0.01))
    a.tick()
    now[0] = 95.0
    a.attempt_ended("t", "s", Answer(200, "http", "", None, 0.05))
    a.attempt_ended("t", "s", Answer(None, "timeout", "no answer", None, 10.0))  # new episode
    now[0] = 104.0
    a.tick()
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "WARNING",
            "sink t/s has answered nothing for 61s (1 attempt timed out or failed to connect)",
        ),
        (
            "INFO",
            "sink t/s answers again (HTTP 200) after 95s without an answer (2 attempts timed "
            "out or failed to connect)",
        ),
    ]


async def test_the_census_leaves_out_the_jobs_the_worker_started_itself(
    redis: Redis, redis_url: str
) -> None:
    cfg = config_with(redis_url, [sink_conf("s", "http://127.0.0.1:9/hook")])
    k = Keys("chert-relay")
    mine, theirs = k.job_id(TENANT, "s", "e1"), k.job_id(TENANT, "s", "e2")
    for job in (mine, theirs):
        await redis.set(in_progress_key_prefix + job, b"1", px=60_000)
        await redis.zadd(k.inflight(TENANT, "s"), {job: time.time() * 1000 + 60_000})
    settled = []

    async def settle() -> None:  # the worker's take in flight has returned
        settled.append(True)

    found = await heartbeat.census(redis, cfg, {mine}, settle)
    assert found == heartbeat.Inherited(in_progress=1, leases=1, sinks=1)
    assert settled == [True]


async def test_a_starting_worker_does_not_count_its_own_deliveries_as_inherited(
    redis: Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Its deliveries start beside the census (they hang: their marks and leases stay),
    # which has many keys to scan: it finds their marks and leases.
    caplog.set_level(logging.INFO, logger="relay.delivery.heartbeat")
    fill = "for i = 1, tonumber(ARGV[1]) do redis.call('SET', 'filler:' .. i, 'x') end"
    await redis.eval(fill, 0, "200000")
    release = asyncio.Event()

    async def hang(sink: Sink, got: Received) -> tuple[int, dict[str, str]]:
        await release.wait()
        return 200, {}

    async with sinks(Sink(hang)) as (s,):
        conf = sink_conf("s", s.url, timeout=30, concurrency=20)
        rt = runtime(redis, config_with(redis_url, [conf]))
        await ingest(rt, [f"e{i}" for i in range(20)])
        try:
            async with worker(rt) as role:
                await wait_for(lambda: len(s.received) == 20, 15)
                assert role.deliverer is not None
                await wait_for(lambda: role.deliverer.started_in_census is None)
                # Counted now, with its 20 running, the worker finds none elsewhere.
                mine = set(role.deliverer.running)
                assert len(mine) == 20
                assert await heartbeat.census(redis, rt.config, mine) == heartbeat.Inherited(
                    0, 0, 0
                )
                assert (await heartbeat.census(redis, rt.config)).in_progress == 20
                release.set()
                await wait_for(lambda: not role.deliverer.running, 15)
        finally:
            release.set()
    census = [r.getMessage() for r in caplog.records if r.getMessage().startswith("worker: ")]
    assert census == ["worker: no deliveries in progress elsewhere, no in-flight leases"]


async def test_the_heartbeat_calls_it_trouble_only_with_holds_at_stake(
    make_redis_server: Callable[[], Awaitable[EmbeddedRedis]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery.heartbeat")
    server = await make_redis_server()
    client: Redis = Redis.from_url(server.url)
    running: dict[str, heartbeat.Running] = {}
    beat = heartbeat.Heartbeat(client, running)

    def lines() -> list[tuple[str, str]]:  # the heartbeat's own (the server logs too)
        return [
            (r.levelname, r.getMessage()) for r in caplog.records if r.name == heartbeat.log.name
        ]

    try:
        await server.stop()
        await beat.step()  # Redis is away, but nothing was held: nothing at stake
        assert lines() == []
        running["j1"] = heartbeat.Running("j1", "t1")
        await beat.step()
        await beat.step()  # still away: said once
        assert [level for level, _ in lines()] == ["WARNING"]
        assert lines()[0][1].startswith(
            "worker heartbeat: could not renew the holds on 1 running deliveries"
        )
        await server.start()
        running.clear()
        await beat.step()  # back, but nothing renewed: no recovery to tell
        assert len(lines()) == 1
        await client.set(in_progress_key_prefix + "j2", "t2", px=60_000)  # its run's mark
        running["j2"] = heartbeat.Running("j2", "t2")
        await beat.step()
        assert lines()[1][0] == "INFO"
        assert lines()[1][1].startswith(
            "worker heartbeat: renewed the holds on 1 running deliveries again"
        )
        await beat.step()
        assert len(lines()) == 2
    finally:
        await client.aclose()


async def test_a_timeout_says_its_limit_and_the_time_it_took() -> None:
    release = asyncio.Event()

    async def hang(sink: Sink, got: Received) -> tuple[int, dict[str, str]]:
        await release.wait()
        return 200, {}

    async with sinks(Sink(hang)) as (s,), aiohttp.ClientSession() as session:
        conf = SinkConfig.model_validate(sink_conf("s", s.url))
        try:
            answer = await SinkClient(session).post(conf, b"{}", {}, 0.2)
        finally:
            release.set()
    assert answer.kind == "timeout"
    m = re.fullmatch(
        r"no answer within the 0\.2s timeout \(gave up after (\d+\.\d\d)s\)", answer.error
    )
    assert m is not None, answer.error
    assert float(m.group(1)) == round(answer.seconds, 2)
    assert answer.seconds >= 0.2
