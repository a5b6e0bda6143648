"""One clock for every process: Redis' own.

Every time that several processes compare — when a job is due, how long a hold or an
in-flight lease lasts, a breaker's cooldown, a delivery's deadline, a retry's due time —
is read in the scripts from Redis' ``TIME`` (``lua/lib/clock.lua``). What a process
still computes itself (whether the next attempt falls past the deadline, a dead letter's
time) it reads from :data:`CLOCK`: its own clock corrected by the offset to Redis'
clock, which each Redis reply that carries Redis' time updates (a worker's take and its
heartbeat) and which :func:`watch` measures every :data:`CHECK_S` in every process.

Each process exports its offset (``chert_relay_clock_offset_seconds``) and logs a
warning once its clock is more than :data:`WARN_S` off: the relay keeps working, but
the process's logs and metrics are off by as much, and so is the receiver's check of
Chert's signature timestamps, which only a synchronized clock (NTP) fixes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import redis.exceptions
from redis.asyncio import Redis

from relay.logs import Throttle

log = logging.getLogger(__name__)

WARN_S = 1.0  # an offset past this is logged (and alerted on)
CHECK_S = 30.0  # how often every process measures its offset
MAX_RTT_S = 0.1  # a slower round trip leaves the offset as it was (error: half of it)
_REWARN_S = 600.0  # a persisting offset is logged again this often


class RedisClock:
    """This process's clock, corrected to Redis' clock."""

    def __init__(self) -> None:
        self.offset_ms = 0.0  # Redis' clock minus this process's clock
        self.known = False
        self._warnings = Throttle(_REWARN_S)  # one key: the offset
        self._warned = False
        self._warned_off = 0.0
        self.on_change: Callable[[float], None] | None = None  # the offset's metric

    def now_ms(self) -> int:
        """Now by Redis' clock, Unix ms."""
        return int(time.time() * 1000 + self.offset_ms)

    def now(self) -> float:
        """Now by Redis' clock, Unix seconds."""
        return time.time() + self.offset_ms / 1000

    def observe(self, redis_ms: int, sent: float, received: float) -> None:
        """Redis said ``redis_ms`` in a reply to a call sent at ``sent`` and answered at
        ``received`` (this process's ``time.time()``). Redis read its clock somewhere in
        between: a reply that took longer than :data:`MAX_RTT_S` (a busy loop, a full
        pipeline) says too little and is ignored once the offset is known."""
        if received - sent > MAX_RTT_S and self.known:
            return
        self.offset_ms = redis_ms - (sent + received) * 500
        self.known = True
        off = self.offset_ms / 1000
        if self.on_change is not None:
            self.on_change(off)
        if abs(off) > WARN_S:
            if abs(off - self._warned_off) > WARN_S:
                self._warnings.forget("offset")  # a new offset is told at once
            if self._warnings.allow("offset") is None:
                return
            self._warned, self._warned_off = True, off
            log.warning(
                "this machine's clock is %.1fs %s Redis' clock: the relay takes its times "
                "from Redis, but this process's logs and metrics are off by as much, and so "
                "is the receiver's check of Chert's signature timestamps; synchronize the "
                "clock (NTP)",
                abs(off),
                "behind" if off > 0 else "ahead of",
            )
        elif self._warned:
            self._warned = False
            self._warnings.forget("offset")
            log.info("this machine's clock agrees with Redis' clock again (%.3fs)", off)

    async def measure(self, client: Redis) -> float:
        """Ask Redis' time once; the offset, seconds."""
        sent = time.time()
        seconds, micros = await client.time()
        self.observe(int(seconds) * 1000 + int(micros) // 1000, sent, time.time())
        return self.offset_ms / 1000


CLOCK = RedisClock()


async def watch(client: Redis, every: float = CHECK_S) -> None:
    """Measure this process's offset every ``every`` seconds, until cancelled."""
    while True:
        try:
            async with asyncio.timeout(5.0):
                await CLOCK.measure(client)
        except (redis.exceptions.RedisError, OSError, TimeoutError):
            pass
        # redis-py may swallow a cancellation that comes while it connects (or turn it
        # into a connection error): a stop must not wait out the sleep
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError
        await asyncio.sleep(every)
