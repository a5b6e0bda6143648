"""The simulator itself: one aiohttp server that plays Chert for a set of tenants.

``Simulator`` ties the parts together — the event generator, the event log, the
webhook pusher, the events API, the SSE hub and the control API — and is what
tests and ``chert-relay simulate`` drive::

    sim = Simulator(tenants=[SimTenant(...)], stream_lifetime=60.0)
    await sim.start(host="127.0.0.1", port=0)    # sim.base_url = http://…/api/v1
    rows = sim.emit("acme-7a3f", type="message.received", count=3)
    await sim.wait_idle(timeout=10)
    await sim.stop()

Like Chert, it logs every event before it tries to deliver it: ``emit`` returns
once the rows are in the log; pushes happen in the background under
:attr:`faults`.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
from aiohttp import web

from relay.simulator.api import PREFIX, EventsApi
from relay.simulator.control import ControlApi
from relay.simulator.eventlog import EventLog
from relay.simulator.generator import EventGenerator
from relay.simulator.models import (
    DELIVERY_STATUSES,
    ApiRequest,
    Faults,
    SimTenant,
    WebhookAttempt,
    iso_ms,
)
from relay.simulator.pusher import WebhookPusher
from relay.simulator.stream import StreamHub

log = logging.getLogger(__name__)


class Simulator:
    """A local Chert stand-in. See the module docstring."""

    def __init__(
        self,
        tenants: Iterable[SimTenant],
        *,
        stream_lifetime: float = 60.0,
        heartbeat_interval: float = 15.0,
        webhook_retry_backoff: float = 1.0,
        webhook_timeout: float = 10.0,
        seed: int | None = None,
        max_log_rows: int | None = None,
    ) -> None:
        self.tenants: dict[str, SimTenant] = {}
        for tenant in tenants:
            if tenant.slug in self.tenants:
                raise ValueError(f"tenant {tenant.slug!r} is listed twice")
            self.tenants[tenant.slug] = tenant
        if not self.tenants:
            raise ValueError("the simulator needs at least one tenant")
        if stream_lifetime <= 0 or heartbeat_interval <= 0:
            raise ValueError("stream_lifetime and heartbeat_interval must be positive")
        self._faults = Faults()
        self._rng = random.Random(seed)
        self._generator = EventGenerator(self._rng)
        self.event_log = EventLog(max_log_rows)
        self.api_requests: list[ApiRequest] = []
        self._pusher = WebhookPusher(
            tenants=self.tenants,
            faults=self._faults,
            rng=self._rng,
            retry_backoff=webhook_retry_backoff,
            timeout=webhook_timeout,
        )
        self._api = EventsApi(
            tenants=self.tenants,
            log=self.event_log,
            pusher=self._pusher,
            faults=self._faults,
            rng=self._rng,
            requests=self.api_requests,
        )
        self._streams = StreamHub(
            log=self.event_log,
            api=self._api,
            lifetime=stream_lifetime,
            heartbeat=heartbeat_interval,
        )
        self._control = ControlApi(self)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""  # http://host:port
        self.base_url = ""  # http://host:port/api/v1
        self.emit_listeners: list[Callable[[dict[str, Any]], None]] = []

    # --- what tests read ---------------------------------------------------------------

    @property
    def faults(self) -> Faults:
        """The live fault switches; changing a field takes effect at once."""
        return self._faults

    @faults.setter
    def faults(self, value: Faults) -> None:
        # The parts hold this one object: copy the new values into it.
        self._faults.update(value.to_dict())

    @property
    def webhook_attempts(self) -> list[WebhookAttempt]:
        """Every push attempt so far (dropped pushes too, with ``error="dropped"``)."""
        return self._pusher.attempts

    @property
    def attempt_listeners(self) -> list[Callable[[WebhookAttempt], None]]:
        return self._pusher.listeners

    @property
    def stream_lifetime(self) -> float:
        return self._streams.lifetime

    @stream_lifetime.setter
    def stream_lifetime(self, value: float) -> None:  # for connections opened from now on
        if value <= 0:
            raise ValueError("stream_lifetime must be positive")
        self._streams.lifetime = value

    @property
    def heartbeat_interval(self) -> float:
        return self._streams.heartbeat

    @heartbeat_interval.setter
    def heartbeat_interval(self, value: float) -> None:  # for connections opened from now on
        if value <= 0:
            raise ValueError("heartbeat_interval must be positive")
        self._streams.heartbeat = value

    @property
    def open_streams(self) -> int:
        return self._streams.open

    def log(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's event log rows, oldest first (copies)."""
        return [e.snapshot() for e in self.event_log.entries(tenant)]

    # --- lifecycle -----------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._api.middleware])
        router = app.router
        router.add_get(f"{PREFIX}/events", self._api.list_events)
        router.add_get(f"{PREFIX}/events/stream", self._streams.handle)
        router.add_get(PREFIX + "/events/{id}", self._api.get_event)
        router.add_post(PREFIX + "/events/{id}/replay", self._api.replay)
        self._control.add_routes(app)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if self._runner is not None:
            raise RuntimeError("the simulator is already started")
        runner = web.AppRunner(
            self.app(), handle_signals=False, access_log=None, shutdown_timeout=2.0
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{shown}:{bound_port}"
        self.base_url = self.url + PREFIX
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=100), auto_decompress=False
        )
        self._pusher.start(self._session)
        log.info("simulator listening on %s", self.url)

    async def stop(self) -> None:
        """Cancel pending pushes, end open streams, close the server."""
        await self._pusher.stop()
        self._streams.stop_all()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Simulator:
        """Start on 127.0.0.1 and a free port, unless already started."""
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- driving it ----------------------------------------------------------------------

    def emit(
        self, tenant: str, type: str = "message.received", count: int = 1
    ) -> list[dict[str, Any]]:
        """Log ``count`` new events for ``tenant``, then push them in the background.

        Returns copies of the rows as logged (delivery status ``pending``, or
        ``dev_inbox`` for a tenant without a webhook URL).
        """
        sim_tenant = self.tenants.get(tenant)
        if sim_tenant is None:
            raise KeyError(f"no simulated tenant {tenant!r}")
        if count < 1:
            raise ValueError("count must be at least 1")
        entries = []
        for _ in range(count):
            ms = self.event_log.next_ms(tenant)
            made = self._generator.make(tenant, type, iso_ms(ms), ms)
            body = json.dumps(made["payload"], separators=(",", ":")).encode()
            row = {
                "id": f"evt_{self._generator.ulid(ms)}",
                "type": type,
                "event_id": made["event_id"],
                "lead_id": made["lead_id"],
                "convo_id": made["convo_id"],
                "payload": made["payload"],
                "delivery": {
                    "status": "pending" if sim_tenant.webhook_url else "dev_inbox",
                    "url": sim_tenant.webhook_url,
                    "attempts": [],
                    "delivered_at": None,
                },
            }
            entries.append(self.event_log.append(tenant, ms, row, body))
        rows = [e.snapshot() for e in entries]
        for listener in list(self.emit_listeners):
            for row in rows:
                listener(row)
        self._pusher.submit(entries)
        return rows

    def emit_random(self, tenant: str, types: tuple[str, ...] | None = None) -> dict[str, Any]:
        """One event of a random type (uniform over ``types``, else Chert-like weights)."""
        return self.emit(tenant, type=self._generator.pick_type(types))[0]

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until every pending push (retries included) has finished."""
        await self._pusher.wait_idle(timeout)

    def disconnect_streams(self) -> int:
        """Drop every open SSE connection at once (no ``event: close``); returns how many."""
        return self._streams.disconnect_all()

    def stats(self) -> dict[str, Any]:
        tenants: dict[str, Any] = {}
        for slug in self.tenants:
            statuses = Counter(e.row["delivery"]["status"] for e in self.event_log.entries(slug))
            tenants[slug] = {"events": sum(statuses.values())} | {
                s: statuses.get(s, 0) for s in DELIVERY_STATUSES
            }
        attempts = self._pusher.attempts
        classes = Counter(_attempt_class(a) for a in attempts)
        api_status = Counter(str(r.status) for r in self.api_requests)
        return {
            "tenants": tenants,
            "webhooks": {
                "attempts": len(attempts) - classes.get("dropped", 0),
                "delivered": classes.get("2xx", 0),
                "client_errors": classes.get("4xx", 0),
                "server_errors": classes.get("5xx", 0),
                "connection_errors": classes.get("error", 0),
                "dropped": classes.get("dropped", 0),
                "in_flight": self._pusher.busy,
            },
            "api": {"requests": len(self.api_requests), "by_status": dict(api_status)},
            "streams": {"open": self._streams.open, "opened": self._streams.connections},
            "faults": self.faults.to_dict(),
        }


def _attempt_class(attempt: WebhookAttempt) -> str:
    if attempt.error == "dropped":
        return "dropped"
    if attempt.status is None:
        return "error"
    return f"{attempt.status // 100}xx"
