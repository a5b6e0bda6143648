"""Helpers every test area uses: the test tenant and its secrets, configurations,
Chert's event bodies and signatures, stored events, and waiting on a condition."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from relay.config import Config, parse_config
from relay.edge.http_server import HttpServer
from relay.keys import Keys
from relay.signing import webhook_headers
from relay.store.stored_event import StoredEvent, parse

WEBHOOK_SECRET = "7f3c1e9a5b2d4f6081a3c5e7f9b1d3e5a7c9e1f3b5d7f9a1c3e5b7d9f1a3c5e7"
OTHER_SECRET = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9"
SINK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
TENANT = "acme-7a3f"


def config_dict(
    *,
    redis_url: str | None = None,
    sinks: list[dict[str, Any]] | None = None,
    tenants: list[dict[str, Any]] | None = None,
    **sections: dict[str, Any],
) -> dict[str, Any]:
    """A valid configuration as a dict: one tenant with two sinks unless told otherwise."""
    if sinks is None:
        sinks = [
            {
                "name": "crm",
                "url": "http://127.0.0.1:9/crm",
                "events": ["message.received"],
                "secret": SINK_SECRET,
            },
            {"name": "all", "url": "http://127.0.0.1:9/all", "events": ["*"]},
        ]
    if tenants is None:
        tenants = [
            {
                "slug": TENANT,
                "webhook_secrets": [WEBHOOK_SECRET],
                "sinks": sinks,
                "poll": {"mode": "off"},
            },
            {
                "slug": "other-1",
                "webhook_secrets": [OTHER_SECRET],
                "poll": {"mode": "off"},
                "sinks": [{"name": "s", "url": "http://127.0.0.1:9/s"}],
            },
        ]
    data: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:0"},
        "admin": {"listen": "127.0.0.1:0", "worker_listen": "127.0.0.1:0"},
        "relay": {"dedupe_ttl": "1h"},
        "tenants": tenants,
    }
    if redis_url is not None:
        data["redis"] = {"url": redis_url}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


async def stored_event(redis: Redis, event_id: str, tenant: str = TENANT) -> StoredEvent | None:
    """The event as ingest stored it, or None."""
    raw = await redis.get(Keys("chert-relay").event(tenant, event_id))
    return None if raw is None else parse(raw)


def make_config(**kwargs: Any) -> Config:
    return parse_config(config_dict(**kwargs), env={})


def envelope(event_id: str, event: str = "message.received", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event": event,
        "event_id": event_id,
        "timestamp": "2026-05-24T01:35:34.000Z",
        "api_version": "v1",
        "webhook_version": "2026-05-04",
        "event_type": event,
        "partner_id": TENANT,
        "data": {
            "chat": {"id": "17f6e9ed", "is_group": False},
            "message": {
                "id": event_id,
                "direction": "inbound",
                "parts": [{"type": "text", "value": "Sure, what time?"}],
            },
        },
    }
    body.update(extra)
    return body


def log_row(event_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": f"evt_{abs(hash(event_id)):x}",
        "type": "message.received",
        "event_id": event_id,
        "payload": envelope(event_id, **extra),
        "delivery": {"status": "failed", "attempts": []},
        "created_at": "2026-04-29T18:15:25Z",
    }


def signed(
    body: dict[str, Any] | bytes,
    secret: str = WEBHOOK_SECRET,
    *,
    timestamp: int | None = None,
    legacy: bool = False,
) -> tuple[bytes, dict[str, str]]:
    """(raw body, headers) as Chert would send them."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    headers.update(
        webhook_headers(secret, raw, timestamp=timestamp or int(time.time()), legacy=legacy)
    )
    return raw, headers


def metric_sample(exposition: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples with ``labels`` in a ``/metrics`` answer."""
    return sum(
        s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def wait_for(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01
) -> Any:
    """Poll ``predicate`` (sync or async) until truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


class ReceiverClient:
    """An HTTP client for a receiver's own server, listening on a free port."""

    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.port = port

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.session.post(path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.session.get(path, **kwargs)


ServeReceiver = Callable[[HttpServer], Awaitable[ReceiverClient]]
