"""Helpers shared by the poller, Chert API and backfill tests (no tests of its own).

The simulator plays Chert; the relay under test is the real ``Service`` run in-process
with the receiver and poller roles, on the suite's real redis-server. What reached the
sinks is read from what ingest enqueued (arq's queue and the event hashes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web
from redis.asyncio import Redis

from relay.cli import role_factories
from relay.config import Config, parse_config
from relay.keys import Keys
from relay.metrics import Metrics
from relay.service import Service
from relay.simulator import SimTenant, Simulator
from tests.support.common import OTHER_SECRET, TENANT, WEBHOOK_SECRET, config_dict, wait_for

API_SECRET = "5e0c9a7d3b1f48a6c2e4f6081a3b5c7d"
OTHER_API_SECRET = "a1b2c3d4e5f60718293a4b5c6d7e8f90"
PREFIX = "chert-relay"
SINKS = [
    {"name": "crm", "url": "http://127.0.0.1:9/crm", "events": ["message.received"]},
    {"name": "all", "url": "http://127.0.0.1:9/all", "events": ["*"]},
]


def sim_tenants() -> list[SimTenant]:
    return [
        SimTenant(slug=TENANT, api_secret=API_SECRET, webhook_secret=WEBHOOK_SECRET),
        SimTenant(slug="other-1", api_secret=OTHER_API_SECRET, webhook_secret=OTHER_SECRET),
    ]


@contextlib.asynccontextmanager
async def simulator(**kwargs: Any) -> AsyncIterator[Simulator]:
    sim = Simulator(sim_tenants(), **kwargs)
    await sim.start(host="127.0.0.1", port=0)
    try:
        yield sim
    finally:
        await sim.stop()


def poll_section(mode: str, **poll: Any) -> dict[str, Any]:
    """Short intervals for tests; anything in ``poll`` overrides."""
    base: dict[str, Any] = {
        "mode": mode,
        "interval": 0.2,
        "lapse_after": 1.0,
        "reconcile_every": 30.0,
        "overlap": 5.0,
        "lease_ttl": 2.0,
        "stale_after": 0.5,
        "auth_backoff": 30.0,
        "sse_idle_timeout": 3.0,
        "page_size": 7,
    }
    base.update(poll)
    return base


def relay_config(
    redis_url: str,
    base_url: str,
    mode: str = "fallback",
    *,
    api: dict[str, Any] | None = None,
    other_mode: str = "off",
    **poll: Any,
) -> Config:
    """Tenant acme-7a3f polled in ``mode`` from the simulator; other-1 as ``other_mode``."""
    api_section = {
        "base_url": base_url,
        "auth": "hmac",
        "signing_secret": API_SECRET,
        "max_backoff": 1.0,
    }
    api_section.update(api or {})
    tenants = [
        {
            "slug": TENANT,
            "webhook_secrets": [WEBHOOK_SECRET],
            "sinks": SINKS,
            "api": api_section,
            "poll": poll_section(mode, **poll),
        },
        {
            "slug": "other-1",
            "webhook_secrets": [OTHER_SECRET],
            "sinks": [{"name": "s", "url": "http://127.0.0.1:9/s"}],
            "api": {"base_url": base_url, "signing_secret": OTHER_API_SECRET, "max_backoff": 1.0},
            "poll": poll_section(other_mode),
        },
    ]
    return parse_config(config_dict(redis_url=redis_url, tenants=tenants), env={})


@contextlib.asynccontextmanager
async def running_relay(
    config: Config, roles: tuple[str, ...] = ("receiver", "poller")
) -> AsyncIterator[Service]:
    """The real service in-process; stopped (gracefully) on exit."""
    service = Service(config, roles=roles, extra_roles=role_factories())
    task = asyncio.create_task(service.run())
    waiter = asyncio.create_task(service.started.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiter.cancel()
        task.result()
    assert waiter in done, "service did not start"
    try:
        yield service
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 20)


def webhook_url(service: Service, tenant: str = TENANT) -> str:
    role: Any = service.roles["receiver"]
    host, port = role.addresses[0][:2]
    return f"http://{host}:{port}/webhooks/chert/{tenant}"


def metrics(service: Service) -> Metrics:
    assert service.runtime is not None
    return service.runtime.metrics


def sample(m: Metrics, name: str, **labels: str) -> float:
    value = m.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def ingested(m: Metrics, tenant: str = TENANT, outcome: str = "new") -> float:
    """Events ingested for ``tenant`` with ``outcome`` over every source."""
    total = 0.0
    for source in ("webhook", "poll", "sse", "backfill", "replay"):
        total += sample(
            m, "chert_relay_events_ingested_total", tenant=tenant, source=source, outcome=outcome
        )
    return total


async def enqueued(redis: Redis, tenant: str = TENANT) -> Counter[tuple[str, str]]:
    """(sink, event_id) → number of jobs in the arq queue for ``tenant``."""
    out: Counter[tuple[str, str]] = Counter()
    head = f"{PREFIX}:{tenant}:"
    for raw in await redis.zrange(Keys(PREFIX).queue, 0, -1):
        job_id = raw.decode()
        if job_id.startswith(head):
            sink, _, event_id = job_id[len(head) :].partition(":")
            out[(sink, event_id)] += 1
    return out


def expected_jobs(rows: list[dict[str, Any]]) -> Counter[tuple[str, str]]:
    """One job per matching sink (crm takes message.received; all takes everything)."""
    out: Counter[tuple[str, str]] = Counter()
    for row in rows:
        out[("all", row["event_id"])] += 1
        if row["type"] == "message.received":
            out[("crm", row["event_id"])] += 1
    return out


async def wait_enqueued(redis: Redis, rows: list[dict[str, Any]], timeout: float = 20.0) -> None:
    want = expected_jobs(rows)

    async def check() -> bool:
        got = await enqueued(redis)
        return all(got[k] >= 1 for k in want)

    await wait_for(check, timeout=timeout, interval=0.05)


def messages(
    caplog: Any, logger: str = "relay.upstream.tenant_poller", level: int = logging.INFO
) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno >= level]


# --- stand-ins for a misbehaving Chert (the simulator is a correct one) -------------------


class PagedChert:
    """A tiny real aiohttp server answering ``GET /api/v1/events`` from a fixed cursor chain.

    ``pages`` maps the cursor a request carries (``None`` for the first page) to the rows
    it gets and the ``next_cursor`` it names — a chain may repeat a cursor, which Chert
    must never do. Requests need ``Authorization: Bearer API_SECRET`` (``auth = "bearer"``).
    """

    def __init__(self) -> None:
        self.pages: dict[str | None, tuple[list[dict[str, Any]], str | None]] = {}
        self.requests: list[dict[str, str]] = []  # the query of every accepted request
        self.base_url = ""

    async def events(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {API_SECRET}":
            error = {"status": 401, "code": 2004, "message": "bad key", "retryable": False}
            return web.json_response({"success": False, "error": error}, status=401)
        self.requests.append(dict(request.query))
        rows, next_cursor = self.pages[request.query.get("cursor")]
        return web.json_response({"events": rows, "next_cursor": next_cursor, "count": len(rows)})


@contextlib.asynccontextmanager
async def serve_api(app: web.Application) -> AsyncIterator[str]:
    """``app`` served on a free local port; yields its ``…/api/v1`` base URL."""
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}/api/v1"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def paged_chert() -> AsyncIterator[PagedChert]:
    chert = PagedChert()
    app = web.Application()
    app.router.add_get("/api/v1/events", chert.events)
    async with serve_api(app) as chert.base_url:
        yield chert


class SilentServer:
    """Accepts connections and reads each request's head, but never answers.

    ``paths`` lists the request target of every request read, in order.
    """

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.base_url = ""
        self.writers: set[asyncio.StreamWriter] = set()
        self.handlers: set[asyncio.Task[Any]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self.handlers.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.paths.append(head.split(b" ", 2)[1].decode())
            await reader.read()  # until the client gives up and closes
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()
            if task is not None:
                self.handlers.discard(task)

    def count(self, prefix: str) -> int:
        return sum(1 for p in self.paths if p.startswith(prefix))


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[SilentServer]:
    silent = SilentServer()
    server = await asyncio.start_server(silent.handle, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    silent.base_url = f"http://{host}:{port}/api/v1"
    try:
        yield silent
    finally:
        server.close()
        for writer in list(silent.writers):
            writer.close()
        if silent.handlers:
            await asyncio.wait(list(silent.handlers), timeout=10)
        await server.wait_closed()


def write_poll_config(path: Path, redis_url: str, base_url: str, lease_ttl: float) -> None:
    def tenant(slug: str, webhook_secret: str, api_secret: str) -> str:
        return f"""
[[tenants]]
slug = "{slug}"
webhook_secrets = ["{webhook_secret}"]
[tenants.api]
base_url = "{base_url}"
signing_secret = "{api_secret}"
max_backoff = 1.0
[tenants.poll]
mode = "always"
interval = 0.2
overlap = 5.0
lease_ttl = {lease_ttl}
[[tenants.sinks]]
name = "crm"
url = "http://127.0.0.1:9/crm"
events = ["message.received"]
[[tenants.sinks]]
name = "all"
url = "http://127.0.0.1:9/all"
"""

    path.write_text(
        f"""
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[redis]
url = "{redis_url}"
[relay]
dedupe_ttl = "1h"
"""
        + tenant(TENANT, WEBHOOK_SECRET, API_SECRET)
        + tenant("other-1", OTHER_SECRET, OTHER_API_SECRET)
    )
