"""End to end: simulator → receiver/poller → ingest → worker → a real aiohttp sink.

With webhooks dropped, duplicated and reordered, and then stopped altogether, every
event reaches each sink exactly once.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from redis.asyncio import Redis

from relay.config import Config, parse_config
from tests.support.common import OTHER_SECRET, TENANT, WEBHOOK_SECRET, config_dict, wait_for
from tests.support.upstream import (
    API_SECRET,
    OTHER_API_SECRET,
    poll_section,
    running_relay,
    simulator,
    webhook_url,
)


class Sink:
    """A real HTTP sink recording (path, webhook-id) of every request it answers 2xx."""

    def __init__(self) -> None:
        self.received: Counter[tuple[str, str]] = Counter()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.received[(request.path, request.headers["webhook-id"])] += 1
        return web.Response(status=204)


@contextlib.asynccontextmanager
async def sink_server() -> AsyncIterator[Sink]:
    sink = Sink()
    app = web.Application()
    app.router.add_post("/{name}", sink.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    sink.url = f"http://{host}:{port}"
    try:
        yield sink
    finally:
        await runner.cleanup()


def e2e_config(redis_url: str, base_url: str, sink_url: str, **poll: Any) -> Config:
    sinks = [
        {"name": "crm", "url": f"{sink_url}/crm", "events": ["message.received"]},
        {"name": "all", "url": f"{sink_url}/all", "events": ["*"]},
    ]
    tenants = [
        {
            "slug": TENANT,
            "webhook_secrets": [WEBHOOK_SECRET],
            "sinks": sinks,
            "api": {"base_url": base_url, "signing_secret": API_SECRET, "max_backoff": 1.0},
            "poll": poll_section("fallback", **poll),
        },
        {
            "slug": "other-1",
            "webhook_secrets": [OTHER_SECRET],
            "poll": {"mode": "off"},
            "api": {"signing_secret": OTHER_API_SECRET},
            "sinks": [{"name": "s", "url": f"{sink_url}/s"}],
        },
    ]
    return parse_config(
        config_dict(redis_url=redis_url, tenants=tenants, worker={"poll_delay": 0.02}), env={}
    )


def wanted(rows: list[dict[str, Any]]) -> Counter[tuple[str, str]]:
    out: Counter[tuple[str, str]] = Counter()
    for row in rows:
        out[("/all", row["event_id"])] += 1
        if row["type"] == "message.received":
            out[("/crm", row["event_id"])] += 1
    return out


async def test_every_event_reaches_each_sink_exactly_once(redis_url: str, redis: Redis) -> None:
    async with simulator(seed=11) as sim, sink_server() as sink:
        config = e2e_config(redis_url, sim.base_url, sink.url, lapse_after=2.0, reconcile_every=0.5)
        async with running_relay(config, roles=("receiver", "poller", "worker")) as service:
            sim.tenants[TENANT].webhook_url = webhook_url(service)
            sim.faults.drop_rate = 0.3
            sim.faults.duplicate_rate = 0.3
            sim.faults.reorder = True
            rows = []
            for kind in ("message.received", "reaction.added", "lead_reply"):
                rows += sim.emit(TENANT, type=kind, count=6)
            await wait_for(lambda: sink.received.keys() >= wanted(rows).keys(), timeout=30)
            # Webhooks stop altogether: the rest arrives by polling.
            sim.faults.webhooks_enabled = False
            later = sim.emit(TENANT, count=5)
            rows += later
            await wait_for(lambda: sink.received.keys() >= wanted(rows).keys(), timeout=30)
            await sim.wait_idle(timeout=20)
            assert sink.received == wanted(rows)
