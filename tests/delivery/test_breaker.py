"""A sink's circuit breaker under the worker: opened by a failure rate, not by a run of
failures, so a sink where a minority of answers come too late keeps being served, while
one that answers nothing is left alone after ``breaker_failures`` failures; and each
change is logged once, with its reason."""

from __future__ import annotations

import asyncio
import functools
import logging

import pytest
from redis.asyncio import Redis

from relay.config import WorkerConfig
from relay.delivery import breaker
from tests.support.common import TENANT, wait_for
from tests.support.delivery import (
    Received,
    Sink,
    config_with,
    ingest,
    metric_sum,
    runtime,
    sink_conf,
    sinks,
    worker,
)

LOGGER = "relay.delivery.breaker"


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


async def test_a_sink_where_a_fifth_of_the_answers_come_too_late_keeps_its_breaker_closed(
    redis: Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Rounds of 32 requests answered at once and 8 answered after the sink's timeout.
    # The 8 late ones hold all 8 slots together and time out together: 8 failures in a
    # row, in finish order, each round — while 4 of 5 requests succeed.
    caplog.set_level(logging.INFO, logger=LOGGER)
    release = asyncio.Event()

    async def late_ones(sink: Sink, got: Received) -> tuple[int, dict[str, str]]:
        if got.event_id.startswith("late") and got.attempt == 1:
            await release.wait()  # past the sink's timeout
        return 200, {}

    async with sinks(Sink(late_ones)) as (s,):
        cfg = config_with(
            redis_url,
            [sink_conf("s", s.url, timeout=0.3, concurrency=8)],
            breaker_failures=5,
        )
        rt = runtime(redis, cfg)
        try:
            async with worker(rt):
                for n in range(3):
                    fast = [f"fast-{n}-{i:02d}" for i in range(32)]
                    late = [f"late-{n}-{i}" for i in range(8)]
                    await ingest(rt, fast)
                    await wait_for(functools.partial(_delivered, s, fast, 1), 15)
                    await ingest(rt, late)
                    await wait_for(functools.partial(_delivered, s, late, 2), 15)
        finally:
            release.set()
    assert not any("opened" in m for m in _lines(caplog)), _lines(caplog)
    assert metric_sum(rt.metrics, "chert_relay_delivery_waits_total", reason="breaker_open") == 0
    assert len([r for r in s.received if r.attempt == 2]) == 24


async def _delivered(s: Sink, ids: list[str], attempt: int) -> bool:
    got = {(r.event_id, r.attempt) for r in s.received}
    return all((i, attempt) in got for i in ids)


async def test_a_sink_that_answers_nothing_opens_its_breaker_after_breaker_failures(
    redis: Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    release = asyncio.Event()

    async def black_hole(sink: Sink, got: Received) -> tuple[int, dict[str, str]]:
        await release.wait()
        return 200, {}

    async with sinks(Sink(black_hole)) as (s,):
        cfg = config_with(
            redis_url,
            [sink_conf("s", s.url, timeout=0.3, concurrency=2)],
            breaker_failures=5,
            breaker_cooldown=60,
        )
        rt = runtime(redis, cfg)
        await ingest(rt, [f"e{i:02d}" for i in range(30)])
        try:
            async with worker(rt):

                async def is_open() -> bool:
                    st = await breaker.states(redis, rt.keys, [(TENANT, "s")])
                    return st[(TENANT, "s")] == breaker.OPEN

                await wait_for(is_open, 20)
                tried = len(s.received)
        finally:
            release.set()
    # The fifth failure opened it; one more attempt may have been in flight (2 slots).
    assert 5 <= tried <= 6
    (opened,) = [m for m in _lines(caplog) if "opened" in m]
    assert opened.startswith(
        f"breaker of sink {TENANT}/s opened: 5 of 5 attempts failed in the last 30s, last error: "
    )
    assert opened.endswith("its deliveries wait 60s, then one goes as a probe")


def test_each_change_of_a_breaker_is_one_line_with_its_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    w = WorkerConfig(breaker_window=20, breaker_cooldown=45)
    breaker.log_change("t", "s", "open 12 20", "HTTP 503: busy", w)
    breaker.log_probe("t", "s", 3)
    breaker.log_change("t", "s", "reopen", "no answer", w)
    breaker.log_change("t", "s", "close", "", w)
    got = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert got == [
        (
            "WARNING",
            "breaker of sink t/s opened: 12 of 20 attempts failed in the last 20s, last "
            "error: HTTP 503: busy; its deliveries wait 45s, then one goes as a probe",
        ),
        ("INFO", "breaker of sink t/s half-open: one delivery goes as a probe (its attempt 3)"),
        (
            "WARNING",
            "breaker of sink t/s opened again: the probe failed (no answer); the next one in 45s",
        ),
        ("INFO", "breaker of sink t/s closed: the probe succeeded"),
    ]
