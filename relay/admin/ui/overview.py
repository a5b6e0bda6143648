"""What the operator page shows about tenants, sinks and the queue, read from Redis.

Per tenant: the last webhook, the configured poll mode (and, where this process polls
it, the current one), who holds the poll lease — this process, another, or nobody —
and the watermark. Per sink: whether an operator paused it, its breaker, or that its
URL is marked gone (it answered 410), deliveries in flight and waiting (set aside until
the sink can take them), its jobs in the queue (ready and scheduled) and its dead
letters by class. The queue is one sorted set for every sink, and a tenant's dead
letters one index: splitting them per sink means reading every entry, so that is done
only while they hold at most :data:`SPLIT_LIMIT` entries; past that the page shows the
totals.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from redis.asyncio import Redis

from relay.config import Config
from relay.delivery import breaker
from relay.keys import Keys
from relay.store.deadletters import CLASSES
from relay.store.sinks import paused_since
from relay.upstream.poller import Poller

SPLIT_LIMIT = 5000

Lease = Literal["here", "elsewhere", "nobody"]


@dataclass
class TenantState:
    slug: str
    configured_mode: str
    mode: str | None  # what this process's poller is doing, if it polls the tenant
    lease: Lease
    last_webhook: float | None  # unix seconds
    watermark: float | None
    dead_letters: dict[str, int]  # by class


@dataclass
class SinkState:
    tenant: str
    name: str
    breaker: int  # breaker.CLOSED, HALF_OPEN or OPEN
    gone: bool  # its URL answered 410: deliveries dead-letter without a request
    paused_since: float | None  # unix seconds an operator paused it; None: not paused
    waiting: int  # deliveries set aside in its waiting set
    in_flight: int
    ready: int | None  # None: not split (the queue is too long)
    scheduled: int | None
    dead_letters: dict[str, int] | None  # by class; None: not split
    kind: str = "http"  # http, redis-stream, nats or amqp


@dataclass
class QueueState:
    ready: int
    scheduled: int
    oldest_ready_age: float
    split: bool  # whether the per-sink counts were read


@dataclass
class Overview:
    now: float
    tenants: list[TenantState] = field(default_factory=list)
    sinks: list[SinkState] = field(default_factory=list)
    queue: QueueState | None = None


def _num(raw: Any) -> float | None:
    try:
        return None if raw is None else float(raw)
    except ValueError:
        return None


async def read_overview(
    redis: Redis, config: Config, poller: Poller | None, tenants: list[str]
) -> Overview:
    """The state of ``tenants`` (the ones the viewer may see) and of the queue."""
    keys = Keys(config.redis.key_prefix)
    now = time.time()
    now_ms = int(now * 1000)
    chosen = [t for t in config.tenants if t.slug in tenants]
    pairs = [(t.slug, s.name) for t in chosen for s in t.sinks]
    async with redis.pipeline(transaction=False) as pipe:
        for t in chosen:
            pipe.get(keys.last_webhook(t.slug))
            pipe.get(keys.watermark(t.slug))
            pipe.get(keys.poll_lease(t.slug))
            pipe.hgetall(keys.dead_letter_counts(t.slug))
            pipe.zcard(keys.dead_letters(t.slug))
        for tenant, sink in pairs:
            pipe.zcount(keys.inflight(tenant, sink), now_ms, "+inf")
        for tenant, sink in pairs:
            pipe.get(keys.sink_gone(tenant, sink))
        for tenant, sink in pairs:
            pipe.get(keys.paused(tenant, sink))
            pipe.zcard(keys.waiting(tenant, sink))
        pipe.zcount(keys.queue, "-inf", now_ms)
        pipe.zcount(keys.queue, f"({now_ms}", "+inf")
        pipe.zrange(keys.queue, 0, 0, withscores=True)
        found: list[Any] = await pipe.execute()
    states = await breaker.states(redis, keys, pairs)
    out = Overview(now=now)
    per_tenant = found[: 5 * len(chosen)]
    in_flight = found[5 * len(chosen) : 5 * len(chosen) + len(pairs)]
    gone_urls = found[5 * len(chosen) + len(pairs) : 5 * len(chosen) + 2 * len(pairs)]
    pauses = found[5 * len(chosen) + 2 * len(pairs) : 5 * len(chosen) + 4 * len(pairs)]
    ready, scheduled, oldest = found[5 * len(chosen) + 4 * len(pairs) :]
    # The mark names the URL that answered 410: a sink given a new URL is not gone.
    urls = {(t.slug, s.name): s.url for t in chosen for s in t.sinks}
    kinds = {(t.slug, s.name): s.kind for t in chosen for s in t.sinks}
    split_dead: dict[str, Counter[tuple[str, str]] | None] = {}
    for i, t in enumerate(chosen):
        raw_wh, raw_wm, holder, counts, indexed = per_tenant[5 * i : 5 * i + 5]
        tp = poller.tenants.get(t.slug) if poller is not None else None
        lease: Lease = "nobody" if holder is None else "elsewhere"
        if tp is not None and holder is not None and holder.decode() == tp.lease.token:
            lease = "here"
        last = _num(raw_wh)
        out.tenants.append(
            TenantState(
                slug=t.slug,
                configured_mode=t.poll.mode,
                mode=None if tp is None else tp.mode,
                lease=lease,
                last_webhook=None if last is None else last / 1000,
                watermark=_num(raw_wm),
                dead_letters={c: int(counts.get(c.encode(), 0)) for c in CLASSES},
            )
        )
        split_dead[t.slug] = (
            await _dead_by_sink(redis, keys, t.slug) if indexed <= SPLIT_LIMIT else None
        )
    by_sink = await _queue_by_sink(redis, keys, now_ms, ready + scheduled)
    for (tenant, sink), flying, gone_url, pause, waits in zip(
        pairs, in_flight, gone_urls, pauses[::2], pauses[1::2], strict=True
    ):
        dead = split_dead[tenant]
        queued = None if by_sink is None else by_sink.get((tenant, sink), (0, 0))
        out.sinks.append(
            SinkState(
                tenant=tenant,
                name=sink,
                breaker=states[(tenant, sink)],
                gone=gone_url is not None and gone_url.decode() == urls[(tenant, sink)],
                paused_since=paused_since(pause),
                waiting=int(waits),
                in_flight=int(flying),
                ready=None if queued is None else queued[0],
                scheduled=None if queued is None else queued[1],
                dead_letters=None if dead is None else {c: dead[(sink, c)] for c in CLASSES},
                kind=kinds[(tenant, sink)],
            )
        )
    age = 0.0
    if oldest and oldest[0][1] <= now_ms:
        age = max(0.0, now - oldest[0][1] / 1000)
    out.queue = QueueState(int(ready), int(scheduled), age, by_sink is not None)
    return out


async def _dead_by_sink(redis: Redis, keys: Keys, tenant: str) -> Counter[tuple[str, str]]:
    """(sink, class) → stored dead letters of ``tenant`` (reads every entry's class)."""
    members = await redis.zrange(keys.dead_letters(tenant), 0, -1)
    async with redis.pipeline(transaction=False) as pipe:
        for m in members:
            sink, _, event_id = m.decode().partition(":")
            pipe.hget(keys.dead_letter(tenant, sink, event_id), "class")
        classes: list[bytes | None] = await pipe.execute() if members else []
    out: Counter[tuple[str, str]] = Counter()
    for m, cls in zip(members, classes, strict=True):
        if cls is not None:
            out[(m.decode().partition(":")[0], cls.decode())] += 1
    return out


async def _queue_by_sink(
    redis: Redis, keys: Keys, now_ms: int, size: int
) -> dict[tuple[str, str], tuple[int, int]] | None:
    """(tenant, sink) → (ready, scheduled) jobs, from the job ids; None past the limit."""
    if size > SPLIT_LIMIT:
        return None
    jobs: list[tuple[bytes, float]] = await redis.zrange(keys.queue, 0, -1, withscores=True)
    out: dict[tuple[str, str], tuple[int, int]] = {}
    for job_id, due in jobs:
        tenant, sink, _ = keys.parse_job_id(job_id.decode())
        r, s = out.get((tenant, sink), (0, 0))
        out[(tenant, sink)] = (r + 1, s) if due <= now_ms else (r, s + 1)
    return out
