"""One tenant's poller: pulls what webhooks missed from Chert's events API.

The poller role (:mod:`relay.upstream.poller`) runs one per tenant whose ``poll.mode``
is not ``off``. It first takes the tenant's Redis lease (:mod:`relay.upstream.lease`),
so across every relay sharing one Redis exactly one polls a tenant; the others wait on
standby and take over within one lease ttl when the holder stops or dies.

Modes (``poll.mode``, chert-contract.md §4-5):

- ``fallback`` (default): a reconciliation sweep every ``reconcile_every``, and fast
  polling every ``interval`` while webhooks have lapsed — no webhook for
  ``lapse_after`` (the ingest script records the last one per tenant, shared by every
  relay; until the first one, the poller's own start counts), or a sweep found rows
  Chert marks ``failed``/``pending`` (older than ``stale_after``) that the relay never
  saw. Fast polling ends when a webhook arrives again. Every switch is logged and
  shown in ``chert_relay_poll_mode``.
- ``always``: a window every ``interval`` (tenants that cannot receive webhooks).
- ``sse``: tail ``/events/stream``, reconnecting (signed afresh, resuming from the
  last ``created_at`` - ``overlap``) on ``event: close``, end of stream, an error or
  ``sse_idle_timeout`` of silence; reconciliation sweeps run beside it.

A *window* asks ``since = watermark - overlap``, follows ``next_cursor`` to its end,
ingests every row through the one ingest door, and only then advances the tenant's
watermark in Redis to the newest ``created_at`` seen (never backwards). Only a chain
that ended with ``next_cursor: null`` counts: Chert returns newest first, so a window
cut short (a crash, an error, or a broken cursor chain — ``ChertPagingError``) must
not move the watermark past rows on pages it never read. Such a window is logged as
failed and repeats from the same watermark; dedupe absorbs the repeats. Fast and
``always`` polls are incremental: after one full window, each asks only from the
watermark less :data:`INCREMENTAL_OVERLAP_S`, so a poll costs what arrived since the
last one rather than the whole overlap again; the full ``overlap`` (what a late row
needs) is kept for the first window of a fast-polling spell and for every
reconciliation sweep (``reconcile_every``). With no watermark yet,
the first window starts at now - max(``overlap``, ``initial_lookback``); history
older than that is what ``chert-relay backfill`` is for.

When Chert refuses the credentials the poller logs it once (again only if the
answer changes) and slows to one try per ``auth_backoff``; a reload (SIGHUP) with a
new secret ends the wait at once.

This module is a little over 500 lines and stays whole: it is one role, one tenant's
poller, whose lease, modes, windows and stream all read and change the same state
(the mode, the fast-polling switch, the last outcome).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time

import aiohttp
from aiohttp.http import HttpProcessingError

from relay import telemetry
from relay.config import TenantConfig
from relay.errors import ChertApiError, RedisUnavailableError, UpstreamError
from relay.metrics import Metrics
from relay.runtime import Runtime
from relay.store import scripts
from relay.store.script_pipe import REDIS_TRANSIENT
from relay.upstream.chert_api import ChertApi, ChertPagingError, isoformat
from relay.upstream.lease import Lease
from relay.upstream.rows import RowsResult, ingest_rows
from relay.upstream.sse import SseIdleError, read_messages

log = logging.getLogger(__name__)

MODES = ("reconcile", "fast", "always", "sse", "standby")
# How far behind the watermark an incremental poll starts: Chert's created_at has whole
# seconds and ``since`` is strictly greater, so the rows of the watermark's own second
# (and a row logged a moment late) are read again; a sweep's full overlap catches the
# rest. Every second here is re-read on every poll: at 200 events/s, 400 rows.
INCREMENTAL_OVERLAP_S = 2.0
SSE_SHORT_S = 5.0  # a stream that ends sooner, having delivered nothing, counts as failed
_TRANSIENT = (UpstreamError, RedisUnavailableError, *REDIS_TRANSIENT)


def _raise_if_cancelled() -> None:
    """Re-raise a cancellation that something below swallowed.

    On Python 3.11, ``asyncio.wait_for`` (which redis-py wraps around every send when a
    socket timeout is set) returns its result instead of raising when its caller is
    cancelled just as the inner call finishes. A loop that carried on would outlive
    its role's stop. Every loop here checks at the top of each turn.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def cancel_task(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait for it to end (without swallowing our own cancellation)."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed while stopping", task.get_name(), exc_info=task.exception())


def _since(watermark: float, overlap: float) -> str:
    """Chert's ``since`` for a window from ``watermark``: never later than now, even
    for a watermark an earlier build let run into the future."""
    return isoformat(min(watermark, time.time()) - overlap)


class TenantPoller:
    """Polls one tenant while it holds the tenant's lease."""

    def __init__(self, rt: Runtime, tenant: TenantConfig, session: aiohttp.ClientSession) -> None:
        self.slug = tenant.slug
        self.tenant = tenant
        self._rt = rt
        self._metrics: Metrics = rt.metrics
        self.api = ChertApi(tenant, session, rt.metrics)
        self.lease = Lease(rt.redis, rt.keys.poll_lease(self.slug), tenant.poll.lease_ttl)
        self._advance = scripts.script("advance_watermark").bind(rt.redis)
        self._wm_key = rt.keys.watermark(self.slug)
        self._kick = asyncio.Event()  # set (and replaced) on reload: ends every pause
        self._changed = asyncio.Event()
        self._started = time.time()
        self.mode: str | None = None
        self.fast = False
        self._fast_since = 0.0
        self._primed = False  # a full window has run in this fast-polling spell
        self._auth_error: tuple[int, int] | None = None
        self._redis_trouble = False
        self.windows = 0  # completed windows (for tests and status)
        # For /api/pollers: the last window's end and outcome, the last failure's text.
        self.last_window_at: float | None = None
        self.last_outcome: str | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    # --- configuration and pauses ----------------------------------------------------

    def set_config(self, tenant: TenantConfig) -> None:
        if tenant == self.tenant:
            return
        self.tenant = tenant
        self.api.set_tenant(tenant)
        self.lease.ttl = tenant.poll.lease_ttl
        self._changed.set()
        self._wake()

    def _wake(self) -> None:
        self._kick.set()
        self._kick = asyncio.Event()

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less if the configuration changes meanwhile."""
        kick = self._kick
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, seconds)):
                await kick.wait()

    def _set_mode(self, mode: str | None) -> None:
        if mode == self.mode:
            return
        self.mode = mode
        for m in MODES:
            self._metrics.poll_mode.labels(self.slug, m).set(1 if m == mode else 0)

    # --- lease ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Take the lease when free, poll while holding it; until cancelled."""
        poll = self.tenant.poll
        try:
            while True:
                _raise_if_cancelled()
                try:
                    got = await self.lease.acquire()
                    self._redis_trouble = False
                except REDIS_TRANSIENT as e:
                    self._redis_down(e)
                    got = False
                if not got:
                    self._set_mode("standby")
                    await self._pause(self.lease.ttl / 3)
                    continue
                log.info("tenant %s: this relay polls it now (mode %s)", self.slug, poll.mode)
                self._metrics.poll_lease_held.labels(self.slug).set(1)
                try:
                    await self._hold()
                finally:
                    self._metrics.poll_lease_held.labels(self.slug).set(0)
                poll = self.tenant.poll
        finally:
            self._set_mode(None)
            if self.lease.held:
                with contextlib.suppress(*REDIS_TRANSIENT):
                    await self.lease.release()

    async def _hold(self) -> None:
        """Run the mode's work while renewing the lease every third of its ttl."""
        work: asyncio.Task[None] | None = None
        mode = ""
        try:
            while True:
                _raise_if_cancelled()
                self._changed.clear()
                if work is not None and work.done():
                    if not work.cancelled() and work.exception() is not None:
                        log.error(
                            "tenant %s: poller failed; restarting it",
                            self.slug,
                            exc_info=work.exception(),
                        )
                        await self._pause(min(self.tenant.poll.interval, self.lease.ttl / 3))
                    work = None
                if work is not None and self.tenant.poll.mode != mode:
                    log.info(
                        "tenant %s: poll mode changed from %s to %s",
                        self.slug,
                        mode,
                        self.tenant.poll.mode,
                    )
                    await cancel_task(work)
                    work = None
                if work is None:
                    mode = self.tenant.poll.mode
                    work = asyncio.create_task(self._work(mode), name=f"poll:{self.slug}")
                changed = asyncio.create_task(self._changed.wait())
                try:
                    await asyncio.wait(
                        {work, changed},
                        timeout=self.lease.ttl / 3,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    changed.cancel()
                try:
                    ok = await self.lease.renew()
                except REDIS_TRANSIENT as e:
                    self._redis_down(e)
                    ok = False
                if not ok:
                    log.warning("tenant %s: lost the poll lease; standing by", self.slug)
                    return
        finally:
            if work is not None:
                await cancel_task(work)

    def _redis_down(self, e: BaseException) -> None:
        if not self._redis_trouble:
            log.warning("tenant %s: poller cannot reach Redis: %s", self.slug, e)
        self._redis_trouble = True

    # --- modes ---------------------------------------------------------------------------

    async def _work(self, mode: str) -> None:
        if mode == "always":
            self._set_mode("always")
            next_sweep = 0.0  # monotonic: a full window at once, then every reconcile_every
            while True:
                _raise_if_cancelled()
                now = time.monotonic()
                full = now >= next_sweep
                result = await self.window_guarded(full=full)
                if full and result is not None:
                    next_sweep = now + self.tenant.poll.reconcile_every
                await self._pause(self.tenant.poll.interval)
        elif mode == "sse":
            self._set_mode("sse")
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.sse_loop())
                tg.create_task(self._reconcile_loop())
        elif mode == "fallback":
            self._set_mode("fast" if self.fast else "reconcile")
            await self._fallback_loop()

    async def _reconcile_loop(self) -> None:
        while True:
            _raise_if_cancelled()
            await self.window_guarded()
            await self._pause(self.tenant.poll.reconcile_every)

    async def _fallback_loop(self) -> None:
        next_sweep = 0.0  # monotonic: sweep at once on taking the lease
        while True:
            _raise_if_cancelled()
            poll = self.tenant.poll
            try:
                await self._check_lapse()
            except _TRANSIENT as e:
                self._redis_down(e)
            now = time.monotonic()
            if self.fast or now >= next_sweep:
                full = now >= next_sweep or not self._primed
                result = await self.window_guarded(full=full)
                if now >= next_sweep:
                    next_sweep = now + poll.reconcile_every
                if full and result is not None and self.fast:
                    self._primed = True
                if result is not None and result.undelivered_new and not self.fast:
                    self._switch(
                        True,
                        (
                            f"a sweep found {result.undelivered_new} event(s) Chert marks "
                            f"{'/'.join(sorted(result.statuses))} that the relay never saw"
                        ),
                    )
            wait = poll.interval if self.fast else min(poll.interval, next_sweep - now)
            await self._pause(wait)

    async def _last_webhook(self) -> float | None:
        raw = await self._rt.redis.get(self._rt.keys.last_webhook(self.slug))
        try:
            return int(raw) / 1000.0 if raw is not None else None
        except ValueError:
            return None

    async def _check_lapse(self) -> None:
        last = await self._last_webhook()
        now = time.time()
        if self.fast:
            if last is not None and last > self._fast_since:
                self._switch(False, "webhooks are arriving again")
            return
        lapse_after = self.tenant.poll.lapse_after
        if now - max(last or 0.0, self._started) > lapse_after:
            if last is None:
                why = f"no webhook since this relay started {now - self._started:.0f}s ago"
            else:
                why = f"no webhook for {now - last:.0f}s"
            self._switch(True, f"{why} (lapse_after {lapse_after:g}s)")

    def _switch(self, fast: bool, why: str) -> None:
        self.fast = fast
        poll = self.tenant.poll
        if fast:
            self._fast_since = time.time()
            self._primed = False
            log.warning(
                "tenant %s: webhooks have lapsed: %s; polling every %gs",
                self.slug,
                why,
                poll.interval,
            )
            self._set_mode("fast")
        else:
            log.info(
                "tenant %s: %s; fast polling stops (a sweep every %gs)",
                self.slug,
                why,
                poll.reconcile_every,
            )
            self._set_mode("reconcile")

    # --- windows ---------------------------------------------------------------------------

    async def watermark(self) -> float:
        """The tenant's watermark, set to now - initial lookback the first time."""
        raw = await self._rt.redis.get(self._wm_key)
        if raw is None:
            poll = self.tenant.poll
            start = time.time() - max(0.0, poll.initial_lookback - poll.overlap)
            await self._rt.redis.set(self._wm_key, repr(start), nx=True)
            raw = await self._rt.redis.get(self._wm_key)
        return float(raw) if raw is not None else time.time()

    async def window(self, source: str = "poll", *, full: bool = True) -> RowsResult:
        """One window: ``since = watermark - overlap`` to the end; then advance the watermark.

        ``full=False``: an incremental poll, from the watermark less
        :data:`INCREMENTAL_OVERLAP_S` (never more than ``overlap``).
        """
        tracer = telemetry.TRACER
        if tracer is None:
            return await self._window(source, full, telemetry.NO_WINDOW)
        with tracer.poll_window(self.slug, source, full) as span:
            return await self._window(source, full, span)

    async def _window(self, source: str, full: bool, span: telemetry.Window) -> RowsResult:
        poll = self.tenant.poll
        overlap = poll.overlap if full else min(poll.overlap, INCREMENTAL_OVERLAP_S)
        wm = await self.watermark()
        total = RowsResult()
        stale_before = time.time() - poll.stale_after
        # ``events`` returns only at ``next_cursor: null``; any failure (a broken cursor
        # chain included) raises out of here before the watermark moves.
        async for page in self.api.events(since=_since(wm, overlap), page_size=poll.page_size):
            span.page(page.trace_id)
            result = await ingest_rows(
                self._rt.ingestor, self.slug, page.rows, source, stale_before=stale_before
            )
            self._metrics.poll_rows.labels(self.slug, source).inc(result.seen)
            self._metrics.poll_rows_skipped.labels(self.slug, source).inc(result.skipped)
            total.add(result)
        if total.newest is not None and total.newest > wm:
            await self._advance(
                keys={"watermark": self._wm_key}, args={"value": repr(total.newest)}
            )
            wm = total.newest
        self._metrics.poll_watermark_age.labels(self.slug).set(max(0.0, time.time() - wm))
        self.windows += 1
        if total.new:
            log.info(
                "tenant %s: %s window found %d new event(s) of %d row(s)",
                self.slug,
                "full" if full else "incremental",
                total.new,
                total.seen,
            )
        return total

    async def window_guarded(self, *, full: bool = True) -> RowsResult | None:
        """:meth:`window`, with every expected failure logged and waited out."""
        try:
            result = await self.window(full=full)
        except ChertApiError as e:
            self._outcome("auth_error" if e.is_auth else "api_error", e)
            if e.is_auth:
                await self._auth_failed(e)
            else:
                log.warning(
                    "tenant %s: poll failed: Chert answered %d code %d (%s), trace_id=%s",
                    self.slug,
                    e.status,
                    e.code,
                    e.message,
                    e.trace_id or "-",
                )
            return None
        except ChertPagingError as e:
            self._outcome("broken_chain", e)
            log.warning(
                "tenant %s: poll window failed, watermark kept (the window repeats): %s",
                self.slug,
                e,
            )
            return None
        except UpstreamError as e:
            self._outcome("upstream_error", e)
            log.warning("tenant %s: poll failed: %s", self.slug, e)
            return None
        except (RedisUnavailableError, *REDIS_TRANSIENT) as e:
            self._outcome("redis_unavailable", e)
            self._redis_down(e)
            return None
        self._outcome("ok")
        self._redis_trouble = False
        if self._auth_error is not None:
            log.info("tenant %s: Chert accepts the relay's credentials again", self.slug)
            self._auth_error = None
        return result

    def _outcome(self, outcome: str, error: BaseException | None = None) -> None:
        self._metrics.poll_windows.labels(self.slug, outcome).inc()
        self.last_window_at = time.time()
        self.last_outcome = outcome
        if error is not None:
            self.last_error = f"{outcome}: {error}"[:300]
            self.last_error_at = self.last_window_at

    async def _auth_failed(self, e: ChertApiError) -> None:
        key = (e.status, e.code)
        backoff = self.tenant.poll.auth_backoff
        if key != self._auth_error:
            log.error(
                "tenant %s: Chert refused the relay's credentials: HTTP %d code %d (%s), "
                "trace_id=%s; trying again every %gs until they change (fix "
                "api.signing_secret and reload with SIGHUP)",
                self.slug,
                e.status,
                e.code,
                e.message,
                e.trace_id or "-",
                backoff,
            )
            self._auth_error = key
        else:
            log.debug("tenant %s: credentials still refused (code %d)", self.slug, e.code)
        await self._pause(backoff)

    # --- SSE -------------------------------------------------------------------------------

    async def sse_loop(self) -> None:
        """Tail the tenant's event stream, reconnecting after each end, until cancelled:
        the ``sse`` mode, which :meth:`run` starts beside the reconcile sweeps while it
        holds the lease (this takes none)."""
        resume: float | None = None  # newest created_at seen on the stream
        failures = 0
        while True:
            _raise_if_cancelled()
            poll = self.tenant.poll
            reason = "eof"
            try:
                # The watermark, which reconcile windows advance, wins over a resume
                # point stuck behind a message this loop cannot get past.
                base = max(resume or 0.0, await self.watermark())
                opened, delivered = time.monotonic(), False
                async with self.api.stream(since=_since(base, poll.overlap)) as resp:
                    self._metrics.sse_connections.labels(self.slug).inc()
                    log.debug("tenant %s: SSE stream open", self.slug)
                    async for msg in read_messages(
                        resp.content, idle_timeout=poll.sse_idle_timeout
                    ):
                        if msg.event == "close":
                            reason = "close"
                            break
                        newest = await self._sse_event(msg.data)
                        failures, delivered = 0, True
                        if newest is not None and (resume is None or newest > resume):
                            resume = newest
                if not delivered and time.monotonic() - opened < SSE_SHORT_S:
                    reason = "short"  # a stream that ends at once is no stream: back off
            except SseIdleError:
                reason = "idle"
            except ChertApiError as e:
                reason = "error"
                if e.is_auth:
                    await self._auth_failed(e)
                else:
                    log.warning(
                        "tenant %s: SSE stream refused: %s, trace_id=%s",
                        self.slug,
                        e,
                        e.trace_id or "-",
                    )
            except (
                aiohttp.ClientError,
                HttpProcessingError,
                ValueError,
                TimeoutError,
                *_TRANSIENT,
            ) as e:
                # (HttpProcessingError: a line longer than aiohttp reads, say)
                reason = "error"
                log.warning("tenant %s: SSE stream failed: %s: %s", self.slug, type(e).__name__, e)
            self._metrics.sse_reconnects.labels(self.slug, reason).inc()
            log.debug("tenant %s: SSE stream ended (%s); reconnecting", self.slug, reason)
            if reason in ("error", "short"):
                failures += 1
                cap = min(self.tenant.api.max_backoff, 0.5 * 2.0 ** min(failures, 16))
                await self._pause(cap * (0.5 + random.random() / 2))

    async def _sse_event(self, data: str) -> float | None:
        """Ingest one stream message; the event's created_at (or timestamp) if known."""
        if not data.strip():
            return None
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):
            log.warning("tenant %s: SSE message is not JSON; skipped", self.slug)
            return None
        rows = [obj] if isinstance(obj, dict) else []
        if not rows:
            log.warning("tenant %s: SSE message is not a JSON object; skipped", self.slug)
            return None
        result = await ingest_rows(self._rt.ingestor, self.slug, rows, "sse")
        self._metrics.poll_rows.labels(self.slug, "sse").inc(result.seen)
        self._metrics.poll_rows_skipped.labels(self.slug, "sse").inc(result.skipped)
        return result.newest
