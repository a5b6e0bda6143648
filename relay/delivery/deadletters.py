"""Dead letters: deliveries a sink refused for good, or that ran out of attempts or time.

Kept per tenant, until replayed or purged:

- ``{prefix}:dle:{tenant}:{sink}:{event_id}`` — one entry (a hash): event id, sink,
  event type, class, last HTTP status, last error (truncated, secret-free), attempts,
  first and last attempt times and when it was dead-lettered (unix ms);
- ``{prefix}:dl:{tenant}`` — the tenant's entries (``sink:event_id``) scored by
  dead-letter time, for time-range queries;
- ``{prefix}:dlc:{tenant}`` — stored entries by class, for the metrics.

Classes: ``rejected`` (the sink answered a 4xx other than 408/425/429, or a 3xx),
``exhausted`` (out of attempts, or past the sink's ``max_age``), ``gone`` (the sink
answered 410 Gone, or is no longer configured; while a sink's URL is marked gone its
deliveries dead-letter at once, without an HTTP call, until a replay for that sink or
a new URL clears the mark).

The event itself stays stored (:mod:`relay.stored_event`): a dead letter holds it
(it has no expiry while dead letters need it, and its users count the jobs and dead
letters still holding it — at most a job and a dead letter per sink; the last one to
let go deletes it).

Replay puts an entry back through the normal queue — the same deterministic job id,
a fresh attempt count and deadline — and removes the entry in the same atomic step,
so an entry leaves the store only once its job is queued. An entry whose delivery is
still finishing (arq's in-progress key exists) is skipped and can be replayed a
moment later.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar, cast

import redis.exceptions
from arq.constants import in_progress_key_prefix, retry_key_prefix
from redis.asyncio import Redis

from relay.config import Config
from relay.errors import DeadLetterError
from relay.ingest.ingestor import EXPIRY_MARGIN_S
from relay.keys import Keys
from relay.store import jobs as queue
from relay.store import stored_event

CLASSES = ("rejected", "exhausted", "gone")
T = TypeVar("T")
_CHUNK = 200

# Included by the delivery's finish script. ``fields`` is ARGV from ``first`` on: flat
# name/value pairs of the entry, which include ``class``.
LUA_ADD = """
local function deadletter_add(entry, index, counts, member, now, cls, first)
  local old = redis.call('HGET', entry, 'class')
  if old then redis.call('HINCRBY', counts, old, -1) end
  redis.call('DEL', entry)
  redis.call('HSET', entry, unpack(ARGV, first))
  redis.call('ZADD', index, now, member)
  redis.call('HINCRBY', counts, cls, 1)
end
"""

# KEYS: entry, index, counts, ev, job, queue, attempts, arq retry, arq in-progress, gone
# ARGV: member, now_ms, job (serialized), job_ttl_ms, deadline_ms, attempts_ttl_ms, job_id
_REPLAY = """
local cls = redis.call('HGET', KEYS[1], 'class')
if not cls then return 'missing' end
if redis.call('EXISTS', KEYS[9]) == 1 then return 'busy' end
if redis.call('EXISTS', KEYS[4]) == 0 then return 'no_payload' end
local job_id = ARGV[7]
if redis.call('EXISTS', KEYS[5]) == 0 then
  redis.call('SET', KEYS[5], ARGV[3], 'PX', ARGV[4])
  redis.call('DEL', KEYS[8], KEYS[7])
  redis.call('HSET', KEYS[7], 'dl', ARGV[5], 'src', 'replay')
  redis.call('PEXPIRE', KEYS[7], ARGV[6])
  redis.call('ZADD', KEYS[6], ARGV[2], job_id)
else
  -- a job for this (event, sink) is already queued: it carries the delivery
  event_release(KEYS[4])
end
redis.call('DEL', KEYS[10])
redis.call('HINCRBY', KEYS[3], cls, -1)
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 'ok'
"""

# KEYS: entry, index, counts, ev   ARGV: member
_PURGE = """
local cls = redis.call('HGET', KEYS[1], 'class')
if not cls then return 0 end
redis.call('HINCRBY', KEYS[3], cls, -1)
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
event_release(KEYS[4])
return 1
"""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    tenant: str
    sink: str
    event_id: str
    event_type: str
    cls: str
    status: int | None
    error: str
    attempts: int
    first_attempt: float | None  # unix seconds
    last_attempt: float | None
    dead_lettered_at: float

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["class"] = out.pop("cls")
        return out


@dataclass(frozen=True, slots=True)
class Filter:
    """Which dead letters an operation applies to; ``None`` matches everything."""

    tenant: str | None = None
    sink: str | None = None
    cls: str | None = None
    event_type: str | None = None
    since: float | None = None  # dead-lettered at or after (unix seconds)
    until: float | None = None  # dead-lettered before
    limit: int | None = None

    def matches(self, d: DeadLetter) -> bool:
        return (
            (self.sink is None or d.sink == self.sink)
            and (self.cls is None or d.cls == self.cls)
            and (self.event_type is None or d.event_type == self.event_type)
        )

    def is_empty(self) -> bool:
        return all(
            v is None for v in (self.tenant, self.sink, self.cls, self.event_type,
                                self.since, self.until)
        )  # fmt: skip


@dataclass
class Outcome:
    """What a replay or purge did (or, with ``dry_run``, would do)."""

    done: list[DeadLetter] = field(default_factory=list)
    skipped: list[tuple[DeadLetter, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "count": len(self.done),
            "entries": [d.to_json() for d in self.done],
            "skipped": [{**d.to_json(), "reason": r} for d, r in self.skipped],
        }


def entry_fields(d: DeadLetter) -> list[str]:
    """The flat name/value pairs the finish script stores for an entry."""

    def ms(t: float | None) -> str:
        return "" if t is None else str(int(t * 1000))

    return [
        "event_id", d.event_id, "sink", d.sink, "type", d.event_type, "class", d.cls,
        "status", "" if d.status is None else str(d.status), "error", d.error,
        "attempts", str(d.attempts), "first", ms(d.first_attempt), "last", ms(d.last_attempt),
        "at", ms(d.dead_lettered_at),
    ]  # fmt: skip


def member(sink: str, event_id: str) -> str:
    return f"{sink}:{event_id}"


def _from_hash(tenant: str, h: dict[bytes, bytes]) -> DeadLetter:
    def text(name: str) -> str:
        return h.get(name.encode(), b"").decode(errors="replace")

    def secs(name: str) -> float | None:
        v = text(name)
        return int(v) / 1000 if v else None

    status = text("status")
    return DeadLetter(
        tenant=tenant,
        sink=text("sink"),
        event_id=text("event_id"),
        event_type=text("type"),
        cls=text("class"),
        status=int(status) if status else None,
        error=text("error"),
        attempts=int(text("attempts") or 0),
        first_attempt=secs("first"),
        last_attempt=secs("last"),
        dead_lettered_at=secs("at") or 0.0,
    )


class DeadLetterStore:
    """List, show, replay and purge dead letters (the CLI and the admin API use this)."""

    def __init__(self, redis_client: Redis, config: Config) -> None:
        self._redis = redis_client
        self._replay = redis_client.register_script(stored_event.LUA + _REPLAY)
        self._purge = redis_client.register_script(stored_event.LUA + _PURGE)
        self.set_config(config)

    def set_config(self, config: Config) -> None:
        self._config = config
        self._keys = Keys(config.redis.key_prefix)

    async def _tenants(self, flt: Filter) -> list[str]:
        if flt.tenant is None:
            return [t.slug for t in self._config.tenants]
        # A tenant removed from the configuration may still have dead letters: named
        # explicitly, they can be listed and purged.
        if self._config.tenant(flt.tenant) is None and not await _aw(
            self._redis.exists(self._keys.dead_letters(flt.tenant))
        ):
            raise DeadLetterError(f"unknown tenant {flt.tenant!r}")
        return [flt.tenant]

    async def iter(self, flt: Filter) -> AsyncIterator[DeadLetter]:
        """Entries matching ``flt``, oldest dead letter first, per tenant."""
        if flt.cls is not None and flt.cls not in CLASSES:
            raise DeadLetterError(f"unknown class {flt.cls!r} (one of {', '.join(CLASSES)})")
        lo = "-inf" if flt.since is None else str(int(flt.since * 1000))
        hi = "+inf" if flt.until is None else f"({int(flt.until * 1000)}"
        left = flt.limit
        for tenant in await self._tenants(flt):
            start = 0
            while left is None or left > 0:
                members = await self._redis.zrangebyscore(
                    self._keys.dead_letters(tenant), lo, hi, start=start, num=_CHUNK
                )
                if not members:
                    break
                start += len(members)
                async with self._redis.pipeline(transaction=False) as pipe:
                    for m in members:
                        sink, _, event_id = m.decode().partition(":")
                        pipe.hgetall(self._keys.dead_letter(tenant, sink, event_id))
                    found: list[dict[bytes, bytes]] = await pipe.execute()
                for h in found:
                    if not h:
                        continue
                    d = _from_hash(tenant, h)
                    if flt.matches(d):
                        yield d
                        if left is not None:
                            left -= 1
                            if left <= 0:
                                return

    async def find(self, flt: Filter) -> list[DeadLetter]:
        return [d async for d in self.iter(flt)]

    async def get(self, tenant: str, sink: str, event_id: str) -> DeadLetter | None:
        h = await _aw(self._redis.hgetall(self._keys.dead_letter(tenant, sink, event_id)))
        return _from_hash(tenant, h) if h else None

    async def payload(self, tenant: str, event_id: str) -> bytes | None:
        """The stored envelope a dead letter would deliver."""
        try:
            raw = await _aw(self._redis.get(self._keys.event(tenant, event_id)))
            return None if raw is None else stored_event.parse(raw).body
        except (ValueError, redis.exceptions.ResponseError):  # not a stored event
            return None

    async def counts(self) -> dict[tuple[str, str], int]:
        """Stored dead letters by (tenant, class)."""
        out: dict[tuple[str, str], int] = {}
        for t in self._config.tenants:
            found = await _aw(self._redis.hgetall(self._keys.dead_letter_counts(t.slug)))
            for cls in CLASSES:
                out[(t.slug, cls)] = int(found.get(cls.encode(), 0))
        return out

    async def replay(self, flt: Filter, *, dry_run: bool = False) -> Outcome:
        """Re-enqueue matching entries with fresh attempts; each leaves once it is queued."""
        out = Outcome()
        found = await self.find(flt)  # first list, then change: the index moves under us
        for i in range(0, len(found), _CHUNK):
            await self._replay_batch(found[i : i + _CHUNK], out, dry_run)
        return out

    async def _replay_batch(self, batch: list[DeadLetter], out: Outcome, dry_run: bool) -> None:
        k = self._keys
        prefix = self._config.redis.key_prefix
        q = queue.queue_name(prefix)
        now = time.time()
        calls: list[DeadLetter] = []
        async with self._redis.pipeline(transaction=False) as pipe:
            for d in batch:
                tenant = self._config.tenant(d.tenant)
                sink = None if tenant is None else next(
                    (s for s in tenant.sinks if s.name == d.sink), None
                )  # fmt: skip
                if sink is None:
                    out.skipped.append((d, "sink is no longer configured"))
                    continue
                if dry_run:
                    out.done.append(d)
                    continue
                job_id = queue.delivery_job_id(prefix, d.tenant, d.sink, d.event_id)
                job = queue.serialize({
                    "t": None, "f": queue.DELIVER_FUNCTION,
                    "a": [d.tenant, d.sink, d.event_id], "k": {}, "et": int(now * 1000),
                })  # fmt: skip
                ttl_ms = int((sink.max_age + EXPIRY_MARGIN_S) * 1000)
                keys = [
                    k.dead_letter(d.tenant, d.sink, d.event_id), k.dead_letters(d.tenant),
                    k.dead_letter_counts(d.tenant), k.event(d.tenant, d.event_id),
                    queue.JOB_KEY_PREFIX + job_id, q, k.attempts(d.tenant, d.sink, d.event_id),
                    retry_key_prefix + job_id, in_progress_key_prefix + job_id,
                    k.sink_gone(d.tenant, d.sink),
                ]  # fmt: skip
                args: list[str | int | bytes] = [
                    member(d.sink, d.event_id), int(now * 1000), job, ttl_ms,
                    int((now + sink.max_age) * 1000), ttl_ms, job_id,
                ]  # fmt: skip
                await self._replay(keys=keys, args=args, client=pipe)
                calls.append(d)
            results = await pipe.execute() if calls else []
        for d, r in zip(calls, results, strict=True):
            reason = r.decode() if isinstance(r, bytes) else str(r)
            if reason == "ok":
                out.done.append(d)
            elif reason == "busy":
                out.skipped.append((d, "its last delivery is still finishing; try again"))
            elif reason == "no_payload":
                out.skipped.append((d, "the event's payload is no longer stored"))
            # "missing": replayed or purged meanwhile by someone else

    async def purge(self, flt: Filter, *, dry_run: bool = False) -> Outcome:
        """Delete matching entries (and the stored event once nothing else needs it)."""
        out = Outcome()
        found = await self.find(flt)
        for i in range(0, len(found), _CHUNK):
            await self._purge_batch(found[i : i + _CHUNK], out, dry_run)
        return out

    async def _purge_batch(self, batch: Iterable[DeadLetter], out: Outcome, dry_run: bool) -> None:
        items = list(batch)
        if dry_run:
            out.done += items
            return
        k = self._keys
        async with self._redis.pipeline(transaction=False) as pipe:
            for d in items:
                keys = [
                    k.dead_letter(d.tenant, d.sink, d.event_id), k.dead_letters(d.tenant),
                    k.dead_letter_counts(d.tenant), k.event(d.tenant, d.event_id),
                ]  # fmt: skip
                await self._purge(keys=keys, args=[member(d.sink, d.event_id)], client=pipe)
            results = await pipe.execute()
        out.done += [d for d, r in zip(items, results, strict=True) if r]


def _aw(value: Awaitable[T] | T) -> Awaitable[T]:
    """redis-py types its async commands as ``Awaitable[T] | T``; they are awaitables."""
    return cast(Awaitable[T], value)
