"""A delivery's steps in Redis: take (start and claim), finish, release and reschedule.

The scripts are ``lua/take.lua`` (a poll's jobs started and claimed in one call),
``finish_batch.lua`` (the finishes of concurrent deliveries, group-committed through a
:class:`~relay.store.script_pipe.ScriptPipeline`: one call per batch, fsynced together;
each finish goes in as a :class:`~relay.store.wire.FinishItem`, which the wire module
encodes),
``release.lua``, ``unreserve.lua`` and ``reschedule.lua`` (their headers say what each
does); the rules of
a claim and a finish are ``lib/claim.lua`` and ``lib/finish.lua``. A take gives each
run a fencing token (kept in arq's in-progress mark); the finish, release, reschedule
and the heartbeat's renewal apply only while the mark still holds it, so a run whose
worker was paused past its hold can change nothing another run now owns. Times are
Redis' clock (:mod:`relay.store.clock`). This module calls
them with named keys and arguments and reads their replies into small typed records, so
the deliverer (:mod:`relay.delivery.deliverer`) branches on a :data:`Claim` rather than
on positions in a list.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, cast

import redis.exceptions
from redis.asyncio import Redis

from relay.config import EventLogConfig, WorkerConfig
from relay.delivery import breaker
from relay.delivery.heartbeat import HOLD_S
from relay.keys import Keys
from relay.store import deadletters, jobs, scripts, stored_event
from relay.store.clock import CLOCK
from relay.store.deadletters import DeadLetter, Tried
from relay.store.script_pipe import ScriptPipeline
from relay.store.stored_event import StoredEvent
from relay.store.wire import FinishBatch, FinishItem, Packed

log = logging.getLogger(__name__)

MEMORY_SHORT = 0.9  # of Redis' maxmemory: past it the event log gives way (check_memory)
MARGIN_MS = int(jobs.EXPIRY_MARGIN_S * 1000)  # a delivery's job and event outlive its deadline
LEASE_MS = int(HOLD_S * 1000)  # an in-flight slot's lease (reserved, or renewed while in use)
FINISH_TIMEOUT_S = 10.0  # a finish batch not answered by then fails (the job runs again)
# The most deliveries one take sets aside (~30-45 µs of Redis each): a large backlog is
# set aside in calls of a millisecond or two, and new work's takes run between them.
ASIDE_PER_TAKE = 48

DeferReason = Literal["not_due", "unknown_sink"]
# rate: put back in the queue, due at its turn of the sink's pace (not set aside)
WaitReason = Literal["paused", "busy", "breaker_open", "half_open", "rate"]
EndReason = Literal["gone", "expired", "exhausted"]
FinishOutcome = Literal["ok", "retry", "dead", "drop"]
BreakerEffect = Literal["success", "failure", "none"]


class Ref(NamedTuple):
    """Which delivery: one (event, sink), and the arq job that carries it."""

    tenant: str
    sink: str
    event_id: str
    job_id: str
    chat: str | None = None  # an ordered delivery's chat
    token: str = ""  # the run's fencing token (take.lua): only its holder may finish


@dataclass(frozen=True, slots=True)
class Go:
    """The claim counted an attempt and leased an in-flight slot: POST now."""

    attempt: int
    first_ms: int
    deadline_ms: int
    stored: StoredEvent
    source: str  # the source the sink is told: "replay" for a replayed delivery
    probe: bool = False  # the attempt is the sink's half-open breaker probe


@dataclass(frozen=True, slots=True)
class Defer:
    """The claim put the job back in the queue for later, without an HTTP call."""

    reason: DeferReason
    wait_ms: int


@dataclass(frozen=True, slots=True)
class Parked:
    """The claim set the job aside in its sink's waiting set (``lib/wait.lua``): it comes
    back, with a slot reserved, when the sink has one free (or its breaker lets it by).
    Or, with ``wait_ms``, a paced sink's delivery was put back in the queue, due at its
    own turn that far ahead (``lib/rate.lua``)."""

    reason: WaitReason
    wait_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Ended:
    """The delivery is over without an attempt: the caller dead-letters it."""

    reason: EndReason
    tried: Tried
    status: int | None  # the last attempt's HTTP status
    error: str  # the last attempt's error
    stored: StoredEvent
    held_s: float = 0.0  # time spent waiting on the in-flight cap or a pause (not counted)


@dataclass(frozen=True, slots=True)
class Unusable:
    """Nothing to deliver: the stored event is gone, or not one."""

    what: Literal["missing", "unreadable"]


Claim = Go | Defer | Parked | Ended | Unusable


@dataclass(frozen=True, slots=True)
class Peek:
    """A delivery's stored event and attempts so far, read without claiming it."""

    stored: StoredEvent
    tried: Tried


@dataclass(frozen=True, slots=True)
class Finish:
    """How an attempt (or a run without one) ends, for :meth:`Steps.finish`."""

    outcome: FinishOutcome
    delay_ms: int = 0  # retry: the next attempt is due this long from now (Redis' clock)
    status: int | None = None
    error: str = ""
    effect: BreakerEffect = "none"
    gone_url: str = ""  # dead: mark this URL gone (it answered 410)
    entry: DeadLetter | None = None  # dead: the dead letter to store
    hold: bool = False  # dead, ordered: the dead letter holds its chat
    attempt: str = ""  # the attempt, for the event log (Answer.log_record); "" if none


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
    if verdict == "park":
        return Parked(cast(WaitReason, _text(res[1])), int(res[2]) if len(res) > 2 else None)
    if verdict == "go":
        stored = _parse_stored(res[4])
        if stored is None:
            return Unusable("unreadable")
        probe = len(res) > 6 and _text(res[6]) == "1"
        return Go(
            int(res[1]), int(res[2]), int(res[3]), stored, _text(res[5]) or stored.source, probe
        )
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


class Taken(NamedTuple):
    """A job this worker started: its delivery, and what the claim (or a peek) found."""

    ref: Ref
    claim: Claim | Peek | None  # None: a peek found nothing readable to dead-letter


class Finished(NamedTuple):
    """How a finish went: applied, or refused as stale (the run no longer held the
    delivery: nothing changed); the jobs it queued, due now: an ordered delivery's chat's
    next one, and the sink's waiting deliveries it gave the freed slots to."""

    applied: bool
    started: tuple[str, ...] = ()
    chained: Taken | None = None  # the job taken for this worker in the same call
    # a job claimed ahead, without a slot, for the run of the job id given with it
    reserve: tuple[str, Taken] | None = None


STALE = Finished(False)


class Steps:
    """The scripts, registered once on the worker's client; finishes group-committed."""

    def __init__(self, client: Redis, keys: Keys, worker: WorkerConfig) -> None:
        self._client = client
        self._take = scripts.script("take").bind(client)
        self._release = scripts.script("release").bind(client)
        self._unreserve = scripts.script("unreserve").bind(client)
        self._reschedule = scripts.script("reschedule").bind(client)
        self._sweep = scripts.script("sweep").bind(client)
        self._rate_hold = scripts.script("rate_hold").bind(client)
        self._finishes: ScriptPipeline[FinishItem] = ScriptPipeline(
            client,
            scripts.script("finish_batch").source,
            self._encode_finishes,
            timeout=FINISH_TIMEOUT_S,
            what="delivery finish",
        )
        # One finish, batched with the others: what :meth:`finish` sends each item
        # through. Public as a seam: a fault test wraps it to lose a reply.
        self.commit_finish: Callable[[FinishItem], Awaitable[Any]] = self._finishes.call
        self._tag = os.urandom(6).hex()  # this worker's part of every fencing token
        self.memory_short = False  # check_memory()
        self._takes = itertools.count(1)
        self.set_config(keys, worker)

    def set_config(self, keys: Keys, worker: WorkerConfig) -> None:
        self._keys = keys
        self._worker = worker
        rule = [
            worker.breaker_failures,
            worker.breaker_failure_rate,
            int(worker.breaker_window * 1000),
        ]
        self._batch = FinishBatch(
            prefix=keys.prefix,
            queue=keys.queue,
            breaker_rule=json.dumps(rule),
            cooldown_ms=int(worker.breaker_cooldown * 1000),
            breaker_ttl_ms=max(
                breaker.TTL_MS, int(max(worker.breaker_cooldown, worker.breaker_window) * 2000)
            ),
            lease_ms=LEASE_MS,
            tag_prefix=f"{self._tag}.f",
            in_progress_ms=LEASE_MS,
            margin_ms=MARGIN_MS,
        )

    def _encode_finishes(self, items: list[FinishItem]) -> Packed:
        # the encoder of the configuration now in force
        return self._batch(items, keep=not self.memory_short)

    async def check_memory(self) -> bool:
        """Whether Redis is short of memory — past MEMORY_SHORT of its ``maxmemory``:
        then the event log keeps no copies and the sweep trims it (:meth:`sweep`), so
        that it never holds Redis full. Read from ``INFO memory``; unknown is not short."""
        try:
            info = await self._client.info("memory")
            used, limit = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
        except (redis.exceptions.RedisError, OSError, ValueError):
            return self.memory_short
        short = limit > 0 and used > MEMORY_SHORT * limit
        if short != self.memory_short:
            log.warning(
                "Redis uses %d of its %d bytes: the event log %s",
                used,
                limit,
                "keeps no new copies and gives its oldest records up"
                if short
                else "keeps copies again",
            )
        self.memory_short = short
        return short

    async def drain(self) -> None:
        """Wait for the finishes already asked for (the worker stops)."""
        await self._finishes.drain()

    async def take(
        self, job_ids: Sequence[str], sinks: str, free: int, in_progress_ms: int
    ) -> tuple[list[Taken], list[str], bool]:
        """Start and claim the due jobs among ``job_ids`` (at most ``free`` of them that
        are not put off), with ``sinks`` the claim limits of every sink this worker knows
        (:class:`~relay.delivery.limits.SinkTable`); the jobs started, the ids of those
        whose job key had expired, and whether the take passed over some of ``job_ids``
        once it had set :data:`ASIDE_PER_TAKE` aside (jobs of the sinks it set some aside
        for: they are still in the queue, due, untouched)."""
        sent = time.time()
        found, expired, redis_ms, stopped = await self._take(
            keys={"queue": self._keys.queue},
            args={
                "prefix": self._keys.prefix,
                "tag": f"{self._tag}.{next(self._takes)}",
                "in_progress_ms": in_progress_ms,
                "max": free,
                "margin_ms": MARGIN_MS,
                "seed": random.getrandbits(31),
                "sinks": sinks,
                "unknown_grace_ms": int(self._worker.unknown_sink_grace * 1000),
                # one JSON argument (C-speed to build, cjson to read), not one per job
                "jobs": json.dumps(job_ids, separators=(",", ":")),
                "max_aside": ASIDE_PER_TAKE,
            },
        )
        CLOCK.observe(int(redis_ms), sent, time.time())
        taken = [self._taken(found[i : i + 4]) for i in range(0, len(found), 4)]
        return taken, [_text(e) for e in expired], bool(stopped)

    def _taken(self, found: list[Any]) -> Taken:
        """One job a script took for this worker: ``[job_id, chat, token, reply]``."""
        job_id, chat, token, reply = _text(found[0]), _text(found[1]), _text(found[2]), found[3]
        tenant, sink, event_id = self._keys.parse_job_id(job_id)
        ref = Ref(tenant, sink, event_id, job_id, chat or None, token)
        if _text(reply[0]) == "peek":
            return Taken(ref, _parse_peek(reply))
        return Taken(ref, parse_claim(reply))

    async def finish(
        self,
        ref: Ref,
        f: Finish,
        cap: int = 0,
        chain: str = "",
        handoff: Ref | None = None,
        reserve: bool = False,
    ) -> Finished:
        """Record ``f`` (batched with the finishes of concurrent deliveries) if this run
        still holds the delivery; :data:`STALE` if it does not (nothing was changed). The
        slot it frees goes to ``handoff`` (a reserve the worker started on it when the
        attempt succeeded), or else to the sink's first waiting delivery (up to ``cap``,
        the sink's concurrency, in flight); with ``chain`` (the sink's claim limits),
        that job — or an ordered chat's next — is taken for this worker in the same call
        (:attr:`Finished.chained`), and with ``reserve`` the sink's next waiting delivery
        is claimed ahead for whichever of the two now holds the slot
        (:attr:`Finished.reserve`). What it did to the sink's breaker, if anything, is
        logged."""
        item = FinishItem(
            job_id=ref.job_id,
            tenant=ref.tenant,
            sink=ref.sink,
            event_id=ref.event_id,
            chat=ref.chat or "",
            token=ref.token,
            outcome=f.outcome,
            delay_ms=f.delay_ms,
            status=f.status,
            error=f.error,
            effect=f.effect,
            gone_url=f.gone_url,
            dead_class=f.entry.cls if f.entry is not None else "",
            hold=f.hold,
            fields=deadletters.entry_fields(f.entry) if f.entry is not None else (),
            cap=cap,
            chain=chain,
            attempt=f.attempt,
            handoff=handoff.job_id if handoff is not None else "",
            handoff_token=handoff.token if handoff is not None else "",
            reserve=reserve and bool(chain),
        )
        found = await self.commit_finish(item)
        if isinstance(found, int):
            return STALE
        nxt, change, waited, chained, ahead = found
        if change:
            breaker.log_change(ref.tenant, ref.sink, _text(change), f.error, self._worker)
        started = tuple(_text(j) for j in waited)
        started = (_text(nxt), *started) if nxt else started
        taken = self._taken(chained) if chained else None
        held = (_text(ahead[0]), self._taken(ahead[1])) if ahead else None
        return Finished(True, started, taken, held)

    async def sweep(
        self, caps: str, release: Sequence[str], limits: EventLogConfig
    ) -> tuple[list[str], list[str]]:
        """Give the free slots of every sink with waiting deliveries (``caps``: JSON, each
        known sink's concurrency) to them, and let those of the sinks in ``release`` (no
        longer configured) all go back in the queue (``sweep.lua``); the job ids queued,
        and the waiting sinks ("tenant:sink") this worker does not know. The event log's
        records past ``limits.retention`` or over ``limits.max_memory`` go, oldest first
        (all of them, oldest first, while Redis is short of memory: :meth:`check_memory`)."""
        await self.check_memory()
        started, unknown = await self._sweep(
            keys={"waiting_sinks": self._keys.waiting_sinks, "queue": self._keys.queue},
            args={
                "prefix": self._keys.prefix,
                "lease_ms": LEASE_MS,
                "sinks": caps,
                "release": json.dumps(list(release)),
                "wake": self._keys.wake,
                "log_cap": 0 if self.memory_short else limits.max_memory,
                "log_keep_ms": int(limits.retention * 1000),
            },
        )
        return [_text(j) for j in started], [_text(m) for m in unknown]

    async def hold_pace(self, tenant: str, sink: str, wait_ms: int, interval_ms: float) -> bool:
        """Start none of the paced sink's deliveries for ``wait_ms`` (its Retry-After),
        then resume its pace (``rate_hold.lua``); False if a hold as long was there."""
        moved = await self._rate_hold(
            keys={"rate": self._keys.rate(tenant, sink)},
            args={"wait_ms": wait_ms, "interval_ms": interval_ms},
        )
        return int(moved) == 1

    async def release(self, ref: Ref) -> bool:
        """Give back the in-flight slot (and the breaker's probe turn) and the job's
        in-progress mark of a cancelled run: another worker may take it at once. False if
        this run no longer held the delivery (nothing was changed)."""
        done = await self._release(
            keys={
                "inflight": self._keys.inflight(ref.tenant, ref.sink),
                "breaker": self._keys.breaker(ref.tenant, ref.sink),
                "in_progress": self._keys.job_in_progress(ref.job_id),
            },
            args={"job_id": ref.job_id, "token": ref.token},
        )
        return bool(done)

    async def unreserve(self, ref: Ref) -> bool:
        """Give back a reserve this worker did not start (``unreserve.lua``): its
        in-progress mark goes, and it is due in the queue. False if it no longer held
        the delivery."""
        done = await self._unreserve(
            keys={"in_progress": self._keys.job_in_progress(ref.job_id)},
            args={"token": ref.token},
        )
        return bool(done)

    async def reschedule(self, ref: Ref, delay_ms: int) -> bool:
        """Move the job's queue entry to ``delay_ms`` from now and let go of its
        in-progress mark; False if the job is finished, or this run no longer holds it
        (then another run does, and nothing was changed)."""
        found = await self._reschedule(
            keys={
                "job": self._keys.job(ref.job_id),
                "queue": self._keys.queue,
                "in_progress": self._keys.job_in_progress(ref.job_id),
            },
            args={"delay_ms": delay_ms, "job_id": ref.job_id, "token": ref.token},
        )
        return int(found) == 1


def _parse_peek(reply: list[Any]) -> Peek | None:
    stored = _parse_stored(reply[1]) if reply[1] else None
    if stored is None:
        return None
    return Peek(stored, Tried(int(reply[2] or 0), _seconds(reply[3]), _seconds(reply[4])))
