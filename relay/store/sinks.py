"""Pausing and resuming a sink: the operator's switch (``chert-relay sinks pause|resume``,
``POST /api/sinks/{tenant}/{sink}/pause|resume``, the operator page).

A paused sink has a mark in Redis (:meth:`relay.keys.Keys.paused`) holding the time of
the pause, by Redis' clock. While it is there, nothing is sent to the sink: every claim
of its deliveries sets them aside in its waiting set without an attempt
(``lua/lib/claim.lua``), no slot of its is filled (``lua/lib/wait.lua``), and no
delivery of its expires — their deadlines move back by the pause when they come back.
Attempts already in flight finish as they would. The mark has no expiry, so the pause
outlives a restart. Resuming deletes it; the workers' next sweep (``lua/sweep.lua``,
every half second) hands the sink's free slots to its waiting deliveries, in queue
order. Both are idempotent: pausing a paused sink keeps the first pause's time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from redis.asyncio import Redis

from relay.keys import Keys
from relay.store import scripts


@dataclass(frozen=True, slots=True)
class PauseChange:
    """What a pause or resume did."""

    changed: bool  # False: the sink already was (pause) or was not (resume) paused
    since: float | None  # when the sink was paused, unix seconds (None: it was not)
    at: float | None = None  # resume: when it was resumed (Redis' clock)

    @property
    def paused_for(self) -> float | None:
        """How long the pause lasted (a resume that ended one), seconds."""
        if self.since is None or self.at is None:
            return None
        return max(0.0, self.at - self.since)


class SinkSwitch:
    """Pause and resume sinks; read which are paused."""

    def __init__(self, client: Redis, keys: Keys) -> None:
        self._client = client
        self._keys = keys
        self._pause = scripts.script("pause").bind(client)
        self._resume = scripts.script("resume").bind(client)

    async def pause(self, tenant: str, sink: str) -> PauseChange:
        res = await self._pause(keys={"paused": self._keys.paused(tenant, sink)}, args={})
        return PauseChange(bool(int(res[0])), int(res[1]) / 1000)

    async def resume(self, tenant: str, sink: str) -> PauseChange:
        k = self._keys
        res = await self._resume(
            keys={"paused": k.paused(tenant, sink), "wait": k.waiting(tenant, sink)},
            args={
                "att_base": k.attempts(tenant, sink, ""),
                "job_base": k.job_id(tenant, sink, ""),
                "wake": k.wake,
            },
        )
        if not int(res[0]):
            return PauseChange(False, None)
        return PauseChange(True, int(res[1]) / 1000, int(res[2]) / 1000)

    async def paused(self, pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], float | None]:
        """When each ``(tenant, sink)`` was paused (unix seconds), or None if it is not."""
        wanted = list(pairs)
        if not wanted:
            return {}
        found = await self._client.mget([self._keys.paused(t, s) for t, s in wanted])
        return {pair: paused_since(raw) for pair, raw in zip(wanted, found, strict=True)}


def paused_since(raw: bytes | str | None) -> float | None:
    """A pause mark's value as unix seconds; None for no mark. A mark that is not a
    time still pauses the sink: it reads as the epoch."""
    if raw is None:
        return None
    try:
        return int(raw) / 1000
    except ValueError:
        return 0.0
