"""Shared fixtures: a real redis-server started by the suite, configs, signed requests.

One redis-server (AOF on, noeviction) runs for the whole session on a free port in
a temporary directory; every test starts from an empty database. Tests that must
stop or restart Redis start their own with ``make_redis_server``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, settings
from redis.asyncio import Redis

from relay.config import Config, Listen, parse_config
from relay.ingest.http_server import HttpServer
from relay.signing import webhook_headers
from relay.store.embedded import EmbeddedRedis, free_port
from relay.store.stored_event import StoredEvent, parse

WEBHOOK_SECRET = "7f3c1e9a5b2d4f6081a3c5e7f9b1d3e5a7c9e1f3b5d7f9a1c3e5b7d9f1a3c5e7"
OTHER_SECRET = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9"
SINK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
TENANT = "acme-7a3f"

# Property tests check correctness, not speed: on a busy 2-core machine an example may
# take longer than hypothesis' default 200 ms deadline.
settings.register_profile(
    "relay", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("relay")


def start_redis(directory: Path, port: int | None = None) -> EmbeddedRedis:
    server = EmbeddedRedis(directory, port=port or free_port(), appendfsync="everysec")
    asyncio.run(server.start())
    return server


def stop_redis(server: EmbeddedRedis) -> None:
    asyncio.run(server.stop())


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    stop_redis(server)


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    async def flush() -> None:
        client: Redis = Redis.from_url(redis_server.url)
        await client.flushall()
        await client.aclose()

    asyncio.run(flush())
    return redis_server.url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client: Redis = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def make_redis_server(
    tmp_path: Path,
) -> AsyncIterator[Callable[[], Awaitable[EmbeddedRedis]]]:
    """Start extra redis-servers a test may stop and restart (``await server.stop()`` /
    ``await server.start()`` keeps its port and data); all stopped at the end."""
    servers: list[EmbeddedRedis] = []

    async def make() -> EmbeddedRedis:
        server = EmbeddedRedis(
            tmp_path / f"redis{len(servers)}", port=free_port(), appendfsync="everysec"
        )
        await server.start()
        servers.append(server)
        return server

    yield make
    for s in servers:
        await s.stop()


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
        "admin": {"listen": "127.0.0.1:0"},
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
    raw = await redis.get(f"chert-relay:ev:{tenant}:{event_id}")
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


@pytest.fixture
async def serve_receiver() -> AsyncIterator[ServeReceiver]:
    """Start a receiver's :class:`HttpServer` on a free port; stopped after the test."""
    started: list[tuple[HttpServer, aiohttp.ClientSession]] = []

    async def serve(server: HttpServer) -> ReceiverClient:
        await server.start(Listen(host="127.0.0.1", port=0))
        port = server.addresses[0][1]
        session = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}")
        started.append((server, session))
        return ReceiverClient(session, port)

    yield serve
    for server, session in started:
        await session.close()
        await server.shutdown(1.0)
