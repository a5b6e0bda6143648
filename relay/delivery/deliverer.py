"""Delivery: the worker's job — one event to one sink, one HTTP attempt per run.

arq runs ``deliver(ctx, tenant, sink, event_id)`` for each job ingest queued. The relay,
not arq, keeps the delivery's record: an ``att`` hash per (event, sink) with the
attempts made, the deadline (ingest time + the sink's ``max_age``, or the replay time),
the time the next attempt is due and the last status and error. arq only schedules.

One run is three steps:

1. **Claim** (one Lua script): load the stored event; if the sink's URL is marked gone,
   the deadline has passed or the attempts are used up, the delivery becomes a dead
   letter. If the next attempt is not due yet, the sink's breaker is open (or
   half-open with someone else's probe in flight) or the sink is at its in-flight cap
   (``sink.concurrency``), the job is put back in the queue for later without an HTTP
   call, so a slow or dead sink never holds the worker's slots. Otherwise the attempt
   is counted, an in-flight slot is leased, and the payload comes back.
2. **POST** the stored envelope with Standard Webhooks headers (``webhook-id`` is
   Chert's ``event_id``, stable across attempts and replays) plus ``X-Chert-*`` and
   ``X-Relay-*`` headers and the sink's static headers.
3. **Finish** (one Lua script): 2xx — done, the job and its record go, and the stored
   event is deleted once no job or dead letter needs it. Connection error, timeout,
   408, 425, 429 or 5xx — the next attempt is scheduled (exponential backoff with
   jitter, or the sink's ``Retry-After`` within ``worker.retry_after_max``) in the same
   step that records the failure; or, out of attempts or time, a dead letter
   ``exhausted``. 410 — dead letter ``gone`` and the sink's URL is marked gone. Any
   other 4xx (or a 3xx) — dead letter ``rejected``.

A ``Retry-After`` never shortens the wait below the normal backoff for the attempt
(``Retry-After: 0`` would otherwise burn ``max_attempts`` in moments). A sink whose
secret is not a usable signing key is dead-lettered ``rejected`` before the claim, so it
never uses an attempt, an in-flight slot or a breaker probe.

Everything is caught inside the job: arq treats any exception but ``Retry`` (and its
own job timeout) as final and would drop the job. A fault of our own (Redis away, a
bug) re-runs the job a few seconds later: a small script moves the job's queue entry
(``ZADD XX``, only while the job key still exists) and a plain ``Retry()`` hands it
back. arq itself never re-adds the entry: if the finish script ran but its reply was
lost, the job key is gone, and the run simply ends (the delivery is recorded). Every
``Retry`` is plain — the scripts have already rescheduled the job. The HTTP timeout
is the sink's ``timeout``, well inside the job's own budget, which is inside arq's
job timeout (the longest sink timeout + :data:`JOB_MARGIN_S`).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import random
import re
import time
from dataclasses import dataclass
from datetime import UTC
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import redis.exceptions
from arq.constants import job_key_prefix, retry_key_prefix
from arq.worker import Retry
from redis.asyncio import Redis

from relay import __version__, logs
from relay.config import Config, SinkConfig
from relay.delivery import breaker, deadletters
from relay.keys import Keys
from relay.metrics import Metrics
from relay.signing import standard_webhooks_key, standard_webhooks_signature
from relay.store import jobs as queue
from relay.store import stored_event

log = logging.getLogger(__name__)

CTX_KEY = "relay"  # the one key of arq's ctx dict the relay uses
JOB_MARGIN_S = 3.0  # arq's job timeout = longest sink timeout + this
FAULT_RETRY_S = 5.0  # a run that failed on our side tries again after 1-2x this
LAST_TRY_MARGIN_S = 1.0  # a last attempt starts this + the sink's timeout before the deadline
FAULT_CHECK_S = 0.5  # bound on rescheduling after a fault (inside arq's job timeout)
ERROR_MAX_CHARS = 300
ERROR_BODY_READ = 1024  # bytes of an error answer read; scrub() blanks secrets, then cuts
RETRYABLE_STATUSES = frozenset({408, 425, 429})

# KEYS: ev, attempts, breaker, inflight, gone, job, queue
# ARGV: now, job_id, max_age_ms, max_attempts, cap, lease_ms, margin_ms, url, busy_ms,
#       open_jitter_ms, half_open_ms
_CLAIM = """
local now, job_id = tonumber(ARGV[1]), ARGV[2]
local stored = redis.pcall('GET', KEYS[1])  -- relay.stored_event; parsed by the caller
if type(stored) == 'table' then return {'unreadable'} end  -- not a string: WRONGTYPE
if not stored then return {'missing'} end
local st = redis.call('HMGET', KEYS[2], 'a', 'dl', 'due', 'first', 'last', 'st', 'err', 'src')
local a = tonumber(st[1]) or 0
local dl = tonumber(st[2])
local margin = tonumber(ARGV[7])
-- neither arq's job nor the payload may expire before the deadline has been acted on
-- (the sink's max_age may have grown by a reload since the event was queued)
local function hold()
  local keep = math.max(dl - now, 0) + margin
  redis.call('PEXPIRE', KEYS[6], keep)
  local ev_ttl = redis.call('PTTL', KEYS[1])
  if ev_ttl >= 0 and ev_ttl < keep then redis.call('PEXPIRE', KEYS[1], keep) end
end
if not dl then
  dl = (event_at(stored) or now) + tonumber(ARGV[3])
  redis.call('HSET', KEYS[2], 'dl', dl)
  redis.call('PEXPIRE', KEYS[2], math.max(dl - now, 0) + margin)
  hold()  -- now, even if this claim only puts the delivery off
end
local info = {a, st[4] or '', st[5] or '', st[6] or '', st[7] or '', stored}
if redis.call('GET', KEYS[5]) == ARGV[8] then return {'gone', unpack(info)} end
if now >= dl then return {'expired', unpack(info)} end
if a >= tonumber(ARGV[4]) then return {'exhausted', unpack(info)} end
local function defer(reason, wait)
  redis.call('ZADD', KEYS[7], now + wait, job_id)
  return {'defer', reason, wait}
end
-- A delivery put off again and again because its sink is busy (or probing) waits
-- longer each time, up to 10 s: a slow sink's backlog must not crowd out the jobs of
-- other sinks by cycling through the queue.
local function longer(wait)
  local n = redis.call('HINCRBY', KEYS[2], 'w', 1)
  return math.min(wait * 2 ^ math.min(n - 1, 16), math.max(wait, 10000))
end
local due = tonumber(st[3])
if due and due > now then return defer('not_due', due - now) end
local verdict, wait = breaker_check(KEYS[3], now, job_id, tonumber(ARGV[10]), tonumber(ARGV[11]))
if verdict == 'open' then return defer('breaker_open', wait) end
if verdict == 'half' then return defer('half_open', longer(wait)) end
local lease = tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local mine = redis.call('ZSCORE', KEYS[4], job_id)
if redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[5]) and not mine then
  return defer('busy', longer(tonumber(ARGV[9])))
end
if verdict == 'probe' then breaker_take_probe(KEYS[3], now, job_id, lease) end
redis.call('ZADD', KEYS[4], now + lease, job_id)
redis.call('PEXPIRE', KEYS[4], lease + margin)
a = a + 1
redis.call('HSET', KEYS[2], 'a', a, 'last', now, 'w', 0)
redis.call('HSETNX', KEYS[2], 'first', now)
hold()
return {'go', a, st[4] or now, dl, stored, st[8] or ''}
"""

# KEYS: ev, attempts, breaker, inflight, gone, job, queue, arq retry, dl entry, dl index,
#       dl counts
# ARGV: now, job_id, outcome (ok|retry|dead|drop), due_ms, status, error, breaker effect,
#       threshold, cooldown_ms, breaker_ttl_ms, gone url ('' for none), class, member,
#       then the dead letter's fields (name/value pairs)
_FINISH = """
local now, job_id, outcome = tonumber(ARGV[1]), ARGV[2], ARGV[3]
redis.call('ZREM', KEYS[4], job_id)
breaker_record(KEYS[3], now, job_id, ARGV[7], tonumber(ARGV[8]), tonumber(ARGV[9]),
  tonumber(ARGV[10]))
if outcome == 'retry' then
  redis.call('HSET', KEYS[2], 'due', ARGV[4], 'st', ARGV[5], 'err', ARGV[6])
  redis.call('ZADD', KEYS[7], ARGV[4], job_id)
  return outcome
end
redis.call('DEL', KEYS[6], KEYS[8], KEYS[2])
redis.call('ZREM', KEYS[7], job_id)
if outcome == 'dead' then
  -- An earlier dead letter of this (event, sink) is replaced: its hold on the stored
  -- event passes to the new one, and this job's is let go.
  if redis.call('EXISTS', KEYS[9]) == 1 then event_release(KEYS[1]) end
  deadletter_add(KEYS[9], KEYS[10], KEYS[11], ARGV[13], now, ARGV[12], 14)
  redis.call('PERSIST', KEYS[1])
  if ARGV[11] ~= '' then redis.call('SET', KEYS[5], ARGV[11]) end
elseif outcome == 'ok' then
  event_release(KEYS[1])
end
return outcome
"""

# After a fault: the job runs again later, unless it is finished (its job key is gone —
# the finish script ran but its reply was lost). XX: never re-create a queue entry.
# KEYS: job, queue   ARGV: due_ms, job_id
_RESCHEDULE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('ZADD', KEYS[2], 'XX', ARGV[1], ARGV[2])
return 1
"""

# KEYS: inflight, breaker   ARGV: job_id
_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
breaker_release(KEYS[2], ARGV[1])
return 1
"""


def _parse_stored(raw: bytes) -> stored_event.StoredEvent | None:
    try:
        return stored_event.parse(raw)
    except ValueError:
        return None


def header_value(text: str) -> str:
    """``text`` as an HTTP header value: control characters (which would end the header
    line) escaped, not sent. Event types come from Chert's body and are not checked."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


@dataclass
class JobContext:
    """What the job function needs, kept in arq's ``ctx`` under :data:`CTX_KEY`."""

    deliverer: Deliverer


def job_context(ctx: dict[str, Any]) -> JobContext:
    """The relay's typed context from arq's untyped ``ctx`` dict."""
    found = ctx.get(CTX_KEY)
    if not isinstance(found, JobContext):
        raise RuntimeError("the worker did not set up the delivery context")
    return found


async def deliver(ctx: dict[str, Any], tenant: str, sink: str, event_id: str) -> None:
    """The arq job function (registered as ``deliver``): one attempt, or a deferral."""
    await job_context(ctx).deliverer.deliver(tenant, sink, event_id, str(ctx["job_id"]))


def job_timeout(config: Config) -> float:
    """arq's timeout for the delivery function: well past every sink's HTTP timeout."""
    longest = max((s.timeout for t in config.tenants for s in t.sinks), default=10.0)
    return longest + JOB_MARGIN_S


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delay-seconds or an HTTP date)."""
    if not value:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff(
    attempt: int,
    base: float,
    cap: float,
    retry_after: float | None = None,
    retry_after_max: float = 3600.0,
    rand: float | None = None,
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    ``base * 2**(attempt-1)`` capped at ``cap``, less up to 25% jitter.
    A ``Retry-After`` from the sink can lengthen the wait, up to ``retry_after_max``, but
    never shortens it below that backoff.
    """
    delay = min(base * 2.0 ** min(attempt - 1, 62), cap)
    delay *= 0.75 + 0.25 * (random.random() if rand is None else rand)
    if retry_after is not None:
        return max(delay, min(max(retry_after, 0.0), retry_after_max))
    return delay


def status_class(status: int | None, kind: str) -> str:
    return kind if status is None else f"{status // 100}xx"


_WORDS = re.compile(r"[\s=,;:]+")


def scrub(text: str, sink: SinkConfig) -> str:
    """One line, at most ERROR_MAX_CHARS, with the sink's secrets blanked out."""
    secrets = [v for v in sink.headers.values() if len(v) >= 4]
    # A sink may echo only the credential part of a header (the token of "Bearer tok…").
    secrets += [w for v in sink.headers.values() for w in _WORDS.split(v) if len(w) >= 8]
    if sink.secret is not None:
        secrets.append(sink.secret.get())
    parts = urlsplit(sink.url)
    # Webhook URLs often carry their credential in the path (…/hooks/T01/B02/XyZ…):
    # the path goes too, whole and by segment, unless it is too short to be one.
    segments = [seg for seg in parts.path.split("/") if len(seg) >= 8]
    path = parts.path if len(parts.path) >= 8 else ""
    values = [v for _, v in parse_qsl(parts.query, keep_blank_values=True) if len(v) >= 8]
    secrets += [
        p for p in (parts.password, parts.username, parts.query, path, *segments, *values) if p
    ]
    for s in sorted(secrets, key=len, reverse=True):
        text = text.replace(s, "***")
    return " ".join(text.split())[:ERROR_MAX_CHARS]


@dataclass(frozen=True, slots=True)
class Answer:
    """How one HTTP attempt went."""

    status: int | None  # None: no HTTP answer
    kind: str  # "http", "timeout" or "connection"
    error: str  # "" for 2xx
    retry_after: float | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def retryable(self) -> bool:
        s = self.status
        return s is None or s in RETRYABLE_STATUSES or s >= 500


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
        self._redis = redis_client
        self._metrics = metrics
        self._session = session
        self.job_timeout = job_timeout
        self.draining = False  # set when the worker stops: jobs arq starts now go back
        self._claim = redis_client.register_script(stored_event.LUA + breaker.LUA + _CLAIM)
        self._finish = redis_client.register_script(
            stored_event.LUA + breaker.LUA + deadletters.LUA_ADD + _FINISH
        )
        self._release = redis_client.register_script(breaker.LUA + _RELEASE)
        self._reschedule = redis_client.register_script(_RESCHEDULE)
        self._signing_keys: dict[str, bytes | None] = {}
        self.set_config(config)

    def set_config(self, config: Config) -> None:
        self._config = config
        self._signing_keys = {}
        self._keys = Keys(config.redis.key_prefix)
        self._queue = queue.queue_name(config.redis.key_prefix)
        longest = job_timeout(config)
        if longest > self.job_timeout:
            log.warning(
                "a sink timeout grew past what this worker was started with; deliveries "
                "use at most %.0fs until the worker restarts",
                self.job_timeout - JOB_MARGIN_S,
            )

    def _sink(self, tenant: str, name: str) -> SinkConfig | None:
        t = self._config.tenant(tenant)
        if t is None:
            return None
        return next((s for s in t.sinks if s.name == name), None)

    async def deliver(self, tenant: str, sink: str, event_id: str, job_id: str) -> None:
        """One run of a job. Returns when the delivery is over (delivered or dead-lettered);
        raises ``Retry`` when the job must run again later."""
        if self.draining:
            raise Retry()  # back in the queue as it was, for the next worker
        with logs.bind(tenant=tenant, sink=sink, event_id=event_id):
            try:
                async with asyncio.timeout(self.job_timeout - 1.0):
                    await self._run(tenant, sink, event_id, job_id)
            except Retry:
                raise
            except Exception as e:  # never let arq see it: it would drop the job
                wait = FAULT_RETRY_S * (1 + random.random())
                redis_fault = isinstance(e, redis.exceptions.RedisError | OSError | TimeoutError)
                if not await self._after_fault(job_id, wait):
                    log.warning(
                        "delivery run ended with %s: %s, after its outcome was recorded; "
                        "nothing to run again", type(e).__name__, e,
                    )  # fmt: skip
                    return
                log.error(
                    "delivery could not run (%s: %s); trying again in %.1fs",
                    type(e).__name__, e, wait, exc_info=not redis_fault,
                )  # fmt: skip
                raise Retry() from None

    async def _after_fault(self, job_id: str, wait: float) -> bool:
        """Reschedule a job whose run failed on our side; False if it is already finished.

        Never lets arq re-add the job (``Retry(defer=…)`` would ``ZINCRBY`` an entry the
        finish script may already have removed). If Redis cannot be asked, the job stays
        as it is: arq's in-progress key holds it back until it expires.
        """
        due = _now_ms() + int(wait * 1000)
        try:
            async with asyncio.timeout(FAULT_CHECK_S):
                found = await self._reschedule(
                    keys=[job_key_prefix + job_id, self._queue], args=[due, job_id]
                )
        except (redis.exceptions.RedisError, OSError, TimeoutError) as e:
            log.warning("could not reschedule job %s after the fault (%s)", job_id, e)
            return True
        return bool(found)

    def _keys_for(self, tenant: str, sink: str, event_id: str, job_id: str) -> list[str]:
        k = self._keys
        return [
            k.event(tenant, event_id), k.attempts(tenant, sink, event_id),
            k.breaker(tenant, sink), k.inflight(tenant, sink), k.sink_gone(tenant, sink),
            job_key_prefix + job_id, self._queue,
        ]  # fmt: skip

    async def _run(self, tenant: str, sink_name: str, event_id: str, job_id: str) -> None:
        sink = self._sink(tenant, sink_name)
        if sink is None:
            await self._dead_letter_unclaimed(
                tenant, sink_name, event_id, job_id, "gone", "the sink is no longer configured"
            )
            return
        if sink.secret is not None and self._signing_key(sink) is None:
            self._metrics.deliveries.labels(tenant, sink_name, "rejected", "none").inc()
            await self._dead_letter_unclaimed(
                tenant, sink_name, event_id, job_id, "rejected",
                "the sink's secret is not valid base64 (a Standard Webhooks key is "
                "'whsec_' + base64); not tried",
            )  # fmt: skip
            return
        w = self._config.worker
        http_timeout = min(sink.timeout, self.job_timeout - JOB_MARGIN_S)
        lease_ms = int((http_timeout + JOB_MARGIN_S) * 1000)
        margin_ms = 86_400_000
        now = _now_ms()
        keys = self._keys_for(tenant, sink_name, event_id, job_id)
        args: list[str | int] = [
            now, job_id, int(sink.max_age * 1000), sink.max_attempts, sink.concurrency,
            lease_ms, margin_ms, sink.url,
            _jitter_ms(w.busy_defer), int(random.random() * min(w.breaker_cooldown, 5.0) * 1000),
            _jitter_ms(min(w.breaker_cooldown, 1.0)),
        ]  # fmt: skip
        res = await self._claim(keys=keys, args=args)
        verdict = _text(res[0])
        stored = None
        if verdict in ("go", "gone", "expired", "exhausted"):
            stored = _parse_stored(res[4] if verdict == "go" else res[6])
            if stored is None:
                verdict = "unreadable"
        if verdict in ("missing", "unreadable"):
            what = "gone" if verdict == "missing" else "unreadable"
            log.error("the stored event is %s; nothing to deliver (job %s)", what, job_id)
            self._metrics.deliveries.labels(tenant, sink_name, "missing", "none").inc()
            await self._finish_call(keys, now, job_id, "drop")
            return
        if verdict == "defer":
            reason, wait = _text(res[1]), int(res[2])
            self._metrics.delivery_deferrals.labels(tenant, sink_name, reason).inc()
            log.debug("delivery put off %.2fs (%s)", wait / 1000, reason)
            raise Retry()  # the claim script already rescheduled the job
        assert stored is not None  # parsed above for every other verdict
        if verdict in ("gone", "expired", "exhausted"):
            attempts, first, last = int(res[1]), _ms(res[2]), _ms(res[3])
            status, error = _text(res[4]), _text(res[5])
            etype = stored.type
            if verdict == "gone":
                cls, error = "gone", "the sink's URL answered 410 Gone earlier; not tried"
            else:
                cls = "exhausted"
                why = "past max_age" if verdict == "expired" else "out of attempts"
                error = f"{why}; last error: {error}" if error else why
            await self._dead_letter(
                keys, tenant, sink, event_id, job_id, etype, cls,
                status=int(status) if status else None, error=scrub(error, sink),
                attempts=attempts, first=first, last=last, effect="none",
            )  # fmt: skip
            return
        attempt, first_ms, deadline_ms = int(res[1]), int(res[2]), int(res[3])
        src = _text(res[5]) or stored.source  # a replay says so
        with logs.bind(attempt=attempt):
            await self._attempt(
                keys, tenant, sink, event_id, job_id, attempt, first_ms, deadline_ms,
                stored, src, http_timeout,
            )  # fmt: skip

    async def _attempt(
        self, keys: list[str], tenant: str, sink: SinkConfig, event_id: str, job_id: str,
        attempt: int, first_ms: int, deadline_ms: int, stored: stored_event.StoredEvent,
        src: str, http_timeout: float,
    ) -> None:  # fmt: skip
        body, etype = stored.body, stored.type
        m = self._metrics
        log.info("delivery started: attempt %d of %d", attempt, sink.max_attempts)
        headers = self._headers(tenant, sink, event_id, etype, attempt, src, body)
        try:
            answer = await self._post(sink, body, headers, http_timeout)
        except asyncio.CancelledError:
            # Shutting down past the grace period: give the slot back; arq runs it again.
            with contextlib.suppress(Exception):  # best effort: the lease also expires
                async with asyncio.timeout(FAULT_CHECK_S):
                    await asyncio.shield(self._release(keys=[keys[3], keys[2]], args=[job_id]))
            log.info("delivery cancelled during attempt %d; it will run again", attempt)
            raise
        now = _now_ms()
        label = status_class(answer.status, answer.kind)
        m.delivery_attempt_seconds.labels(tenant, sink.name).observe(answer.seconds)
        if answer.ok:
            await self._finish_call(keys, now, job_id, "ok", effect="success")
            m.deliveries.labels(tenant, sink.name, "delivered", label).inc()
            done = time.time()
            m.delivery_relay_seconds.labels(tenant, sink.name).observe(
                max(0.0, done - stored.at_ms / 1000)
            )
            if stored.timestamp is not None:
                m.delivery_e2e_seconds.labels(tenant, sink.name).observe(
                    max(0.0, done - stored.timestamp)
                )
            log.info(
                "delivery ended: delivered (HTTP %d) on attempt %d in %.3fs",
                answer.status, attempt, answer.seconds,
            )  # fmt: skip
            return
        error = scrub(answer.error, sink)
        if answer.retryable:
            w = self._config.worker
            delay = backoff(
                attempt, w.retry_backoff, w.retry_backoff_max, answer.retry_after,
                w.retry_after_max,
            )  # fmt: skip
            due = now + int(delay * 1000)
            # A wait (a long Retry-After, say) that would run past the deadline still leaves
            # one last attempt, just before it, rather than none.
            last_chance = deadline_ms - int((sink.timeout + LAST_TRY_MARGIN_S) * 1000)
            if due >= deadline_ms and last_chance > now:
                due, delay = last_chance, (last_chance - now) / 1000
            if attempt < sink.max_attempts and due < deadline_ms:
                await self._finish_call(
                    keys, now, job_id, "retry", due=due, status=answer.status, error=error,
                    effect="failure",
                )  # fmt: skip
                m.deliveries.labels(tenant, sink.name, "retried", label).inc()
                log.info(
                    "delivery ended: attempt %d failed in %.3fs (%s); next in %.2fs",
                    attempt, answer.seconds, error, delay,
                )  # fmt: skip
                raise Retry()  # the finish script already rescheduled the job
            why = "out of attempts" if attempt >= sink.max_attempts else "past max_age"
            cls, effect, gone = "exhausted", "failure", ""
            error = scrub(f"{why}; last error: {error}", sink)
        elif answer.status == 410:
            cls, effect, gone = "gone", "none", sink.url
        else:
            cls, effect, gone = "rejected", "success", ""  # the sink is alive, and said no
        m.deliveries.labels(tenant, sink.name, cls, label).inc()
        await self._dead_letter(
            keys, tenant, sink, event_id, job_id, etype, cls, status=answer.status,
            error=error, attempts=attempt, first=first_ms / 1000, last=now / 1000,
            effect=effect, gone_url=gone, seconds=answer.seconds,
        )  # fmt: skip

    def _headers(
        self, tenant: str, sink: SinkConfig, event_id: str, etype: str, attempt: int,
        src: str, body: bytes,
    ) -> dict[str, str]:  # fmt: skip
        now = int(time.time())
        ours = {
            "Content-Type": "application/json",
            "User-Agent": f"chert-relay/{__version__}",
            "webhook-id": event_id,
            "webhook-timestamp": str(now),
            "X-Chert-Event-Type": header_value(etype),
            "X-Chert-Tenant": tenant,
            "X-Relay-Attempt": str(attempt),
            "X-Relay-Source": src,
        }
        key = self._signing_key(sink)
        if key is not None:
            ours["webhook-signature"] = standard_webhooks_signature(key, event_id, now, body)
        taken = {k.lower() for k in ours} | {"webhook-signature"}
        headers = {k: v for k, v in sink.headers.items() if k.lower() not in taken}
        headers.update(ours)
        return headers

    async def _post(
        self, sink: SinkConfig, body: bytes, headers: dict[str, str], timeout: float
    ) -> Answer:
        started = time.perf_counter()
        try:
            async with self._session.post(
                sink.url, data=body, headers=headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:  # fmt: skip
                status = resp.status
                if 200 <= status < 300:
                    await resp.content.read(65536)  # lets the connection be reused
                    return Answer(status, "http", "", None, time.perf_counter() - started)
                snippet = ""
                if status not in (401, 403):  # where a sink would echo a credential back
                    # More than is kept, so that scrub() sees any secret whole before
                    # the text is cut to ERROR_MAX_CHARS.
                    raw = await resp.content.read(ERROR_BODY_READ)
                    snippet = raw.decode(errors="replace")
                error = f"HTTP {status}" + (f": {snippet}" if snippet.strip() else "")
                return Answer(
                    status, "http", error, parse_retry_after(resp.headers.get("Retry-After")),
                    time.perf_counter() - started,
                )  # fmt: skip
        except TimeoutError:
            elapsed = time.perf_counter() - started
            return Answer(None, "timeout", f"no answer within {timeout:g}s", None, elapsed)
        except (aiohttp.ClientError, OSError, ValueError) as e:
            elapsed = time.perf_counter() - started
            return Answer(None, "connection", f"{type(e).__name__}: {e}", None, elapsed)

    async def _dead_letter(
        self, keys: list[str], tenant: str, sink: SinkConfig, event_id: str, job_id: str,
        etype: str, cls: str, *, status: int | None, error: str, attempts: int,
        first: float | None, last: float | None, effect: str, gone_url: str = "",
        seconds: float | None = None,
    ) -> None:  # fmt: skip
        now = _now_ms()
        entry = deadletters.DeadLetter(
            tenant=tenant, sink=sink.name, event_id=event_id, event_type=etype, cls=cls,
            status=status, error=error, attempts=attempts, first_attempt=first,
            last_attempt=last, dead_lettered_at=now / 1000,
        )  # fmt: skip
        await self._finish_call(
            keys, now, job_id, "dead", status=status, error=error, effect=effect,
            gone_url=gone_url, entry=entry,
        )  # fmt: skip
        self._metrics.dead_lettered.labels(tenant, sink.name, cls).inc()
        took = "" if seconds is None else f" in {seconds:.3f}s"
        log.warning(
            "delivery ended: dead-lettered as %s after %d attempt(s)%s: %s",
            cls, attempts, took, error,
        )  # fmt: skip

    def _signing_key(self, sink: SinkConfig) -> bytes | None:
        """The sink's HMAC key, decoded once per config; None without a usable secret."""
        if sink.secret is None:
            return None
        secret = sink.secret.get()
        if secret not in self._signing_keys:
            try:
                self._signing_keys[secret] = standard_webhooks_key(secret)
            except ValueError:
                self._signing_keys[secret] = None
        return self._signing_keys[secret]

    async def _dead_letter_unclaimed(
        self, tenant: str, sink: str, event_id: str, job_id: str, cls: str, error: str
    ) -> None:
        """Dead-letter a delivery without claiming it (no attempt, slot or probe taken)."""
        k = self._keys
        keys = self._keys_for(tenant, sink, event_id, job_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(k.event(tenant, event_id))
            pipe.hmget(k.attempts(tenant, sink, event_id), ["a", "first", "last"])
            raw, att = await pipe.execute(raise_on_error=False)
        now = _now_ms()
        stored = None if isinstance(raw, Exception | None) else _parse_stored(raw)
        if stored is None or isinstance(att, Exception):
            # Nothing (readable) left to deliver: no dead letter without its event.
            await self._finish_call(keys, now, job_id, "drop")
            return
        entry = deadletters.DeadLetter(
            tenant=tenant, sink=sink, event_id=event_id, event_type=stored.type, cls=cls,
            status=None, error=error, attempts=int(att[0] or 0),
            first_attempt=_ms(att[1]), last_attempt=_ms(att[2]), dead_lettered_at=now / 1000,
        )  # fmt: skip
        await self._finish_call(keys, now, job_id, "dead", error=entry.error, entry=entry)
        self._metrics.dead_lettered.labels(tenant, sink, cls).inc()
        log.warning("delivery ended: dead-lettered as %s: %s", cls, error)

    async def _finish_call(
        self, keys: list[str], now: int, job_id: str, outcome: str, *, due: int = 0,
        status: int | None = None, error: str = "", effect: str = "none",
        gone_url: str = "", entry: deadletters.DeadLetter | None = None,
    ) -> None:  # fmt: skip
        k = self._keys
        w = self._config.worker
        tenant, sink, event_id = (
            (entry.tenant, entry.sink, entry.event_id) if entry else ("", "", "")
        )  # fmt: skip
        args: list[str | int] = [
            now, job_id, outcome, due, "" if status is None else status, error, effect,
            w.breaker_failures, int(w.breaker_cooldown * 1000),
            max(breaker.TTL_MS, int(w.breaker_cooldown * 2000)), gone_url,
            entry.cls if entry else "", deadletters.member(sink, event_id),
        ]  # fmt: skip
        if entry is not None:
            args += deadletters.entry_fields(entry)
        all_keys = [
            *keys, retry_key_prefix + job_id,
            k.dead_letter(tenant, sink, event_id), k.dead_letters(tenant),
            k.dead_letter_counts(tenant),
        ]  # fmt: skip
        await self._finish(keys=all_keys, args=args)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _jitter_ms(seconds: float) -> int:
    return int(seconds * (1 + random.random()) * 1000)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "" if value is None else str(value)


def _ms(value: object) -> float | None:
    text = _text(value)
    return int(float(text)) / 1000 if text else None
