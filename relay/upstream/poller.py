"""The poller role: one :class:`~relay.upstream.tenant_poller.TenantPoller` per polled tenant.

It starts a task per tenant whose ``poll.mode`` is not ``off``, follows the
configuration on reload (tenants added, removed or changed), and on stop cancels every
task — a window cut short repeats later — and waits (bounded) for them to release
their leases.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from relay.config import Config
from relay.runtime import Runtime
from relay.upstream.tenant_poller import TenantPoller

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 5.0


class Poller:
    """The ``poller`` role: one :class:`TenantPoller` task per polled tenant."""

    name = "poller"

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._config = rt.config
        self._session: aiohttp.ClientSession | None = None
        self.tenants: dict[str, TenantPoller] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._retired: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        rt.metrics.prepare_poller(rt.config)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": "chert-relay"}, raise_for_status=False
        )

    async def run(self) -> None:
        if self._session is None:
            await self.start()
        self._sync()
        await self._stop.wait()

    def reload(self, config: Config) -> None:
        self._config = config
        self._rt.metrics.prepare_poller(config)
        if self._session is not None and not self._stop.is_set():
            self._sync()

    def _sync(self) -> None:
        """Start, update or stop tenant tasks to match the configuration."""
        assert self._session is not None
        wanted = {t.slug: t for t in self._config.tenants if t.poll.mode != "off"}
        for slug in list(self._tasks):
            if slug not in wanted:
                log.info("tenant %s: polling turned off", slug)
                task = self._tasks.pop(slug)
                self.tenants.pop(slug)
                task.cancel()
                # Still releasing its lease: stop() waits for it too.
                self._retired.add(task)
                task.add_done_callback(self._retired.discard)
        for slug, tenant in wanted.items():
            if slug in self.tenants:
                self.tenants[slug].set_config(tenant)
                continue
            tp = TenantPoller(self._rt, tenant, self._session)
            self.tenants[slug] = tp
            task = asyncio.create_task(tp.run(), name=f"poller:{slug}")
            task.add_done_callback(_log_crash)
            self._tasks[slug] = task

    def status(self) -> str:
        modes = ", ".join(f"{slug} {tp.mode or 'starting'}" for slug, tp in self.tenants.items())
        return f"polling {modes}" if modes else ""

    async def stop(self) -> None:
        """Cancel every tenant task (a window cut short repeats later) and release the leases."""
        self._stop.set()
        tasks = [*self._tasks.values(), *self._retired]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
            if pending:
                log.warning("%d tenant poller(s) did not stop in time", len(pending))
        if self._session is not None:
            await self._session.close()
            self._session = None


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s stopped: unexpected failure", task.get_name(), exc_info=task.exception())


def make_poller(rt: Runtime) -> Poller:
    """Role factory for :func:`relay.cli.role_factories`."""
    return Poller(rt)
