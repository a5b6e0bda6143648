"""A Redis lease: at most one holder of a name at a time, across every relay process.

``acquire`` is ``SET key token NX PX ttl`` with a random token per holder; the
holder renews well within the ttl, and renewal and release are Lua scripts
(``lease_renew.lua``, ``lease_release.lua``) that act only if the key still holds *our*
token — so a holder that stalled past its ttl can neither extend nor delete a lease
another process has since taken. When a
holder dies, its key expires and the next ``acquire`` elsewhere succeeds: the
takeover happens within one ttl (plus the contender's retry interval).
"""

from __future__ import annotations

import secrets

from redis.asyncio import Redis

from relay.store import scripts


class Lease:
    """One named lease; ``held`` says whether this process holds it as far as it knows."""

    def __init__(self, redis: Redis, key: str, ttl: float) -> None:
        self.key = key
        self.ttl = ttl
        self.token = secrets.token_hex(16)
        self.held = False
        self._redis = redis
        self._renew = scripts.script("lease_renew").bind(redis)
        self._release = scripts.script("lease_release").bind(redis)

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl * 1000))

    async def acquire(self) -> bool:
        """Take the lease if it is free, or renew it if it is still ours (say, after a
        Redis outage this process only believes it lost)."""
        if await self.renew():
            return True
        self.held = bool(await self._redis.set(self.key, self.token, nx=True, px=self._ttl_ms))
        return self.held

    async def renew(self) -> bool:
        """Extend the lease if it is still ours; ``False`` (and not held) if it was lost."""
        self.held = bool(
            await self._renew(
                keys={"lease": self.key}, args={"token": self.token, "ttl_ms": self._ttl_ms}
            )
        )
        return self.held

    async def release(self) -> None:
        """Give the lease up at once (if still ours), so another process can take over."""
        self.held = False
        await self._release(keys={"lease": self.key}, args={"token": self.token})

    async def holder(self) -> str | None:
        """The token of whoever holds the lease now, if anyone."""
        value = await self._redis.get(self.key)
        return value.decode() if isinstance(value, bytes) else value
