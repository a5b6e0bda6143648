"""How much delivery work is waiting: in arq's queue, and set aside in the sinks'
waiting sets (``lua/lib/wait.lua``) until their sinks can take it."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import cast

from redis.asyncio import Redis

from relay.keys import Keys


async def waiting(client: Redis, keys: Keys) -> dict[tuple[str, str], int]:
    """The deliveries set aside, by (tenant, sink), for every sink that has any."""
    members = await cast(Awaitable[set[bytes]], client.smembers(keys.waiting_sinks))
    sinks = sorted(tuple(m.decode().split(":", 1)) for m in members)
    if not sinks:
        return {}
    async with client.pipeline(transaction=False) as pipe:
        for tenant, sink in sinks:
            pipe.zcard(keys.waiting(tenant, sink))
        counts = await pipe.execute()
    return {(t, s): int(n) for (t, s), n in zip(sinks, counts, strict=True) if n}


async def backlog(client: Redis, keys: Keys) -> int:
    """Deliveries not yet done: queued (due or scheduled, running included) or set aside."""
    queued = int(await client.zcard(keys.queue))
    return queued + sum((await waiting(client, keys)).values())
