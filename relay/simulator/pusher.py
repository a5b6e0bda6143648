"""Pushing logged events to the tenant's webhook URL, with Chert's retry rule.

Each push is a task: wait out any ``delay`` (and, with ``reorder``, a random
hold-back), then up to three attempts — 2xx is delivered; a 4xx is never retried
(failed); a 5xx, timeout or connection error is retried after
``retry_backoff * 2**(attempt-1)`` seconds; after the third failure the row is
failed, and only a replay sends it again. Every attempt is signed afresh with the
subscription's secret and recorded both in the row's ``delivery.attempts`` and
in :attr:`WebhookPusher.attempts`. Faults are read at each decision.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from relay.signing import webhook_headers
from relay.simulator.eventlog import LogEntry
from relay.simulator.models import Faults, SimTenant, WebhookAttempt, iso_ms

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
USER_AGENT = "Chert-Webhooks/1.0 (chert-relay simulator)"


class WebhookPusher:
    def __init__(
        self,
        *,
        tenants: dict[str, SimTenant],
        faults: Faults,
        rng: random.Random,
        retry_backoff: float,
        timeout: float,
    ) -> None:
        self._tenants = tenants
        self._faults = faults
        self._rng = rng
        self._backoff = retry_backoff
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._waiting: list[LogEntry] = []  # submitted before start()
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.attempts: list[WebhookAttempt] = []
        self.listeners: list[Callable[[WebhookAttempt], None]] = []

    # --- lifecycle -------------------------------------------------------------------

    def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        waiting, self._waiting = self._waiting, []
        self.submit(waiting)

    async def stop(self) -> None:
        """Cancel every pending push and retry."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._session = None

    async def wait_idle(self, timeout: float) -> None:
        """Return once no push (first attempt or retry) is pending; ``TimeoutError`` else."""
        async with asyncio.timeout(timeout):
            while self._tasks or self._waiting:
                await self._idle.wait()

    @property
    def busy(self) -> int:
        return len(self._tasks) + len(self._waiting)

    # --- pushing ---------------------------------------------------------------------

    def submit(self, entries: list[LogEntry]) -> None:
        """Push ``entries`` in the background (in order, unless ``reorder`` is on)."""
        entries = [e for e in entries if self._tenants[e.tenant].webhook_url]
        if not entries:
            return
        if self._session is None:
            self._waiting.extend(entries)
            self._idle.clear()
            return
        if self._faults.reorder:
            entries = list(entries)
            self._rng.shuffle(entries)
        for entry in entries:
            copies = 2 if self._rng.random() < self._faults.duplicate_rate else 1
            for copy in range(copies):
                self._spawn(self._push(entry, copy))

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        self._idle.clear()
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook push failed unexpectedly", exc_info=task.exception())
        if not self._tasks and not self._waiting:
            self._idle.set()

    async def _push(self, entry: LogEntry, copy: int) -> None:
        faults = self._faults
        hold = faults.delay
        if faults.reorder:
            hold += self._rng.uniform(0.0, faults.reorder_window)
        if hold > 0:
            await asyncio.sleep(hold)
        if faults.webhooks_enabled and self._rng.random() < faults.drop_rate:
            self._record(
                WebhookAttempt(
                    entry.tenant,
                    entry.event_id,
                    entry.log_id,
                    1,
                    time.time(),
                    error="dropped",
                    copy=copy,
                )
            )
            self._finish(entry, delivered=False)
            return
        for attempt in range(1, MAX_ATTEMPTS + 1):
            if not faults.webhooks_enabled:
                if attempt > 1:  # stopped between retries: Chert gives up on it
                    self._finish(entry, delivered=False)
                return  # never attempted: the row stays "pending"
            result = await self.attempt(entry, attempt, copy=copy)
            if result.delivered:
                self._finish(entry, delivered=True)
                return
            if result.status is not None and 400 <= result.status < 500:
                break  # Chert never retries a 4xx
            if attempt < MAX_ATTEMPTS:
                await asyncio.sleep(self._backoff * 2 ** (attempt - 1))
        self._finish(entry, delivered=False)

    async def attempt(
        self, entry: LogEntry, attempt: int, *, copy: int = 0, replay: bool = False
    ) -> WebhookAttempt:
        """One signed POST of ``entry`` to its tenant's webhook URL, recorded."""
        tenant = self._tenants[entry.tenant]
        assert tenant.webhook_url is not None
        session = self._session
        if session is None:
            raise RuntimeError("the simulator is not started")
        legacy = tenant.legacy_signature or self._faults.legacy_signature
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Webhook-Event": str(entry.row["type"]),
            "X-Webhook-Event-Id": entry.event_id,
            "X-Webhook-Subscription-Id": tenant.subscription_id,
        }
        headers.update(webhook_headers(tenant.webhook_secret, entry.body, legacy=legacy))
        record = WebhookAttempt(
            entry.tenant,
            entry.event_id,
            entry.log_id,
            attempt,
            time.time(),
            copy=copy,
            replay=replay,
        )
        started = time.monotonic()
        try:
            async with session.post(
                tenant.webhook_url, data=entry.body, headers=headers, timeout=self._timeout
            ) as resp:
                await resp.read()
                record.status = resp.status
        except TimeoutError:
            record.error = "timeout"
        except aiohttp.ClientError as e:
            record.error = type(e).__name__
        record.duration_ms = int((time.monotonic() - started) * 1000)
        entry.row["delivery"]["attempts"].append(
            {
                "at": iso_ms(int(record.time * 1000)),
                "status": record.status,
                "duration_ms": record.duration_ms,
                "subscription_id": tenant.subscription_id,
            }
            | ({"error": record.error} if record.error else {})
        )
        self._record(record)
        return record

    def _record(self, record: WebhookAttempt) -> None:
        self.attempts.append(record)
        for listener in list(self.listeners):
            try:
                listener(record)
            except Exception:
                log.exception("webhook attempt listener failed")

    @staticmethod
    def _finish(entry: LogEntry, *, delivered: bool) -> None:
        delivery = entry.row["delivery"]
        if delivered:
            if delivery["status"] != "delivered":
                delivery["status"] = "delivered"
                delivery["delivered_at"] = iso_ms(int(time.time() * 1000))
        elif delivery["status"] != "delivered":
            delivery["status"] = "failed"

    async def replay(self, entry: LogEntry) -> WebhookAttempt | None:
        """One attempt now, for ``POST /events/{id}/replay``; ``None`` if webhooks are off."""
        if not self._faults.webhooks_enabled:
            return None
        result = await self.attempt(entry, 1, replay=True)
        self._finish(entry, delivered=result.delivered)
        return result
