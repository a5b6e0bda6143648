"""A delivery's steps in Redis: claim, finish, release and reschedule, each one script.

The scripts are ``lua/claim.lua``, ``finish.lua``, ``release.lua`` and
``reschedule.lua`` (their headers say what each does). This module calls them with
named keys and arguments and reads their replies into small typed records, so the
deliverer (:mod:`relay.delivery.deliverer`) branches on a :data:`Claim` rather than on
positions in a list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, cast

from redis.asyncio import Redis

from relay.config import WorkerConfig
from relay.delivery import breaker, deadletters
from relay.delivery.deadletters import DeadLetter, Tried
from relay.keys import Keys
from relay.store import jobs, scripts, stored_event
from relay.store.stored_event import StoredEvent

MARGIN_MS = int(jobs.EXPIRY_MARGIN_S * 1000)  # a delivery's job and event outlive its deadline

DeferReason = Literal["not_due", "breaker_open", "half_open", "busy"]
EndReason = Literal["gone", "expired", "exhausted"]
FinishOutcome = Literal["ok", "retry", "dead", "drop"]
BreakerEffect = Literal["success", "failure", "none"]


@dataclass(frozen=True, slots=True)
class Ref:
    """Which delivery: one (event, sink), and the arq job that carries it."""

    tenant: str
    sink: str
    event_id: str
    job_id: str
    chat: str | None = None  # an ordered delivery's chat


@dataclass(frozen=True, slots=True)
class Go:
    """The claim counted an attempt and leased an in-flight slot: POST now."""

    attempt: int
    first_ms: int
    deadline_ms: int
    stored: StoredEvent
    source: str  # the source the sink is told: "replay" for a replayed delivery


@dataclass(frozen=True, slots=True)
class Defer:
    """The claim put the job back in the queue for later, without an HTTP call."""

    reason: DeferReason
    wait_ms: int


@dataclass(frozen=True, slots=True)
class Ended:
    """The delivery is over without an attempt: the caller dead-letters it."""

    reason: EndReason
    tried: Tried
    status: int | None  # the last attempt's HTTP status
    error: str  # the last attempt's error
    stored: StoredEvent
    held_s: float = 0.0  # time spent waiting on the sink's in-flight cap (not counted)


@dataclass(frozen=True, slots=True)
class Unusable:
    """Nothing to deliver: the stored event is gone, or not one."""

    what: Literal["missing", "unreadable"]


Claim = Go | Defer | Ended | Unusable


@dataclass(frozen=True, slots=True)
class Peek:
    """A delivery's stored event and attempts so far, read without claiming it."""

    stored: StoredEvent
    tried: Tried


@dataclass(frozen=True, slots=True)
class Finish:
    """How an attempt (or a run without one) ends, for :meth:`Steps.finish`."""

    outcome: FinishOutcome
    due_ms: int = 0  # retry: when the next attempt is due
    status: int | None = None
    error: str = ""
    effect: BreakerEffect = "none"
    gone_url: str = ""  # dead: mark this URL gone (it answered 410)
    entry: DeadLetter | None = None  # dead: the dead letter to store
    hold: bool = False  # dead, ordered: the dead letter holds its chat


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "" if value is None else str(value)


def _seconds(value: object) -> float | None:
    text = _text(value)
    return int(float(text)) / 1000 if text else None


def _parse_stored(raw: object) -> StoredEvent | None:
    try:
        return stored_event.parse(cast(bytes, raw))
    except (ValueError, TypeError):
        return None


def parse_claim(res: list[Any]) -> Claim:
    """The claim script's reply as a record (an unparseable stored event is unusable)."""
    verdict = _text(res[0])
    if verdict == "defer":
        return Defer(cast(DeferReason, _text(res[1])), int(res[2]))
    if verdict == "go":
        stored = _parse_stored(res[4])
        if stored is None:
            return Unusable("unreadable")
        return Go(int(res[1]), int(res[2]), int(res[3]), stored, _text(res[5]) or stored.source)
    if verdict in ("gone", "expired", "exhausted"):
        stored = _parse_stored(res[6])
        if stored is None:
            return Unusable("unreadable")
        status = _text(res[4])
        return Ended(
            reason=cast(EndReason, verdict),
            tried=Tried(int(res[1]), _seconds(res[2]), _seconds(res[3])),
            status=int(status) if status else None,
            error=_text(res[5]),
            stored=stored,
            held_s=int(_text(res[7]) or 0) / 1000 if len(res) > 7 else 0.0,
        )
    return Unusable("unreadable" if verdict == "unreadable" else "missing")


@dataclass(frozen=True, slots=True)
class ClaimLimits:
    """What a claim checks against, from the sink's settings and the worker's."""

    max_age_ms: int
    max_attempts: int
    concurrency: int
    lease_ms: int
    url: str
    busy_ms: int
    open_jitter_ms: int
    half_open_ms: int


class Steps:
    """The four scripts, registered once on the worker's client."""

    def __init__(self, client: Redis, keys: Keys, worker: WorkerConfig) -> None:
        self._client = client
        self._claim = scripts.script("claim").bind(client)
        self._finish = scripts.script("finish").bind(client)
        self._release = scripts.script("release").bind(client)
        self._reschedule = scripts.script("reschedule").bind(client)
        self.set_config(keys, worker)

    def set_config(self, keys: Keys, worker: WorkerConfig) -> None:
        self._keys = keys
        self._worker = worker

    def _delivery_keys(self, ref: Ref) -> dict[str, str]:
        k = self._keys
        return {
            "ev": k.event(ref.tenant, ref.event_id),
            "attempts": k.attempts(ref.tenant, ref.sink, ref.event_id),
            "breaker": k.breaker(ref.tenant, ref.sink),
            "inflight": k.inflight(ref.tenant, ref.sink),
            "gone": k.sink_gone(ref.tenant, ref.sink),
            "job": k.job(ref.job_id),
            "queue": k.queue,
        }

    async def claim(self, ref: Ref, now_ms: int, limits: ClaimLimits) -> Claim:
        res = await self._claim(
            keys=self._delivery_keys(ref),
            args={
                "now": now_ms,
                "job_id": ref.job_id,
                "max_age_ms": limits.max_age_ms,
                "max_attempts": limits.max_attempts,
                "cap": limits.concurrency,
                "lease_ms": limits.lease_ms,
                "margin_ms": MARGIN_MS,
                "url": limits.url,
                "busy_ms": limits.busy_ms,
                "open_jitter_ms": limits.open_jitter_ms,
                "half_open_ms": limits.half_open_ms,
            },
        )
        return parse_claim(res)

    async def finish(self, ref: Ref, now_ms: int, f: Finish) -> str | None:
        """Record ``f``; for an ordered delivery, the job id of its chat's next event,
        which is due now (None if there is none)."""
        k = self._keys
        w = self._worker
        entry = f.entry
        # A dead letter's keys are the tenant's; without one they are never touched.
        tenant, sink, event_id = (
            (entry.tenant, entry.sink, entry.event_id) if entry else ("", "", "")
        )
        keys = self._delivery_keys(ref)
        keys.update(
            retry=k.job_retry(ref.job_id),
            entry=k.dead_letter(tenant, sink, event_id),
            index=k.dead_letters(tenant),
            counts=k.dead_letter_counts(tenant),
            chat=k.chat_order(ref.tenant, ref.sink, ref.chat) if ref.chat else "",
            held=k.held_chats(ref.tenant, ref.sink),
        )
        nxt = await self._finish(
            keys=keys,
            args={
                "now": now_ms,
                "job_id": ref.job_id,
                "outcome": f.outcome,
                "due_ms": f.due_ms,
                "status": "" if f.status is None else f.status,
                "error": f.error,
                "effect": f.effect,
                "threshold": w.breaker_failures,
                "cooldown_ms": int(w.breaker_cooldown * 1000),
                "breaker_ttl_ms": max(breaker.TTL_MS, int(w.breaker_cooldown * 2000)),
                "gone_url": f.gone_url,
                "class": entry.cls if entry else "",
                "member": deadletters.member(sink, event_id),
                "event_id": ref.event_id,
                "chat": ref.chat or "",
                "on_dead": "hold" if f.hold else "skip",
            },
            rest=deadletters.entry_fields(entry) if entry is not None else (),
        )
        text = nxt.decode() if isinstance(nxt, bytes) else str(nxt or "")
        return text or None

    async def release(self, ref: Ref) -> None:
        """Give back the in-flight slot (and the breaker's probe turn) of a cancelled run."""
        await self._release(
            keys={
                "inflight": self._keys.inflight(ref.tenant, ref.sink),
                "breaker": self._keys.breaker(ref.tenant, ref.sink),
            },
            args={"job_id": ref.job_id},
        )

    async def peek(self, ref: Ref) -> Peek | None:
        """The delivery's stored event and attempt record; None if nothing is readable."""
        k = self._keys
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.get(k.event(ref.tenant, ref.event_id))
            pipe.hmget(k.attempts(ref.tenant, ref.sink, ref.event_id), ["a", "first", "last"])
            raw, att = await pipe.execute(raise_on_error=False)
        stored = None if isinstance(raw, Exception | None) else _parse_stored(raw)
        if stored is None or isinstance(att, Exception):
            return None
        return Peek(stored, Tried(int(att[0] or 0), _seconds(att[1]), _seconds(att[2])))

    async def reschedule(self, ref: Ref, due_ms: int) -> bool:
        """Move the job's queue entry to ``due_ms``; False if the job is finished."""
        found = await self._reschedule(
            keys={"job": self._keys.job(ref.job_id), "queue": self._keys.queue},
            args={"due_ms": due_ms, "job_id": ref.job_id},
        )
        return bool(found)
