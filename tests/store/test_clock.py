"""The process's view of Redis' clock: an offset measured from replies that carry
Redis' time, trusted only from quick round trips, and a warning past a second."""

from __future__ import annotations

import logging
import time

import pytest
from redis.asyncio import Redis

from relay.store.clock import RedisClock


def test_a_slow_round_trip_leaves_the_offset_as_it_was() -> None:
    clock = RedisClock()
    t = time.time()
    clock.observe(int((t + 0.005) * 1000) + 3000, t, t + 0.01)  # Redis 3 s ahead
    assert 2.99 <= clock.offset_ms / 1000 <= 3.01
    # A reply that took 4 s (a busy loop): Redis read its clock anywhere in between.
    clock.observe(int(t * 1000), t, t + 4.0)
    assert 2.99 <= clock.offset_ms / 1000 <= 3.01
    assert 2.9 <= (clock.now_ms() / 1000 - time.time()) <= 3.1


def test_an_offset_past_a_second_is_warned_once_and_its_end_told(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="relay.store.clock")
    clock = RedisClock()
    seen: list[float] = []
    clock.on_change = seen.append
    t = time.time()
    for _ in range(3):
        clock.observe(int(t * 1000) - 120_000, t, t)  # this machine 2 minutes ahead
    clock.observe(int(t * 1000), t, t)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("this machine's clock is 120.0s ahead of Redis' clock")
    assert lines[1].startswith("this machine's clock agrees with Redis' clock again")
    assert seen[0] == pytest.approx(-120.0, abs=0.01)
    assert seen[-1] == pytest.approx(0.0, abs=0.01)


async def test_the_offset_to_a_real_redis_is_small(redis: Redis) -> None:
    clock = RedisClock()
    assert abs(await clock.measure(redis)) < 1.0  # same machine, same clock
    assert clock.known
