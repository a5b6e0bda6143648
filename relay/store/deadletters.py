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

The event itself stays stored (:mod:`relay.store.stored_event`): a dead letter holds it
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

import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar, cast

import redis.exceptions
from redis.asyncio import Redis

from relay.config import Config
from relay.config.values import parse_duration
from relay.errors import DeadLetterError
from relay.keys import Keys
from relay.store import jobs, scripts, stored_event

CLASSES = ("rejected", "exhausted", "gone")
# What replay.lua answers for one entry, and why an entry it did not replay was skipped.
ReplayVerdict = Literal["ok", "missing", "busy", "no_payload"]
SKIPPED: dict[ReplayVerdict, str] = {
    "busy": "its last delivery is still finishing; try again",
    "no_payload": "the event's payload is no longer stored",
}
T = TypeVar("T")
Progress = Callable[[int, int], None]  # (entries done, entries in all)
_CHUNK = 200


@dataclass(frozen=True, slots=True)
class Tried:
    """A delivery's attempts so far: how many, and when the first and last were."""

    attempts: int
    first: float | None  # unix seconds
    last: float | None


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
    chat: str | None = None  # an ordered delivery's chat
    holds_chat: bool = False  # it keeps its chat's later events waiting (on_dead_letter hold)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["class"] = out.pop("cls")
        return out


_AGE_RE = re.compile(r"^\s*\d+(?:\.\d+)?\s*(ms|s|m|h|d)\s*$")


# Times the store can hold (as milliseconds in a sorted set's scores): years 1 to 9999.
_TIME_RANGE = (-62135596800.0, 253402300799.0)


def parse_time(text: str, now: float | None = None) -> float:
    """Unix seconds from ``1767225600``, ``2026-05-24T01:35:34Z`` or an age like ``2h``."""
    seconds = _parse_time(text, time.time() if now is None else now)
    if not _TIME_RANGE[0] <= seconds <= _TIME_RANGE[1]:
        raise ValueError(f"{text[:40]!r} is out of range: a time between the years 1 and 9999")
    return seconds


def _parse_time(text: str, now: float) -> float:
    if _AGE_RE.match(text):
        return now - parse_duration(text)
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise ValueError(f"{text!r} is not a time: use unix seconds, ISO 8601 or an age")
        return seconds
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use unix seconds, ISO 8601 or an age like '2h'"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


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
    # Not a filter but a bound: only these tenants' entries (an admin token's tenants).
    within: frozenset[str] | None = None

    def matches(self, d: DeadLetter) -> bool:
        return (
            (self.sink is None or d.sink == self.sink)
            and (self.cls is None or d.cls == self.cls)
            and (self.event_type is None or d.event_type == self.event_type)
        )

    def is_empty(self) -> bool:
        return all(
            v is None
            for v in (self.tenant, self.sink, self.cls, self.event_type, self.since, self.until)
        )


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
        "event_id",
        d.event_id,
        "sink",
        d.sink,
        "type",
        d.event_type,
        "class",
        d.cls,
        "status",
        "" if d.status is None else str(d.status),
        "error",
        d.error,
        "attempts",
        str(d.attempts),
        "first",
        ms(d.first_attempt),
        "last",
        ms(d.last_attempt),
        "at",
        ms(d.dead_lettered_at),
        *(["chat", d.chat] if d.chat else []),
    ]


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
        chat=text("chat") or None,
        holds_chat=text("holds") == "1",
    )


class DeadLetterStore:
    """List, show, replay and purge dead letters (the CLI and the admin API use this)."""

    def __init__(self, redis_client: Redis, config: Config) -> None:
        self._redis = redis_client
        self._replay = scripts.script("replay").bind(redis_client)
        self._purge = scripts.script("purge").bind(redis_client)
        self.set_config(config)

    def set_config(self, config: Config) -> None:
        self._config = config
        self._keys = Keys(config.redis.key_prefix)

    async def _tenants(self, flt: Filter) -> list[str]:
        if flt.tenant is not None and flt.within is not None and flt.tenant not in flt.within:
            return []
        if flt.tenant is None:
            slugs = [t.slug for t in self._config.tenants]
            return slugs if flt.within is None else [s for s in slugs if s in flt.within]
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

    async def replay(
        self, flt: Filter, *, dry_run: bool = False, progress: Progress | None = None
    ) -> Outcome:
        """Re-enqueue matching entries with fresh attempts; each leaves once it is queued."""
        found = await self.find(flt)  # first list, then change: the index moves under us
        return await self.replay_entries(found, dry_run=dry_run, progress=progress)

    async def replay_entries(
        self, found: list[DeadLetter], *, dry_run: bool = False, progress: Progress | None = None
    ) -> Outcome:
        """:meth:`replay` for entries already listed (one the operator page names, say).

        ``progress(done, total)`` is called after each batch.
        """
        out = Outcome()
        for i in range(0, len(found), _CHUNK):
            await self._replay_batch(found[i : i + _CHUNK], out, dry_run)
            if progress is not None:
                progress(min(i + _CHUNK, len(found)), len(found))
        return out

    async def _replay_batch(self, batch: list[DeadLetter], out: Outcome, dry_run: bool) -> None:
        k = self._keys
        now_ms = int(time.time() * 1000)  # the job record's enqueue time (arq's; shown only)
        calls: list[DeadLetter] = []
        async with self._redis.pipeline(transaction=False) as pipe:
            for d in batch:
                tenant = self._config.tenant(d.tenant)
                sink = None if tenant is None else tenant.sink(d.sink)
                if sink is None:
                    out.skipped.append((d, "sink is no longer configured"))
                    continue
                if dry_run:
                    out.done.append(d)
                    continue
                job_id = k.job_id(d.tenant, d.sink, d.event_id)
                ttl_ms = int((sink.max_age + jobs.EXPIRY_MARGIN_S) * 1000)
                keys = {
                    "entry": k.dead_letter(d.tenant, d.sink, d.event_id),
                    "index": k.dead_letters(d.tenant),
                    "counts": k.dead_letter_counts(d.tenant),
                    "ev": k.event(d.tenant, d.event_id),
                    "job": k.job(job_id),
                    "queue": k.queue,
                    "attempts": k.attempts(d.tenant, d.sink, d.event_id),
                    "retry": k.job_retry(job_id),
                    "in_progress": k.job_in_progress(job_id),
                    "gone": k.sink_gone(d.tenant, d.sink),
                    "chat": k.chat_order(d.tenant, d.sink, d.chat) if d.chat else "",
                    "held": k.held_chats(d.tenant, d.sink),
                    "breaker": k.breaker(d.tenant, d.sink),
                    "log": k.event_log(d.tenant, d.event_id),
                    "log_bytes": k.event_log_bytes,
                    "log_index": k.event_log_index,
                }
                ordered = d.chat is not None and sink.ordering != "none"
                job = jobs.delivery_job(
                    d.tenant, d.sink, d.event_id, now_ms, d.chat if ordered else None
                )
                args = {
                    "member": member(d.sink, d.event_id),
                    "job": job,
                    "job_ttl_ms": ttl_ms,
                    "max_age_ms": int(sink.max_age * 1000),
                    "attempts_ttl_ms": ttl_ms,
                    "job_id": job_id,
                    "event_id": d.event_id,
                    "chat": d.chat or "",
                    "ordered": "1" if ordered else "0",
                    "sink": d.sink,
                    "log_member": f"{d.tenant}:{d.event_id}",
                }
                await self._replay(keys=keys, args=args, client=pipe)
                calls.append(d)
            if calls:
                pipe.publish(k.wake, "")  # the workers start them now
            results = (await pipe.execute())[: len(calls)] if calls else []
        for d, r in zip(calls, results, strict=True):
            verdict = cast(ReplayVerdict, r.decode() if isinstance(r, bytes) else str(r))
            why = SKIPPED.get(verdict)
            if verdict == "ok":
                out.done.append(d)
            elif why is not None:
                out.skipped.append((d, why))
            # "missing": replayed or purged meanwhile by someone else

    async def purge(
        self, flt: Filter, *, dry_run: bool = False, progress: Progress | None = None
    ) -> Outcome:
        """Delete matching entries (and the stored event once nothing else needs it)."""
        found = await self.find(flt)
        return await self.purge_entries(found, dry_run=dry_run, progress=progress)

    async def purge_entries(
        self, found: list[DeadLetter], *, dry_run: bool = False, progress: Progress | None = None
    ) -> Outcome:
        """:meth:`purge` for entries already listed; ``progress`` as for replay."""
        out = Outcome()
        for i in range(0, len(found), _CHUNK):
            await self._purge_batch(found[i : i + _CHUNK], out, dry_run)
            if progress is not None:
                progress(min(i + _CHUNK, len(found)), len(found))
        return out

    async def _purge_batch(self, batch: Iterable[DeadLetter], out: Outcome, dry_run: bool) -> None:
        items = list(batch)
        if dry_run:
            out.done += items
            return
        k = self._keys
        async with self._redis.pipeline(transaction=False) as pipe:
            for d in items:
                keys = {
                    "entry": k.dead_letter(d.tenant, d.sink, d.event_id),
                    "index": k.dead_letters(d.tenant),
                    "counts": k.dead_letter_counts(d.tenant),
                    "ev": k.event(d.tenant, d.event_id),
                    "chat": k.chat_order(d.tenant, d.sink, d.chat) if d.chat else "",
                    "held": k.held_chats(d.tenant, d.sink),
                    "queue": k.queue,
                }
                args = {
                    "member": member(d.sink, d.event_id),
                    "event_id": d.event_id,
                    "chat": d.chat or "",
                    "job_base": k.job_id(d.tenant, d.sink, ""),
                }
                await self._purge(keys=keys, args=args, client=pipe)
            results = await pipe.execute()
        out.done += [d for d, r in zip(items, results, strict=True) if r]


def _aw(value: Awaitable[T] | T) -> Awaitable[T]:
    """redis-py types its async commands as ``Awaitable[T] | T``; they are awaitables."""
    return cast(Awaitable[T], value)
