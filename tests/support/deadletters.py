"""Real dead letters for the admin tests: two tenants whose sinks refuse with 400, a
worker that turns every delivery into a ``rejected`` dead letter, tokens, and the
admin's count of what it refused."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from relay.config import Config, parse_config
from relay.store.deadletters import DeadLetterStore, Filter
from tests.support.common import (
    OTHER_SECRET,
    TENANT,
    WEBHOOK_SECRET,
    config_dict,
    metric_sample,
    wait_for,
)
from tests.support.delivery import FAST_WORKER, event, runtime, sink_conf, worker

OTHER = "other-1"
ADMIN_TOKEN = "legacy-admin-token-0123456789abcdef"
READ_ACME = "read-acme-token-0123456789abcdef"
REPLAY_ACME = "replay-acme-token-0123456789abcdef"
READ_ALL = "read-all-token-0123456789abcdef0"
TOKENS = [
    {"name": "acme-read", "token": READ_ACME, "scope": "read", "tenants": [TENANT]},
    {"name": "acme-replay", "token": REPLAY_ACME, "scope": "replay", "tenants": [TENANT]},
    {"name": "monitoring", "token": READ_ALL, "scope": "read", "tenants": ["*"]},
]


def two_tenants(redis_url: str, sink_url: str, **admin: Any) -> Config:
    """acme-7a3f with sinks crm and all, other-1 with sink s, all at ``sink_url``."""
    return parse_config(two_tenants_data(redis_url, sink_url, **admin), env={})


def two_tenants_data(redis_url: str, sink_url: str, **admin: Any) -> dict[str, Any]:
    """:func:`two_tenants` as the dict a TOML file is written from."""
    tenants = [
        {
            "slug": TENANT,
            "webhook_secrets": [WEBHOOK_SECRET],
            "poll": {"mode": "off"},
            "sinks": [sink_conf("crm", sink_url), sink_conf("all", sink_url)],
        },
        {
            "slug": OTHER,
            "webhook_secrets": [OTHER_SECRET],
            "poll": {"mode": "off"},
            "sinks": [sink_conf("s", sink_url)],
        },
    ]
    admin_section = {"token": ADMIN_TOKEN, "tokens": TOKENS, **admin}
    return config_dict(
        redis_url=redis_url, tenants=tenants, worker=FAST_WORKER, admin=admin_section
    )


async def make_dead_letters(
    redis: Redis, config: Config, events: dict[str, list[tuple[str, str]]]
) -> None:
    """Ingest ``events`` (tenant → [(event id, type)]) and run a worker until every
    delivery is a dead letter (the sinks must refuse them)."""
    rt = runtime(redis, config)
    expected = 0
    for tenant, items in events.items():
        t = config.tenant(tenant)
        assert t is not None
        for event_id, etype in items:
            await rt.ingestor.ingest(tenant, event(event_id, etype), "webhook")
            expected += sum(1 for s in t.sinks if s.matches(etype))
    store = DeadLetterStore(redis, config)

    async def all_dead() -> bool:
        return len(await store.find(Filter())) >= expected

    async with worker(rt):
        await wait_for(all_dead, 20)


async def refusals(client: TestClient[Any, Any], reason: str) -> float:
    """How many requests the admin refused for ``reason``, as its ``/metrics`` says."""
    r = await client.get("/metrics")
    return metric_sample(await r.text(), "chert_relay_admin_refusals_total", reason=reason)
