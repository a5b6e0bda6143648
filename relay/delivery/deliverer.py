"""Delivery: the worker's job — one event to one sink, one HTTP attempt per run.

The delivery loop (:mod:`relay.delivery.loop`) hands each read's due jobs to
:meth:`Deliverer.take`, which starts and claims them all in one call; each then runs as
:meth:`Deliverer.run`. The relay, not arq, keeps the delivery's record: an ``att`` hash
per (event, sink) with the attempts made, the deadline (ingest time + ``max_age``, or
the replay time), when the next attempt is due and the last status and error.

One run is three steps (:mod:`relay.delivery.steps`):

1. **Claim**: URL marked gone, deadline passed or attempts used up — a dead letter. Not
   due yet — the job goes back in the queue for then. Breaker open (or someone else's
   probe in flight) or the sink at its ``concurrency`` cap — the job waits, set aside in
   the sink's waiting set, until a slot frees (``lib/wait.lua``): a slow sink never
   holds the worker's slots, and its backlog never crowds other sinks' jobs out.
   Otherwise the attempt is counted, an in-flight slot leased, and the stored payload
   comes back.
2. **Send** the stored envelope: an HTTP POST or a broker publish
   (:mod:`relay.delivery.outlet`).
3. **Finish**: 2xx (or a broker's ack) — done; the stored event is deleted once no job
   or dead letter needs it. Connection error, timeout, 408, 425, 429, 5xx (or a broker's
   nack) — the next attempt is scheduled (:mod:`relay.delivery.retry`) in the step that
   records the failure; out of attempts or time, a dead letter ``exhausted``. 410 —
   ``gone``, and the URL is marked gone. Any other 4xx, a 3xx or a broker's refusal —
   ``rejected``.

A sink whose secret is not a usable key is dead-lettered ``rejected`` before the claim
(no attempt, slot or probe used). Finishes are group-committed (one call, one fsync)
and carry the attempt to the event log. A fault of our own (Redis away, a bug) re-runs
the job a few seconds later; a finish whose reply was lost leaves no job key, and the
run ends. An attempt's timeout is the sink's, inside the run's budget (+ JOB_MARGIN_S).
A run that holds the sink's next delivery claimed ahead (:mod:`relay.delivery.reserves`)
starts it on its own slot the moment its attempt succeeds.

The module is a little over 500 lines and stays whole: it is one role, a delivery's
run from its claim to its finish, whose outcomes share the finish and its records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import aiohttp
import redis.exceptions
from redis.asyncio import Redis

from relay import logs
from relay.config import Config, SinkConfig
from relay.delivery import breaker, heartbeat, pace
from relay.delivery.activity import SinkActivity
from relay.delivery.endings import dead_letter_of, log_stale_finish, why_ended
from relay.delivery.heartbeat import Running
from relay.delivery.limits import SinkTable
from relay.delivery.loop import JOB_MARGIN_S, job_timeout
from relay.delivery.metric_children import MetricChildren
from relay.delivery.outlet import Outlet
from relay.delivery.reserves import Reserves
from relay.delivery.retry import next_attempt, status_class
from relay.delivery.sink_client import Answer, Request, clip
from relay.delivery.steps import (
    BreakerEffect,
    Defer,
    Ended,
    Finish,
    Go,
    Parked,
    Peek,
    Ref,
    Steps,
    Taken,
    Unusable,
)
from relay.keys import Keys
from relay.metrics import Metrics
from relay.store.clock import CLOCK
from relay.store.deadletters import DeadLetter, Tried

log = logging.getLogger(__name__)

FAULT_RETRY_S = 5.0  # a run that failed on our side tries again after 1-2x this
FAULT_CHECK_S = 0.5  # bound on rescheduling after a fault (inside arq's job timeout)
RunOutcome = Literal["done", "retried"]  # the job ended, or runs again later
UNUSABLE_KEY_ERROR = "the sink's secret is not valid base64 ('whsec_' + base64); not tried"


@dataclass(frozen=True, slots=True)
class _Attempt:
    """One claimed attempt: which delivery, to which sink, with what the claim gave."""

    ref: Ref
    sink: SinkConfig
    go: Go
    http_timeout: float

    def tried(self, now_ms: int) -> Tried:
        """This attempt, the last so far, ended at ``now_ms``."""
        return Tried(self.go.attempt, self.go.first_ms / 1000, now_ms / 1000)


class Deliverer:
    """Runs delivery jobs; shared by every job of one worker process."""

    def __init__(
        self,
        redis_client: Redis,
        config: Config,
        metrics: Metrics,
        session: aiohttp.ClientSession,
        *,
        job_timeout: float,
    ) -> None:
        self._metrics = metrics
        self._client = Outlet(session)
        self.job_timeout = job_timeout
        self.draining = False  # set when the worker stops: jobs arq starts now go back
        self.next_ready: Callable[[str], None] | None = None  # the worker starts a job now
        self.adopt: Callable[[Taken], None] | None = None  # the worker runs a chained job
        self.running: dict[str, Running] = {}  # renewed by the worker's heartbeat
        # while the worker's start-up census runs: the jobs started, its own, not inherited
        self.started_in_census: set[str] | None = None
        self.activity = SinkActivity(config.worker.sink_silence_warn)  # summaries, silences
        self._config = config
        self._keys = Keys(config.redis.key_prefix)
        self.steps = Steps(redis_client, self._keys, config.worker)  # its scripts in Redis
        # the next delivery of a slot, claimed ahead
        self.reserves = Reserves(self.steps, self.running, self._held, self._requeued)
        self.set_config(config)

    def set_config(self, config: Config) -> None:
        self._config = config
        self.activity.silence_warn = config.worker.sink_silence_warn
        self._sinks = SinkTable(config, self._usable)
        self._children = MetricChildren()
        self._client.set_config(config)
        self._keys = Keys(config.redis.key_prefix)
        self.steps.set_config(self._keys, config.worker)
        if job_timeout(config) > self.job_timeout:
            log.warning(
                "a sink timeout grew past what this worker was started with; deliveries "
                "use at most %.0fs until the worker restarts",
                self.job_timeout - JOB_MARGIN_S,
            )

    def _usable(self, sink: SinkConfig) -> bool:
        """Whether ``sink`` can be tried: no secret, or one that decodes to a key."""
        return sink.secret is None or self._client.signing_key(sink) is not None

    async def drain(self) -> None:
        """Wait for the finishes already asked for, then close the broker sinks'
        connections (the worker stops)."""
        await self.steps.drain()
        await self.reserves.drain()  # reserves those finishes left, given back
        await self._client.close()

    async def take(self, job_ids: list[str], free: int) -> tuple[list[Taken], list[str], int, bool]:
        """Start and claim the due jobs of one read of the queue (``take.lua``): the jobs
        this worker now runs (:meth:`run` each), the ids of jobs whose key had expired,
        how many jobs the take handled (started, put off or set aside), and whether it
        passed over some, having set aside as many as one take does. A job put off
        (not due) is back in the queue; one whose sink is busy or whose breaker is open
        waits, set aside."""
        if self.draining:
            return [], [], 0, False  # they stay in the queue, for the next worker
        taken, expired, stopped = await self.steps.take(
            job_ids, self._sinks.claim_limits, free, int(heartbeat.HOLD_S * 1000)
        )
        return self._accept(taken), expired, len(taken), stopped

    def _accept(self, taken: list[Taken]) -> list[Taken]:
        """Of the jobs a script took for this worker, those it runs now (each then
        :meth:`run`); those put off or set aside are counted and left."""
        started: list[Taken] = []
        for job in taken:
            if isinstance(job.claim, Defer):
                ref, (reason, wait_ms) = job.ref, (job.claim.reason, job.claim.wait_ms)
                self._metrics.delivery_deferrals.labels(ref.tenant, ref.sink, reason).inc()
                log.debug("delivery put off %.2fs (%s): %s", wait_ms / 1000, reason, ref.job_id)
                continue
            if isinstance(job.claim, Parked):
                ref, why = job.ref, job.claim.reason
                self._metrics.delivery_waits.labels(ref.tenant, ref.sink, why).inc()
                log.debug("delivery waits for its sink (%s): %s", why, ref.job_id)
                continue
            started.append(job)
            self.running[job.ref.job_id] = self._running(job)
            if self.started_in_census is not None:
                self.started_in_census.add(job.ref.job_id)
        return started

    def _running(self, job: Taken) -> Running:
        """What the heartbeat holds for a started job: its in-progress mark, and its
        sink's in-flight slot while an attempt is leased."""
        ref = job.ref
        if isinstance(job.claim, Go):
            k = self._keys
            return Running(
                ref.job_id,
                ref.token,
                k.inflight(ref.tenant, ref.sink),
                k.breaker(ref.tenant, ref.sink),
            )
        return Running(ref.job_id, ref.token)

    async def run(self, job: Taken) -> RunOutcome:
        """Carry a started job to its end: an attempt and its finish, or a dead letter
        (or, past a fault of the relay's own, a reschedule)."""
        ref = job.ref
        with logs.bind(tenant=ref.tenant, sink=ref.sink, event_id=ref.event_id):
            try:
                async with asyncio.timeout(self.job_timeout - 1.0):
                    return await self._run(job)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                wait = FAULT_RETRY_S * (1 + random.random())
                redis_fault = isinstance(e, redis.exceptions.RedisError | OSError | TimeoutError)
                if not await self._after_fault(ref, wait):
                    log.warning(
                        "delivery run ended with %s: %s, after its outcome was recorded; "
                        "nothing to run again",
                        type(e).__name__,
                        e,
                    )
                    return "done"
                log.error(
                    "delivery could not run (%s: %s); trying again in %.1fs",
                    type(e).__name__,
                    e,
                    wait,
                    exc_info=not redis_fault,
                )
                return "retried"
            finally:
                self.running.pop(ref.job_id, None)
                if self.reserves.owed(ref):  # cancelled or failed: it goes back
                    self.reserves.drop_later(ref)

    async def _after_fault(self, ref: Ref, wait: float) -> bool:
        """Reschedule a job whose run failed on our side; False if it is already finished.
        If Redis cannot be asked, its in-progress mark (no longer renewed) holds it back
        until it expires."""
        try:
            async with asyncio.timeout(FAULT_CHECK_S):
                return await self.steps.reschedule(ref, int(wait * 1000))
        except (redis.exceptions.RedisError, OSError, TimeoutError) as e:
            log.warning("could not reschedule job %s after the fault (%s)", ref.job_id, e)
            return True

    async def _run(self, job: Taken) -> RunOutcome:
        ref, claim = job.ref, job.claim
        sink = self._sinks.get(ref.tenant, ref.sink)
        if sink is None:
            if isinstance(claim, Peek) or claim is None:
                # take.lua found the sink unknown for longer than unknown_sink_grace
                await self._dead_letter_unclaimed(
                    ref,
                    claim,
                    "gone",
                    "the sink is not configured (on this worker, for longer than "
                    f"worker.unknown_sink_grace, {self._config.worker.unknown_sink_grace:g}s)",
                )
                return "done"
            # Reloaded away since the take: give the run back; the next take puts the
            # delivery off for the grace, in case the sink is only being moved.
            await self.steps.release(ref)
            return "retried"
        if isinstance(claim, Peek) or claim is None:  # its secret is not a usable key
            self._metrics.deliveries.labels(ref.tenant, ref.sink, "rejected", "none").inc()
            await self._dead_letter_unclaimed(ref, claim, "rejected", UNUSABLE_KEY_ERROR)
            return "done"
        http_timeout = min(sink.timeout, self.job_timeout - JOB_MARGIN_S)
        match claim:
            case Unusable(what):
                gone = "gone" if what == "missing" else what
                log.error("the stored event is %s; nothing to deliver (job %s)", gone, ref.job_id)
                self._metrics.deliveries.labels(ref.tenant, ref.sink, "missing", "none").inc()
                await self._finish(ref, Finish("drop"))
                return "done"
            case Ended():
                await self._ended(ref, sink, claim)
                return "done"
            case Go():
                with logs.bind(attempt=claim.attempt):
                    return await self._attempt(_Attempt(ref, sink, claim, http_timeout))
        raise AssertionError(f"a claim of another kind: {claim!r}")  # Defer never runs

    async def _ended(self, ref: Ref, sink: SinkConfig, end: Ended) -> None:
        """The claim found the delivery over: dead-letter it without an attempt."""
        if end.reason == "gone":
            cls, error = "gone", "the sink's URL answered 410 Gone earlier; not tried"
        else:
            cls, error = "exhausted", why_ended(end, sink)
        # the last error was recorded scrubbed (the sink client scrubs every answer)
        entry = dead_letter_of(ref, end.stored.type, cls, end.tried, end.status, clip(error))
        await self._dead_letter(ref, entry, effect="none")

    async def _attempt(self, a: _Attempt) -> RunOutcome:
        ref, sink, go = a.ref, a.sink, a.go
        stored = go.stored
        m = self._metrics
        log.debug("delivery started: attempt %d of %d", go.attempt, sink.max_attempts)
        if go.probe:
            breaker.log_probe(ref.tenant, ref.sink, go.attempt)
        req = Request(ref.tenant, ref.event_id, stored.type, go.attempt, go.source, stored.trace)
        try:
            answer = await self._client.send(sink, req, stored.body, a.http_timeout, ref.chat)
        except asyncio.CancelledError:
            # Shutting down past the grace period: give the slot back; arq runs it again.
            with contextlib.suppress(Exception):  # best effort: the lease also expires
                async with asyncio.timeout(FAULT_CHECK_S):
                    await asyncio.shield(self.steps.release(ref))
            log.info("delivery cancelled during attempt %d; it will run again", go.attempt)
            raise
        now = _now_ms()
        handoff = await self.reserves.take(ref)
        if handoff is not None:
            if answer.ok and self.adopt is not None and not self.draining:
                self.adopt(handoff)  # the next delivery goes on this slot now, not after the finish
            else:
                await self.reserves.give_back(handoff)  # this attempt failed, or the worker stops
                handoff = None
        self.activity.attempt_ended(ref.tenant, ref.sink, answer)
        took = self._children.of(m.delivery_attempt_seconds, ref.tenant, sink.name)
        took.observe(answer.seconds, answer.exemplar)
        if answer.ok:
            await self._delivered(a, answer, now, handoff)
            return "done"
        if answer.retryable:
            return await self._failed(a, answer, now)
        # 410: the URL is gone. Any other 4xx or 3xx: the sink is alive, and said no.
        gone = answer.status == 410
        cls = "gone" if gone else "rejected"
        self._count(ref, cls, answer)
        entry = dead_letter_of(ref, stored.type, cls, a.tried(now), answer.status, answer.error)
        await self._dead_letter(
            ref,
            entry,
            effect="none" if gone else "success",
            gone_url=sink.url if gone else "",
            tried=(answer, go.source),
        )
        return "done"

    async def _delivered(
        self, a: _Attempt, answer: Answer, now: int, handoff: Taken | None
    ) -> None:
        ref, stored, m = a.ref, a.go.stored, self._metrics
        ok = Finish("ok", effect="success")
        applied = await self._finish(ref, ok, (answer, a.go.source), handoff)
        self._count(ref, "delivered", answer)  # the sink has it, whichever run records it
        if not applied:
            return
        done = time.time()
        of = self._children.of
        of(m.delivery_relay_seconds, ref.tenant, ref.sink).observe(
            max(0.0, done - stored.at_ms / 1000), answer.exemplar
        )
        if stored.timestamp is not None:
            of(m.delivery_e2e_seconds, ref.tenant, ref.sink).observe(
                max(0.0, done - stored.timestamp), answer.exemplar
            )
        log.debug(
            "delivery ended: delivered (%s) on attempt %d in %.3fs",
            answer.said,
            a.go.attempt,
            answer.seconds,
        )

    async def _failed(self, a: _Attempt, answer: Answer, now: int) -> RunOutcome:
        """A retryable failure: schedule the next attempt, or dead-letter if none is left."""
        ref, sink, go = a.ref, a.sink, a.go
        error = answer.error  # scrubbed by the sink client
        await pace.answered(self.steps, ref.tenant, sink, answer, self._config.worker)
        nxt = next_attempt(
            go.attempt, now, go.deadline_ms, sink, self._config.worker, answer.retry_after
        )
        if nxt.give_up is None:
            retry = Finish(
                "retry",
                delay_ms=max(0, nxt.due_ms - now),
                status=answer.status,
                error=error,
                effect="failure",
            )
            applied = await self._finish(ref, retry, (answer, go.source))
            self._count(ref, "retried", answer)
            if not applied:
                return "done"  # another run holds the delivery now
            log.debug(
                "delivery ended: attempt %d failed in %.3fs (%s); next in %.2fs",
                go.attempt,
                answer.seconds,
                error,
                nxt.delay,
            )
            return "retried"  # the finish script rescheduled the job
        self._count(ref, "exhausted", answer)
        if nxt.give_up == "past max_age":
            why = f"past max_age ({sink.max_age:g}s) after {go.attempt} attempt(s)"
        else:
            why = f"out of attempts ({go.attempt} of {sink.max_attempts})"
        error = clip(f"{why}; last error: {error}")
        entry = dead_letter_of(ref, go.stored.type, "exhausted", a.tried(now), answer.status, error)
        await self._dead_letter(ref, entry, effect="failure", tried=(answer, go.source))
        return "done"

    def _count(self, ref: Ref, outcome: str, answer: Answer) -> None:
        label = status_class(answer.status, answer.kind)
        self._children.of(self._metrics.deliveries, ref.tenant, ref.sink, outcome, label).inc()
        self.activity.count(ref.tenant, ref.sink, outcome)

    async def _dead_letter(
        self,
        ref: Ref,
        entry: DeadLetter,
        *,
        effect: BreakerEffect,
        gone_url: str = "",
        tried: tuple[Answer, str] | None = None,
    ) -> None:
        dead = Finish(
            "dead",
            status=entry.status,
            error=entry.error,
            effect=effect,
            gone_url=gone_url,
            entry=entry,
            hold=self._holds(ref),
        )
        if not await self._finish(ref, dead, tried):
            return
        self._metrics.dead_lettered.labels(ref.tenant, ref.sink, entry.cls).inc()
        self.activity.count(ref.tenant, ref.sink, "dead-lettered")
        took = "" if tried is None else f" in {tried[0].seconds:.3f}s"
        log.warning(
            "delivery ended: dead-lettered as %s after %d attempt(s)%s: %s",
            entry.cls,
            entry.attempts,
            took,
            entry.error,
        )

    async def _finish(
        self,
        ref: Ref,
        f: Finish,
        tried: tuple[Answer, str] | None = None,
        handoff: Taken | None = None,
    ) -> bool:
        """Record ``f`` (and ``tried``: the attempt's answer and source, for the event
        log); False if this run no longer held the delivery — its worker was
        paused or its loop blocked past the hold (``heartbeat.HOLD_S``), and another run
        took the delivery over or finished it: nothing was recorded, the sink may get
        the event twice (never zero times). ``handoff``: the reserve already started on
        this run's slot, which the slot's lease passes to."""
        chain, ahead = "", False
        if self.adopt is not None and not self.draining:
            chain = self._sinks.claim_limit(ref.tenant, ref.sink)
            ahead = self._sinks.reservable(ref.tenant, ref.sink)
        if tried is not None:
            f = replace(f, attempt=tried[0].log_record(tried[1]))
        given = None if handoff is None else handoff.ref
        owed = self.reserves.expect(given) if given is not None and ahead else None
        cap = self._sinks.cap(ref.tenant, ref.sink)
        held = None
        try:
            done = await self.steps.finish(ref, f, cap, chain, given, ahead)
            held = done.reserve
        finally:
            if owed is not None and given is not None:
                held = self.reserves.settle(owed, given.job_id, held)
        if not done.applied:
            self._metrics.delivery_stale_finishes.labels(ref.tenant, ref.sink).inc()
            said = None if tried is None else tried[0].status or tried[0].error
            log_stale_finish(log, f.outcome, said)
            return False
        if done.chained is not None and self.adopt is not None:
            for job in self._accept([done.chained]):
                held = self.reserves.give(job.ref.job_id, held)
                self.adopt(job)  # it takes over the slot this run frees
        await self.reserves.left_over(held)
        self._ready(done.started)
        return True

    def _held(self, job: Taken) -> Taken | None:
        """A reserve as the worker holds it (renewed by the heartbeat), if it is one:
        a claim that found the delivery over instead runs now, as any job does."""
        started = self._accept([job])
        if not started:
            return None
        if not isinstance(job.claim, Go):
            if self.adopt is not None:
                self.adopt(job)  # no slot needed: it dead-letters (or drops) the delivery
            return None
        return job

    def _requeued(self, job_id: str) -> None:
        self._ready((job_id,))

    def _ready(self, started: tuple[str, ...] | list[str]) -> None:
        """A finish (or a sweep) queued jobs due now — an ordered chat's next event, the
        sink's waiting deliveries given its free slots: start them now rather than at the
        next poll."""
        if self.next_ready is not None:
            for job_id in started:
                self.next_ready(job_id)

    async def sweep(self, release: list[str]) -> list[str]:
        """Give the free slots of the sinks with waiting deliveries to them (slots freed
        without a finish: a lapsed lease, a reload, a breaker's wait over) and start
        them; the waiting sinks this worker does not know. ``release``: sinks whose
        waiting deliveries all go back in the queue (unknown for long enough)."""
        if self.draining:
            return []
        log_limits = self._config.event_log
        started, unknown = await self.steps.sweep(self._sinks.caps, release, log_limits)
        self._ready(started)
        return unknown

    def _holds(self, ref: Ref) -> bool:
        """Whether a dead letter of ``ref`` holds its chat (``on_dead_letter = "hold"``)."""
        sink = self._sinks.get(ref.tenant, ref.sink)
        return (
            ref.chat is not None
            and sink is not None
            and sink.ordering != "none"
            and sink.on_dead_letter == "hold"
        )

    async def _dead_letter_unclaimed(
        self, ref: Ref, found: Peek | None, cls: str, error: str
    ) -> None:
        """Dead-letter a delivery without claiming it (no attempt, slot or probe taken);
        ``found`` is what ``take`` read of it (None: nothing readable)."""
        if found is None:
            # Nothing (readable) left to deliver: no dead letter without its event.
            await self._finish(ref, Finish("drop"))
            return
        entry = dead_letter_of(ref, found.stored.type, cls, found.tried, None, error)
        finish = Finish("dead", error=entry.error, entry=entry, hold=self._holds(ref))
        if not await self._finish(ref, finish):
            return
        self._metrics.dead_lettered.labels(ref.tenant, ref.sink, cls).inc()
        self.activity.count(ref.tenant, ref.sink, "dead-lettered")
        log.warning("delivery ended: dead-lettered as %s: %s", cls, error)


def _now_ms() -> int:
    return CLOCK.now_ms()
