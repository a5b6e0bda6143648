"""The event log: what became of every event the relay took in, one event at a time.

The scripts write it where the pipeline changes (``lua/lib/event_log.lua`` names the
record's fields): ``ingest.lua`` puts a new event in the log's index — its stored event
already says its type, source, time and payload, and is its record's copy until its
last delivery lets it go — and counts every later arrival; each finish records the
attempt (start, duration, status or error class, a scrubbed excerpt of the answer) and
the delivery's end; a replay or a resend records itself. A sink whose ``filter`` kept
the event out at ingest is recorded so (``not_routed``: "filter"), whatever the
configuration says later; whether a sink the record says nothing of takes the event is
the tenant's configuration's to say (its ``events`` type globs). This module reads
and acts:

- :meth:`EventLog.get` one record, with each queued delivery's live state from the
  pipeline's own keys (scheduled for when, in flight, waiting on its sink's slots,
  breaker or pause, or on its chat), and :meth:`EventLog.find` by event id alone;
- :meth:`EventLog.search`: newest first, filtered by tenant, sink, type, chat, state,
  time and payload text or field, with a cursor; it reads at most ``scan`` records
  and says how many it read;
- :meth:`EventLog.resend`: a recorded event to one of its sinks, or all, again.

Records go oldest first once past ``event_log.retention`` or over
``event_log.max_memory`` (the scripts count each record's bytes as Redis does).

The module has one role — the record as read, searched and acted on — and stays whole:
the record's parsing, its live state and the search's matching read the same fields.
"""

from __future__ import annotations

import base64
import fnmatch
import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from redis.asyncio import Redis

from relay.config import Config
from relay.errors import EventLogError
from relay.keys import Keys
from relay.store import jobs, scripts, stored_event

T = TypeVar("T")

SCAN_DEFAULT = 10_000  # records a search reads unless told otherwise
SCAN_MAX = 200_000
_BATCH = 200

# What a search's ``state`` may ask for; a delivery's state is one of STATES.
STATES = (
    "pending",  # queued: due, scheduled, in flight or waiting (get() says which)
    "delivered",
    "dead_letter",
    "dropped",
    "not_routed",
    "failed",  # any attempt that did not get a 2xx (whatever came after)
)
# Why a sink is not routed: its type globs, or its filter (decided at ingest, recorded).
NOT_THIS_TYPE = "its events filter does not take this type"
FILTERED = "filter: its filter did not take this event"
RESEND_SKIPPED = {
    "pending": "a delivery to this sink is under way",
    "dead_letter": "it is a dead letter: replay it (chert-relay dlq replay)",
    "no_payload": "the record has no copy of the event",
    "missing": "no record of this event (past the event log's retention?)",
}


@dataclass(frozen=True, slots=True)
class Attempt:
    n: int
    at_ms: int  # when it started (Redis' clock)
    ms: int  # how long it took
    status: int | None
    kind: str  # http, timeout or connection; a broker's: ack, nack or refused
    error: str
    excerpt: str  # a 2xx answer's body, scrubbed
    source: str  # what queued the delivery: webhook, poll, …, replay, resend
    stale: bool  # its run no longer held the delivery: the sink may have it twice

    @property
    def ok(self) -> bool:
        """Delivered: a 2xx, or a broker's acknowledgement."""
        return self.kind == "ack" or (self.status is not None and 200 <= self.status < 300)

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "at": self.at_ms / 1000,
            "ms": self.ms,
            "status": self.status,
            "kind": self.kind,
            "error": self.error,
            "excerpt": self.excerpt,
            "source": self.source,
            "stale": self.stale,
        }


@dataclass(slots=True)
class SinkState:
    sink: str
    state: str  # delivered, dead_letter, dropped, not_routed, or pending's live form
    detail: str = ""  # the dead letter's class, why not routed, what it waits on…
    due_ms: int | None = None  # scheduled: when
    attempts: list[Attempt] = field(default_factory=list)
    attempts_made: int = 0  # all told (only the last 50 are kept)

    def to_json(self) -> dict[str, Any]:
        return {
            "sink": self.sink,
            "state": self.state,
            "detail": self.detail,
            "due": None if self.due_ms is None else self.due_ms / 1000,
            "attempts_made": self.attempts_made,
            "attempts": [a.to_json() for a in self.attempts],
        }


@dataclass(frozen=True, slots=True)
class Arrival:
    source: str
    first_ms: int
    count: int


@dataclass(slots=True)
class EventRecord:
    tenant: str
    event_id: str
    type: str
    chat_id: str
    at_ms: int  # first arrival, Redis' clock
    arrivals: list[Arrival]
    sinks: list[SinkState]
    stored: bytes  # the stored event as first taken in
    size: int  # bytes, as the scripts count them

    @property
    def duplicates(self) -> int:
        return sum(a.count for a in self.arrivals) - 1

    @property
    def body(self) -> bytes:
        try:
            return stored_event.parse(self.stored).body
        except ValueError:
            return b""

    def to_json(self, *, payload: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tenant": self.tenant,
            "event_id": self.event_id,
            "type": self.type,
            "chat_id": self.chat_id or None,
            "at": self.at_ms / 1000,
            "arrivals": [
                {"source": a.source, "first": a.first_ms / 1000, "count": a.count}
                for a in self.arrivals
            ],
            "duplicates": self.duplicates,
            "sinks": [s.to_json() for s in self.sinks],
        }
        if payload:
            out["payload"] = self.body.decode(errors="replace")
        return out


@dataclass(frozen=True, slots=True)
class Query:
    """A search: every field None (or empty) matches everything."""

    tenants: Sequence[str]  # the tenants the caller may see (and asked for)
    sink: str | None = None
    type: str | None = None  # exact, or a glob (``message.*``)
    chat: str | None = None
    state: str | None = None  # one of STATES
    since: float | None = None  # unix seconds, first arrival
    until: float | None = None
    text: str | None = None  # in the payload, case-insensitive
    field_path: str | None = None  # a dotted path in the payload (``data.chat.id``)…
    field_value: str | None = None  # …and the value it must have (as text)
    limit: int = 50
    scan: int = SCAN_DEFAULT
    cursor: str | None = None


@dataclass(slots=True)
class Page:
    records: list[EventRecord]
    scanned: int  # records read
    cursor: str | None  # where the next page starts; None: nothing older is left
    exhausted_scan: bool  # stopped because it read `scan` records


Routes = Sequence[tuple[str, Callable[[str], bool]]]  # each sink, and whether it takes a type


def parse_record(
    tenant: str,
    event_id: str,
    first_ms: int,
    raw: dict[bytes, bytes],
    stored: bytes | None,
    routes: Routes,
) -> EventRecord:
    """An event in the log (first seen at ``first_ms``): its record as the scripts wrote
    it (``raw``, perhaps empty), its stored event (``stored``: the record's copy, else
    the one its deliveries still hold; a record an earlier build wrote may hold its copy
    in an ``ev`` field), and ``routes``, the tenant's sinks now — a sink the record says
    nothing of is under way if it takes the event's type, else not routed there."""
    f = {k.decode(errors="replace"): v for k, v in raw.items()}
    copy = stored or f.get("ev") or b""
    try:
        ev: stored_event.StoredEvent | None = stored_event.parse(copy)
    except ValueError:
        ev = None
    etype = ev.type if ev is not None else ""
    came: dict[str, list[int]] = {}
    if ev is not None:
        came[ev.source] = [first_ms, 1]
    sinks: dict[str, SinkState] = {}
    attempts: dict[str, list[Attempt]] = {}
    for name, value in f.items():
        text = value.decode(errors="replace")
        if name.startswith("via:"):
            first, _, count = text.partition(" ")
            seen = came.setdefault(name[4:], [_int(first), 0])
            seen[0], seen[1] = min(seen[0], _int(first)), seen[1] + _int(count)
        elif name.startswith("s:"):
            sinks[name[2:]] = _recorded_state(name[2:], text)
        elif name.startswith("a:"):
            sink = name[2:].rpartition(":")[0]
            attempts.setdefault(sink, []).append(_attempt(text))
    for sink, takes in routes:
        if sink not in sinks:
            sinks[sink] = SinkState(sink, "pending") if takes(etype) else _not_routed(sink)
    for sink, found in attempts.items():
        state = sinks.setdefault(sink, SinkState(sink, "pending"))
        state.attempts = sorted(found, key=lambda a: a.n)
    for name, state in sinks.items():
        state.attempts_made = _int(f.get(f"n:{name}", b"0").decode())
    first_source = ev.source if ev is not None else ""
    arrivals = [Arrival(src, t, n) for src, (t, n) in came.items()]
    arrivals.sort(key=lambda a: (a.first_ms, a.source != first_source))
    return EventRecord(
        tenant=tenant,
        event_id=event_id,
        type=etype,
        chat_id=_chat(ev.body) if ev is not None else "",
        at_ms=first_ms,
        arrivals=arrivals,
        sinks=[sinks[k] for k in sorted(sinks)],
        stored=copy,
        size=_int(f.get("sz", b"0").decode()),
    )


def _chat(body: bytes) -> str:
    """The event's ``data.chat.id`` ('' if none)."""
    try:
        chat = json.loads(body)["data"]["chat"]["id"]
    except (ValueError, KeyError, TypeError):
        return ""
    return chat if isinstance(chat, str) else ""


def _not_routed(sink: str) -> SinkState:
    return SinkState(sink, "not_routed", NOT_THIS_TYPE)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


def _recorded_state(sink: str, text: str) -> SinkState:
    if text == "ok":
        return SinkState(sink, "delivered")
    if text.startswith("dead:"):
        return SinkState(sink, "dead_letter", text[5:])
    if text == "drop":
        return SinkState(sink, "dropped", "the stored event was gone")
    if text == "filter":
        return SinkState(sink, "not_routed", FILTERED)
    return SinkState(sink, "pending")


def _attempt(text: str) -> Attempt:
    try:
        a = json.loads(text)
    except ValueError:
        a = {}
    if not isinstance(a, dict):
        a = {}
    status = a.get("st")
    return Attempt(
        n=int(a.get("n") or 0),
        at_ms=int(a.get("t") or 0),
        ms=int(a.get("ms") or 0),
        status=status if isinstance(status, int) else None,
        kind=str(a.get("k") or ""),
        error=str(a.get("err") or ""),
        excerpt=str(a.get("x") or ""),
        source=str(a.get("src") or ""),
        stale=bool(a.get("stale")),
    )


def _matches(rec: EventRecord, q: Query) -> bool:
    if q.type is not None and rec.type != q.type and not fnmatch.fnmatchcase(rec.type, q.type):
        return False
    if q.chat is not None and rec.chat_id != q.chat:
        return False
    sinks = [s for s in rec.sinks if q.sink is None or s.sink == q.sink]
    if q.sink is not None and not sinks:
        return False
    if q.state is not None:
        if q.state == "failed":
            ok = any(not a.ok for s in sinks for a in s.attempts)
        else:
            ok = any(s.state == q.state for s in sinks)
        if not ok:
            return False
    if q.text is not None and q.text.lower().encode() not in rec.body.lower():
        return False
    if q.field_path is not None:
        try:
            found: Any = json.loads(rec.body)
            for part in q.field_path.split("."):
                found = found[int(part)] if isinstance(found, list) else found[part]
        except (ValueError, KeyError, IndexError, TypeError):
            return False
        text = found if isinstance(found, str) else json.dumps(found)
        if text != q.field_value:
            return False
    return True


def encode_cursor(score: int, skip: int) -> str:
    return base64.urlsafe_b64encode(f"{score}.{skip}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        score, _, skip = raw.partition(".")
        return int(score), int(skip)
    except (ValueError, UnicodeDecodeError):
        raise EventLogError("the cursor is not one this relay gave out") from None


class EventLog:
    """Reads the event log and resends from it (one per process, on the relay's client)."""

    def __init__(self, redis_client: Redis, config: Config) -> None:
        self._redis = redis_client
        self._resend = scripts.script("resend").bind(redis_client)
        self.set_config(config)

    def set_config(self, config: Config) -> None:
        self._config = config
        self._keys = Keys(config.redis.key_prefix)

    async def get(self, tenant: str, event_id: str) -> EventRecord | None:
        """One event's record, with its deliveries' live states; None if the event is
        not in the log."""
        (found,) = await self._read([(f"{tenant}:{event_id}".encode(), None)], {tenant})
        rec = found[1]
        if rec is not None:
            await self._live(rec)
        return rec

    def _routes(self, tenant: str) -> Routes:
        t = self._config.tenant(tenant)
        return [] if t is None else [(s.name, s.matches) for s in t.sinks]

    async def find(self, event_id: str, tenants: Iterable[str]) -> list[EventRecord]:
        """The records of ``event_id`` among ``tenants`` (an id may recur across tenants)."""
        out = []
        for tenant in tenants:
            rec = await self.get(tenant, event_id)
            if rec is not None:
                out.append(rec)
        return out

    async def _live(self, rec: EventRecord) -> None:
        """What each queued delivery is doing now, from the pipeline's keys."""
        k = self._keys
        pending = [s for s in rec.sinks if s.state == "pending"]
        if not pending:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.time()
            for s in pending:
                job_id = k.job_id(rec.tenant, s.sink, rec.event_id)
                pipe.exists(k.job(job_id))
                pipe.exists(k.job_in_progress(job_id))
                pipe.zscore(k.queue, job_id)
                pipe.zscore(k.waiting(rec.tenant, s.sink), job_id)
                pipe.hget(k.attempts(rec.tenant, s.sink, rec.event_id), "pr")
                pipe.exists(k.dead_letter(rec.tenant, s.sink, rec.event_id))
            found = await pipe.execute()
        secs, micros = found[0]
        now_ms = int(secs) * 1000 + int(micros) // 1000
        for i, s in enumerate(pending):
            job, running, due, parked, reason, dead = found[1 + 6 * i : 7 + 6 * i]
            if dead:
                s.state, s.detail = "dead_letter", "being recorded"
            elif running:
                s.state = "in_flight"
            elif due is not None:
                s.due_ms = int(due)
                s.state = "scheduled" if due > now_ms else "due"
            elif parked is not None:
                why = reason.decode() if isinstance(reason, bytes) else "busy"
                s.state, s.detail = ("paused", "") if why == "paused" else ("waiting", why)
            elif job:
                s.state, s.detail = "waiting_on_chat", "an earlier event of its chat goes first"
            else:
                s.state, s.detail = "expired", "its job is gone without an ending recorded"

    async def search(self, q: Query) -> Page:
        """Records matching ``q``, newest first; reads at most ``q.scan`` of them."""
        if q.state is not None and q.state not in STATES:
            raise EventLogError(f"unknown state {q.state!r} (one of {', '.join(STATES)})")
        hi: float | str = "+inf" if q.until is None else int(q.until * 1000)
        skip = 0
        if q.cursor is not None:
            hi, skip = decode_cursor(q.cursor)
        lo: float | str = "-inf" if q.since is None else int(q.since * 1000)
        page = Page([], 0, None, False)
        rows: list[tuple[bytes, float]] = [(b"", 0.0)] * _BATCH
        while len(rows) == _BATCH:
            rows = await _aw(
                self._redis.zrevrangebyscore(
                    self._keys.event_log_index, hi, lo, start=skip, num=_BATCH, withscores=True
                )
            )
            for score, rec in await self._read(rows, set(q.tenants)):
                skip = skip + 1 if score == hi else 1
                hi = score
                page.scanned += 1
                if rec is not None and _matches(rec, q):
                    page.records.append(rec)
                full = len(page.records) >= q.limit
                if full or page.scanned >= q.scan:
                    page.exhausted_scan = not full
                    page.cursor = encode_cursor(int(hi), skip)
                    rows = []
                    break
        for r in page.records:
            await self._live(r)
        return page

    async def _read(
        self, rows: Sequence[tuple[bytes, float | None]], tenants: set[str]
    ) -> list[tuple[int, EventRecord | None]]:
        """The records of index ``rows`` (member, score; a score of None: look it up),
        with their scores: None for a tenant not in ``tenants``, or an event no longer
        (or never) in the log."""
        k = self._keys
        wanted = []
        for member, score in rows:
            tenant, _, event_id = member.decode(errors="replace").partition(":")
            wanted.append((tenant, event_id, score))
        async with self._redis.pipeline(transaction=False) as pipe:
            for tenant, event_id, score in wanted:
                if tenant in tenants:
                    if score is None:
                        pipe.zscore(k.event_log_index, f"{tenant}:{event_id}")
                    pipe.hgetall(k.event_log(tenant, event_id))
                    # the stored event before the copy: one renamed between the two
                    # reads is found as the copy
                    pipe.get(k.event(tenant, event_id))
                    pipe.get(k.event_log_copy(tenant, event_id))
            found = iter(await pipe.execute(raise_on_error=False))
        out: list[tuple[int, EventRecord | None]] = []
        for tenant, event_id, score in wanted:
            if tenant not in tenants:
                out.append((int(score or 0), None))
                continue
            if score is None:
                score = next(found)
            raw, stored, kept = next(found), next(found), next(found)
            if score is None or isinstance(raw, Exception):
                out.append((int(score or 0), None))
                continue
            held = next((b for b in (kept, stored) if isinstance(b, bytes)), None)
            rec = parse_record(tenant, event_id, int(score), raw, held, self._routes(tenant))
            out.append((int(score), rec))
        return out

    async def resend(
        self, tenant: str, event_id: str, sink: str | None = None
    ) -> list[tuple[str, str]]:
        """Deliver a recorded event again to ``sink``, or to every configured sink it was
        routed to: (sink, verdict) each — ``ok`` or why not (:data:`RESEND_SKIPPED`)."""
        t = self._config.tenant(tenant)
        if t is None:
            raise EventLogError(f"unknown tenant {tenant!r}")
        rec = await self.get(tenant, event_id)
        if rec is None:
            raise EventLogError(
                f"no record of event {event_id!r} for tenant {tenant!r} "
                "(never taken in, or past the event log's retention)"
            )
        routed = {s.sink for s in rec.sinks if s.state != "not_routed"}
        if sink is not None:
            if t.sink(sink) is None:
                raise EventLogError(f"tenant {tenant!r} has no sink {sink!r}")
            if sink not in routed:
                why = next((s.detail for s in rec.sinks if s.sink == sink), NOT_THIS_TYPE)
                raise EventLogError(f"event {event_id!r} was not routed to sink {sink!r} ({why})")
            targets = [sink]
        else:
            targets = [s.name for s in t.sinks if s.name in routed]
        k = self._keys
        out = []
        for name in targets:
            cfg = t.sink(name)
            assert cfg is not None
            job_id = k.job_id(tenant, name, event_id)
            ordered = cfg.ordering != "none" and bool(rec.chat_id)
            ttl_ms = int((cfg.max_age + jobs.EXPIRY_MARGIN_S) * 1000)
            now_ms = rec.at_ms  # the job record's enqueue time is shown only
            verdict = await self._resend(
                keys={
                    "log": k.event_log(tenant, event_id),
                    "log_bytes": k.event_log_bytes,
                    "ev": k.event(tenant, event_id),
                    "job": k.job(job_id),
                    "queue": k.queue,
                    "attempts": k.attempts(tenant, name, event_id),
                    "retry": k.job_retry(job_id),
                    "in_progress": k.job_in_progress(job_id),
                    "entry": k.dead_letter(tenant, name, event_id),
                    "gone": k.sink_gone(tenant, name),
                    "breaker": k.breaker(tenant, name),
                    "chat": k.chat_order(tenant, name, rec.chat_id) if ordered else "",
                    "log_index": k.event_log_index,
                    "log_copy": k.event_log_copy(tenant, event_id),
                },
                args={
                    "job": jobs.delivery_job(
                        tenant, name, event_id, now_ms, rec.chat_id if ordered else None
                    ),
                    "job_ttl_ms": ttl_ms,
                    "max_age_ms": int(cfg.max_age * 1000),
                    "job_id": job_id,
                    "event_id": event_id,
                    "sink": name,
                    "log_member": f"{tenant}:{event_id}",
                    "wake": k.wake,
                },
            )
            out.append((name, verdict.decode() if isinstance(verdict, bytes) else str(verdict)))
        return out

    async def usage(self) -> tuple[int, int]:
        """(records, bytes) the event log holds now."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self._keys.event_log_index)
            pipe.get(self._keys.event_log_bytes)
            count, size = await pipe.execute()
        return int(count), int(size or 0)


def _aw(value: Awaitable[T] | T) -> Awaitable[T]:
    """redis-py types its async commands as ``Awaitable[T] | T``; they are awaitables."""
    return cast(Awaitable[T], value)
