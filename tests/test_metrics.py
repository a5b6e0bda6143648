"""Metrics that must be right in every process, not only in the one that saw the event:
values read from Redis at scrape time, children created before their first increment,
and the signals that tell "a worker cannot read Redis" from "no worker"."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from relay.config import Config
from relay.delivery.collector import DeliveryCollector
from relay.ingest.ingestor import Ingestor
from relay.keys import Keys
from relay.metrics import Metrics
from relay.service import Service
from relay.store.client import connect
from relay.store.embedded import EmbeddedRedis
from relay.store.endpoint import Endpoint
from tests.support.common import TENANT, config_dict, envelope, make_config, signed
from tests.support.delivery import event
from tests.support.upstream import running_relay, webhook_url

ROOT = Path(__file__).resolve().parent.parent
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def admin_url(service: Service) -> str:
    role: Any = service.roles["admin"]
    host, port = role.addresses[0][:2]
    return f"http://{host}:{port}"


async def scrape(url: str) -> Samples:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
        assert r.status == 200
        return parse(await r.text())


def config_for(redis_url: str, **admin: Any) -> Config:
    return make_config(redis_url=redis_url, admin=admin)


async def test_last_webhook_and_watermark_come_from_redis_in_every_process(
    redis_url: str, redis: Redis
) -> None:
    """A webhook taken by one process shows in another's metrics; so does a watermark
    another process's poller wrote."""
    config = config_for(redis_url)
    async with (
        running_relay(config, ("receiver", "admin")) as receiving,
        running_relay(config, ("poller", "admin")) as polling,
    ):
        before = await scrape(admin_url(polling))
        assert sample(before, "chert_relay_last_webhook_timestamp_seconds", tenant=TENANT) is None
        body, headers = signed(envelope("metrics:scrape:1"))
        async with (
            aiohttp.ClientSession() as s,
            s.post(webhook_url(receiving), data=body, headers=headers) as r,
        ):
            assert r.status == 202
        stored = int(await redis.get(Keys("chert-relay").last_webhook(TENANT))) / 1000
        await redis.set(Keys("chert-relay").watermark("other-1"), "1767225600.5")
        for service in (receiving, polling):
            found = await scrape(admin_url(service))
            name = "chert_relay_last_webhook_timestamp_seconds"
            assert sample(found, name, tenant=TENANT) == stored
            assert sample(found, name, tenant="other-1") is None  # never had one
            name = "chert_relay_poll_watermark_timestamp_seconds"
            assert sample(found, name, tenant="other-1") == 1767225600.5


async def test_redis_up_is_measured_at_each_scrape(
    make_redis_server: Callable[[], Awaitable[EmbeddedRedis]],
) -> None:
    server = await make_redis_server()
    config = config_for(server.url)
    async with running_relay(config, ("admin",)) as service:
        url = admin_url(service)
        assert sample(await scrape(url), "chert_relay_redis_up") == 1
        await server.stop()
        # No /readyz call in between: the scrape itself checks.
        assert sample(await scrape(url), "chert_relay_redis_up") == 0
        await server.start()
        assert sample(await scrape(url), "chert_relay_redis_up") == 1


async def test_a_worker_says_whether_it_could_read_the_delivery_state(
    make_redis_server: Callable[[], Awaitable[EmbeddedRedis]],
) -> None:
    server = await make_redis_server()
    client = connect(server.url, timeout=1.0)
    metrics = Metrics()
    config = config_for(server.url)
    collector = DeliveryCollector(Endpoint(url=server.url).sync_client(), config)
    metrics.registry.register(collector)
    try:
        found = parse(metrics.render().decode())
        assert sample(found, "chert_relay_delivery_state_readable") == 1
        assert sample(found, "chert_relay_queue_ready_jobs") == 0
        assert sample(found, "chert_relay_event_log_records") == 0
        ingestor = Ingestor(client, config)
        for i in ("m1", "m2"):
            await ingestor.ingest(TENANT, event(i), "webhook")
        found = parse(metrics.render().decode())
        assert sample(found, "chert_relay_event_log_records") == 2
        assert sample(found, "chert_relay_queue_ready_jobs") == 4  # two sinks each
        # a record is written as its deliveries end: none yet
        assert await client.get(Keys("chert-relay").event_log_bytes) is None
        assert sample(found, "chert_relay_event_log_bytes") == 0
        await server.stop()
        found = parse(metrics.render().decode())
        assert sample(found, "chert_relay_delivery_state_readable") == 0
        assert sample(found, "chert_relay_queue_ready_jobs") is None
    finally:
        collector.close()
        await client.aclose()


def test_the_children_alerts_watch_exist_at_zero_before_their_first_event() -> None:
    metrics = Metrics()
    tenants = config_dict()["tenants"]
    tenants[0]["poll"] = {"mode": "always", "interval": 1}
    tenants[0]["api"] = {"signing_secret": "x" * 32}
    config = make_config(tenants=tenants)
    metrics.prepare_receiver(config)
    metrics.prepare_poller(config)
    metrics.prepare_worker(config)
    found = parse(metrics.render().decode())
    for reason in ("bad_signature", "stale_timestamp", "redis_unavailable"):
        name = "chert_relay_webhook_rejections_total"
        assert sample(found, name, tenant=TENANT, reason=reason) == 0
    name = "chert_relay_deliveries_total"
    for outcome in ("missing", "expired"):
        for tenant, sink in ((TENANT, "crm"), ("other-1", "s")):
            labels = {"tenant": tenant, "sink": sink, "outcome": outcome, "class": "none"}
            assert sample(found, name, **labels) == 0
    for cls in ("rejected", "exhausted", "gone"):
        name = "chert_relay_dead_lettered_total"
        assert sample(found, name, tenant=TENANT, sink="all", **{"class": cls}) == 0
    name = "chert_relay_poll_windows_total"
    assert sample(found, name, tenant=TENANT, outcome="auth_error") == 0
    assert sample(found, name, tenant="other-1", outcome="ok") is None  # not polled


def test_poll_configured_names_each_tenants_mode_and_follows_a_reload() -> None:
    metrics = Metrics()
    tenants = config_dict()["tenants"]
    tenants[0]["poll"] = {"mode": "sse"}
    tenants[0]["api"] = {"signing_secret": "x" * 32}
    metrics.prepare_poller(make_config(tenants=tenants))
    found = parse(metrics.render().decode())
    name = "chert_relay_poll_configured"
    assert sample(found, name, tenant=TENANT, mode="sse") == 1
    assert sample(found, name, tenant=TENANT, mode="fallback") == 0
    assert sample(found, name, tenant="other-1", mode="off") == 1
    metrics.prepare_poller(make_config(tenants=tenants[:1]))  # other-1 removed
    found = parse(metrics.render().decode())
    assert sample(found, name, tenant="other-1", mode="off") is None
    assert sample(found, name, tenant=TENANT, mode="sse") == 1


def test_the_readme_lists_exactly_the_children_that_exist_at_zero() -> None:
    """The README's table of counter children at 0 is what a relay serves: no child it
    lists is missing (``webhooks_total{outcome="error"}`` was), and none is left out."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| counter | children at `0`") :].split("\n\n")[0]
    claimed: dict[str, tuple[str, set[str]]] = {}
    for row in table.splitlines()[2:]:
        counter, cell = (c.strip() for c in row.strip("|").split("|"))
        said = cell.split(" — ")[0]  # what follows is a note, not a child
        label, _, listed = said.partition(":")
        claimed[counter.strip("`")] = (label.strip("`"), set(re.findall(r"`([^`]+)`", listed)))
    metrics = Metrics()
    tenants = config_dict()["tenants"]
    tenants[0]["poll"] = {"mode": "always", "interval": 1}
    tenants[0]["api"] = {"signing_secret": "x" * 32}
    config = make_config(tenants=tenants)
    metrics.prepare_receiver(config)
    metrics.prepare_poller(config)
    metrics.prepare_worker(config)
    served: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.name.endswith("_total") and s.labels.get("tenant") == TENANT and s.value == 0:
                served.setdefault(s.name.removeprefix("chert_relay_"), []).append(s.labels)
    assert set(served) == set(claimed)
    for counter, (label, values) in claimed.items():
        if values:
            assert {labels[label] for labels in served[counter]} == values, counter
    assert "error" not in {labels["outcome"] for labels in served["webhooks_total"]}
