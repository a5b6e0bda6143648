"""What the worker's log says at INFO and above: no line per delivery, a summary per
sink, a warning when a sink answers nothing (and a line when it answers again)."""

from __future__ import annotations

import logging

import pytest
from redis.asyncio import Redis

from relay.delivery import activity
from relay.delivery.activity import SinkActivity
from relay.delivery.sink_client import Answer
from relay.keys import Keys
from relay.store.embedded import free_port
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


async def _queue_empty(redis: Redis) -> bool:
    return await redis.zcard(Keys("chert-relay").queue) == 0


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
            await wait_for(lambda: _queue_empty(redis), 15)
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
