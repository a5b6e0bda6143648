"""One poller per tenant across relays: the Redis lease, alone and between real relays."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from redis.asyncio import Redis

from relay.service import Service
from relay.upstream.lease import Lease
from tests.support.common import TENANT, wait_for
from tests.support.upstream import (
    enqueued,
    expected_jobs,
    metrics,
    relay_config,
    running_relay,
    sample,
    simulator,
    wait_enqueued,
    write_poll_config,
)

TENANTS = (TENANT, "other-1")


async def test_lease_is_exclusive_renewable_and_released(redis: Redis) -> None:
    a = Lease(redis, "t:lease", ttl=30)
    b = Lease(redis, "t:lease", ttl=30)
    assert await a.acquire()
    assert not await b.acquire()
    assert await a.acquire()  # already ours: renewed
    assert await a.renew()
    assert not await b.renew()
    await b.release()  # not b's: nothing happens
    assert await a.holder() == a.token
    await a.release()
    assert await b.acquire()
    assert await b.holder() == b.token


async def test_an_expired_lease_is_taken_over_and_the_old_holder_cannot_touch_it(
    redis: Redis,
) -> None:
    a = Lease(redis, "t:lease", ttl=0.2)
    b = Lease(redis, "t:lease", ttl=30)
    assert await a.acquire()
    await wait_for(b.acquire, timeout=5)  # a stopped renewing (as if it died)
    assert not await a.renew()
    assert not a.held
    await a.release()
    assert await b.holder() == b.token
    assert 0 < await redis.pttl("t:lease") <= 30_000


def requests_by(service: Service, tenant: str) -> float:
    m = metrics(service)
    return sum(
        sample(m, "chert_relay_poll_requests_total", tenant=tenant, outcome=o)
        for o in ("ok", "rate_limited", "auth", "error", "unreachable")
    )


def holds(service: Service, tenant: str) -> bool:
    return sample(metrics(service), "chert_relay_poll_lease_held", tenant=tenant) == 1


async def test_two_relays_exactly_one_polls_each_tenant_and_a_stop_hands_over(
    redis_url: str, redis: Redis
) -> None:
    async with simulator() as sim:
        config = relay_config(redis_url, sim.base_url, "always", other_mode="always")
        async with contextlib.AsyncExitStack() as first_stack:
            first = await first_stack.enter_async_context(running_relay(config))
            async with running_relay(config) as second:
                relays = (first, second)
                for tenant in TENANTS:
                    await wait_for(lambda t=tenant: sum(holds(r, t) for r in relays) == 1)
                rows = sim.emit(TENANT, count=4)
                sim.emit("other-1", count=2)
                await wait_enqueued(redis, rows)
                # Both keep trying; for each tenant exactly one relay ever called Chert.
                for tenant in TENANTS:
                    await wait_for(lambda t=tenant: max(requests_by(r, t) for r in relays) >= 5)
                    counts = sorted(requests_by(r, tenant) for r in relays)
                    assert counts[0] == 0
                    assert counts[1] == len([q for q in sim.api_requests if q.tenant == tenant])
                    assert sum(holds(r, tenant) for r in relays) == 1
                    assert all(
                        sample(metrics(r), "chert_relay_poll_mode", tenant=tenant, mode="standby")
                        == 1
                        for r in relays
                        if not holds(r, tenant)
                    )
                # The first relay stops: the second takes over what it held, nothing lost.
                await first_stack.aclose()
                for tenant in TENANTS:
                    await wait_for(lambda t=tenant: holds(second, t), timeout=10)
                more = sim.emit(TENANT, count=3)
                await wait_enqueued(redis, rows + more)
                assert await enqueued(redis) == expected_jobs(rows + more)


async def test_a_killed_holder_is_replaced_within_the_lease_time_and_nothing_is_lost(
    redis_url: str, redis: Redis, tmp_path: Path
) -> None:
    lease_ttl = 2.0
    async with simulator() as sim:
        cfg = tmp_path / "relay.toml"
        write_poll_config(cfg, redis_url, sim.base_url, lease_ttl)
        log_file = (tmp_path / "holder.log").open("wb")
        holder = subprocess.Popen(
            [sys.executable, "-m", "relay", "-c", str(cfg), "--log-format", "text", "serve"],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
        try:
            lease_keys = [f"chert-relay:poll:lease:{t}" for t in TENANTS]

            async def subprocess_holds_both() -> bool:
                return all([await redis.exists(k) for k in lease_keys])

            await wait_for(subprocess_holds_both, timeout=30)
            before = sim.emit(TENANT, count=3)
            await wait_enqueued(redis, before)
            config = relay_config(
                redis_url, sim.base_url, "always", other_mode="always", lease_ttl=lease_ttl
            )
            async with running_relay(config) as standby:
                await wait_for(
                    lambda: (
                        sample(
                            metrics(standby), "chert_relay_poll_mode", tenant=TENANT, mode="standby"
                        )
                        == 1
                    )
                )
                assert not holds(standby, TENANT)
                os.kill(holder.pid, signal.SIGKILL)
                holder.wait(timeout=10)
                during = sim.emit(TENANT, count=4)  # while nobody polls
                for tenant in TENANTS:
                    await wait_for(lambda t=tenant: holds(standby, t), timeout=lease_ttl + 5)
                after = sim.emit(TENANT, count=2)
                rows = before + during + after
                await wait_enqueued(redis, rows)
                assert await enqueued(redis) == expected_jobs(rows)
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait(timeout=10)
            log_file.close()
