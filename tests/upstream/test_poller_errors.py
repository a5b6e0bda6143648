"""The poller facing Chert's errors: rate limits obeyed, refused credentials not hammered."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest
from redis.asyncio import Redis

from relay.store.embedded import EmbeddedRedis
from relay.upstream.poller import Poller
from tests.support.common import TENANT, wait_for
from tests.support.upstream import (
    enqueued,
    expected_jobs,
    messages,
    metrics,
    relay_config,
    running_relay,
    sample,
    simulator,
    wait_enqueued,
)


async def test_429_retry_after_is_obeyed_by_the_poller(redis_url: str, redis: Redis) -> None:
    async with simulator() as sim:
        config = relay_config(redis_url, sim.base_url, "always")
        async with running_relay(config):
            await wait_for(lambda: any(r.status == 200 for r in sim.api_requests))
            sim.faults.api_retry_after = 1.0
            sim.faults.api_429 = 1
            rows = sim.emit(TENANT, count=3)
            await wait_enqueued(redis, rows)
            limited = [r for r in sim.api_requests if r.status == 429]
            assert len(limited) == 1
            after = [r for r in sim.api_requests if r.time > limited[0].time]
            assert after, "no request after the 429"
            assert min(r.time for r in after) - limited[0].time >= 1.0


async def test_auth_failure_is_logged_with_its_code_and_not_retried_in_a_tight_loop(
    redis_url: str, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with simulator() as sim:
        wrong = relay_config(redis_url, sim.base_url, "always", api={"signing_secret": "e" * 32})
        async with running_relay(wrong) as service:
            await wait_for(
                lambda: any("code 2004" in t for t in messages(caplog, level=logging.ERROR))
            )
            m = metrics(service)
            assert sample(m, "chert_relay_chert_api_errors_total", tenant=TENANT, code="2004") == 1
            text = caplog.text
            assert "e" * 32 not in text
            assert "trace_id=" in next(t for t in messages(caplog) if "code 2004" in t)
            # Ten poll intervals later: still the one refused request, logged once.
            await asyncio.sleep(10 * 0.2)
            assert [r.status for r in sim.api_requests if r.tenant == TENANT] == [401]
            assert len([t for t in messages(caplog) if "refused" in t]) == 1
            # The fixed secret arrives by reload (SIGHUP): polling resumes at once.
            poller = service.roles["poller"]
            assert isinstance(poller, Poller)
            poller.reload(relay_config(redis_url, sim.base_url, "always"))
            rows = sim.emit(TENANT, count=2)
            await wait_enqueued(redis, rows)
            await wait_for(
                lambda: any("accepts the relay's credentials again" in t for t in messages(caplog))
            )


async def test_poller_survives_a_redis_outage(
    make_redis_server: Callable[[], Awaitable[EmbeddedRedis]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    server = await make_redis_server()
    client: Redis = Redis.from_url(server.url)
    try:
        async with simulator() as sim:
            config = relay_config(server.url, sim.base_url, "always")
            async with running_relay(config) as service:
                first = sim.emit(TENANT, count=2)
                await wait_enqueued(client, first)
                await server.stop()
                during = sim.emit(TENANT, count=3)  # nobody can ingest these now
                await wait_for(
                    lambda: any("cannot reach Redis" in t for t in messages(caplog)), timeout=30
                )
                await server.start()
                rows = first + during
                await wait_enqueued(client, rows, timeout=30)
                assert await enqueued(client) == expected_jobs(rows)
                await wait_for(
                    lambda: (
                        sample(metrics(service), "chert_relay_poll_lease_held", tenant=TENANT) == 1
                    )
                )
    finally:
        await client.aclose()
