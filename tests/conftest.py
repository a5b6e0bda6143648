"""Shared fixtures: a real redis-server started by the suite, configs, signed requests.

One redis-server (AOF on, noeviction) runs for the whole session on a free port in
a temporary directory; every test starts from an empty database. Tests that must
stop or restart Redis start their own with ``make_redis_server``.

The message brokers (tests/support/brokers.py) work the same way: one NATS server
(``nats_server``) and one RabbitMQ node (``rabbit_server``) for the session, each
started when a test first asks for it — tests share them, so each uses stream,
exchange and queue names of its own — and ``make_nats_server`` /
``make_rabbit_server`` for a private one a test may kill and restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from hypothesis import HealthCheck, settings
from redis.asyncio import Redis

from relay.config.values import Listen
from relay.edge.http_server import HttpServer
from relay.store.embedded import EmbeddedRedis, free_port
from tests.support.common import ReceiverClient, ServeReceiver
from tests.support.process import RelayProcess

if TYPE_CHECKING:
    # Imported where used: the broker client libraries are only needed by the tests
    # that ask for a broker.
    from tests.support.brokers import NatsServer, RabbitServer

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


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server with JetStream for the whole session."""
    from tests.support.brokers import NatsServer

    server = NatsServer(tmp_path_factory.mktemp("nats"))
    asyncio.run(server.start())
    yield server
    asyncio.run(server.stop())


@pytest.fixture
async def make_nats_server(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[NatsServer]]]:
    """Start private nats-servers a test may kill and restart (``kill()`` then
    ``await restart()`` keeps the port and the JetStream store); killed at the end.
    Keyword arguments go to :class:`NatsServer` (``user=``, ``password=``)."""
    from tests.support.brokers import NatsServer

    servers: list[NatsServer] = []

    async def make(**kwargs: Any) -> NatsServer:
        server = NatsServer(tmp_path / f"nats{len(servers)}", **kwargs)
        servers.append(server)
        await server.start()
        return server

    yield make
    for s in servers:
        s.kill()


@pytest.fixture(scope="session")
def rabbit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitServer]:
    """A RabbitMQ node for the whole session (its start takes 5-7 s)."""
    from tests.support.brokers import RabbitServer

    server = RabbitServer(tmp_path_factory.mktemp("rabbit"))
    asyncio.run(server.start())
    yield server
    asyncio.run(server.stop())


@pytest.fixture
async def make_rabbit_server(
    tmp_path: Path,
) -> AsyncIterator[Callable[[], Awaitable[RabbitServer]]]:
    """Start private RabbitMQ nodes a test may kill and restart (``kill()`` then
    ``await restart()`` keeps the ports, node name and Mnesia directory); killed at
    the end."""
    from tests.support.brokers import RabbitServer

    servers: list[RabbitServer] = []

    async def make() -> RabbitServer:
        server = RabbitServer(tmp_path / f"rabbit{len(servers)}")
        servers.append(server)
        await server.start()
        return server

    yield make
    for s in servers:
        s.kill()


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


@pytest.fixture
async def procs() -> AsyncIterator[list[RelayProcess]]:
    """Relay processes a test starts: each is killed when the test ends."""
    started: list[RelayProcess] = []
    yield started
    for p in started:
        p.kill()
