"""The admin listener: liveness, readiness, metrics, and the token guard on /api/."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from relay.admin.app import Admin
from relay.admin.deadletter_routes import DeadLetterApi
from relay.config import load_config
from relay.logs import Throttle
from relay.metrics import Metrics
from relay.service import Service
from relay.store.client import connect
from relay.store.embedded import EmbeddedRedis
from tests.support.common import ServeReceiver, config_dict, make_config, wait_for
from tests.support.process import write_toml

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


async def ping(request: web.Request) -> web.Response:
    return web.json_response({"pong": True})


async def make_admin(
    aiohttp_client: ClientFactory, redis_client: Redis, **cfg: Any
) -> tuple[TestClient[Any, Any], Admin]:
    admin = Admin(make_config(**cfg), redis_client, Metrics())
    admin.add_api_routes([web.get("/api/ping", ping)])
    return await aiohttp_client(admin.app()), admin


async def test_health_ready_and_metrics(aiohttp_client: ClientFactory, redis: Redis) -> None:
    client, admin = await make_admin(aiohttp_client, redis)
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert (ready.status, await ready.json()) == (200, {"ready": True, "problems": []})
    metrics = await client.get("/metrics")
    text = await metrics.text()
    assert metrics.status == 200
    assert "chert_relay_redis_up 1.0" in text
    assert 'chert_relay_build_info{version="' in text
    admin.draining = True
    ready = await client.get("/readyz")
    assert (ready.status, (await ready.json())["problems"]) == (503, ["draining"])


async def test_readyz_fails_while_redis_is_down(
    aiohttp_client: ClientFactory, make_redis_server: Callable[[], Awaitable[EmbeddedRedis]]
) -> None:
    server = await make_redis_server()
    redis_client = connect(server.url, timeout=1.0)
    try:
        client, _ = await make_admin(aiohttp_client, redis_client)
        await server.stop()
        ready = await client.get("/readyz")
        assert (ready.status, (await ready.json())["problems"]) == (503, ["redis_unreachable"])
        assert "chert_relay_redis_up 0.0" in await (await client.get("/metrics")).text()
        await server.start()
        assert (await client.get("/readyz")).status == 200
    finally:
        await redis_client.aclose()


async def test_api_needs_the_bearer_token(aiohttp_client: ClientFactory, redis: Redis) -> None:
    off, _ = await make_admin(aiohttp_client, redis)
    assert (await off.get("/api/ping")).status == 403  # no token configured: API off
    client, _ = await make_admin(aiohttp_client, redis, admin={"token": "s3cret-token"})
    assert (await client.get("/api/ping")).status == 401
    assert (await client.get("/api/ping", headers={"Authorization": "Bearer nope"})).status == 401
    ok = await client.get("/api/ping", headers={"Authorization": "Bearer s3cret-token"})
    assert (ok.status, await ok.json()) == (200, {"pong": True})
    assert (await client.get("/healthz")).status == 200  # only /api/ is guarded


def test_throttle_lets_one_line_through_per_interval_and_counts_the_rest() -> None:
    now = [1000.0]
    throttle = Throttle(interval=3600, clock=lambda: now[0])
    assert throttle.allow("k") == 0
    assert throttle.allow("k") is None
    assert throttle.allow("k") is None
    assert throttle.allow("other") == 0
    now[0] += 3600  # the interval has passed
    assert throttle.allow("k") == 2


def test_a_throttle_lets_a_forgotten_key_through_at_once() -> None:
    throttle = Throttle(interval=3600)
    assert throttle.allow("k") == 0
    assert throttle.allow("k") is None
    throttle.forget("k")
    assert throttle.allow("k") == 0
    assert throttle.allow("k") is None


async def test_refusals_are_logged_without_flooding(
    serve_receiver: ServeReceiver, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    from relay.edge.receiver import Receiver
    from relay.ingest.ingestor import Ingestor

    config = make_config()
    metrics = Metrics()
    receiver = Receiver(config, Ingestor(redis, config), metrics)
    client = await serve_receiver(receiver.server())
    with caplog.at_level(logging.WARNING, logger="relay.edge.receiver"):
        for _ in range(20):
            assert (await client.post("/webhooks/chert/acme-7a3f", data=b"{}")).status == 401
    lines = [r for r in caplog.records if "webhook refused" in r.getMessage()]
    assert len(lines) == 1
    assert "reason=missing_signature" in lines[0].getMessage()
    assert (
        metrics.registry.get_sample_value(
            "chert_relay_webhook_rejections_total",
            {"tenant": "acme-7a3f", "reason": "missing_signature"},
        )
        == 20
    )


async def test_a_reload_rotates_the_admin_token(tmp_path: Path, redis_url: str) -> None:
    path = tmp_path / "relay.toml"
    write_toml(path, config_dict(redis_url=redis_url, admin={"token": "old-token-0123456789"}))
    service = Service(load_config(path), roles=("admin",), config_path=path)
    task = asyncio.create_task(service.run())
    await asyncio.wait_for(service.started.wait(), 20)
    try:
        role: Any = service.roles["admin"]
        host, port = role.addresses[0][:2]
        url = f"http://{host}:{port}/api/deadletters"
        write_toml(path, config_dict(redis_url=redis_url, admin={"token": "new-token-987654321"}))
        service.reload()  # what SIGHUP does
        async with aiohttp.ClientSession() as s:
            for token, status in (("new-token-987654321", 200), ("old-token-0123456789", 401)):
                async with s.get(url, headers={"Authorization": f"Bearer {token}"}) as r:
                    assert r.status == status, token
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 20)


async def test_a_token_that_is_not_utf8_is_refused_not_a_failure(
    aiohttp_client: ClientFactory, redis: Redis
) -> None:
    client, _ = await make_admin(aiohttp_client, redis, admin={"token": "s3cret-token"})
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    try:
        writer.write(
            b"GET /api/ping HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
            b"Connection: close\r\n\r\n"
        )
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 401")
    finally:
        writer.close()


async def test_a_time_out_of_range_is_a_bad_request(
    aiohttp_client: ClientFactory, redis: Redis
) -> None:
    cfg = make_config(admin={"token": "s3cret-token"})
    admin = Admin(cfg, redis, Metrics())
    admin.add_api_routes(DeadLetterApi(redis, lambda: cfg).routes())
    client = await aiohttp_client(admin.app())
    auth = {"Authorization": "Bearer s3cret-token"}
    for since in ("1e400", "nan", "-inf", "1e308", "-1e308", "1e17"):
        for name in ("since", "until"):
            r = await client.get(f"/api/deadletters?{name}={since}", headers=auth)
            assert r.status == 400, (name, since)
        r = await client.post("/api/deadletters/purge", json={"until": since}, headers=auth)
        assert r.status == 400, since


async def test_a_scan_of_the_api_without_a_token_logs_one_line(
    aiohttp_client: ClientFactory, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = await make_admin(aiohttp_client, redis, admin={"token": "s3cret-token"})
    with caplog.at_level(logging.WARNING, logger="relay.admin.auth"):
        for n in range(50):
            auth = {"Authorization": f"Bearer guess-{n}"} if n % 2 else {}
            assert (await client.get(f"/api/probe-{n}", headers=auth)).status == 401
    lines = [r.getMessage() for r in caplog.records if "admin: refused" in r.getMessage()]
    assert len(lines) == 1
    assert "guess" not in lines[0]


async def test_a_change_body_nested_too_deeply_is_a_bad_request(
    aiohttp_client: ClientFactory, redis: Redis
) -> None:
    cfg = make_config(admin={"token": "s3cret-token"})
    admin = Admin(cfg, redis, Metrics())
    admin.add_api_routes(DeadLetterApi(redis, lambda: cfg).routes())
    client = await aiohttp_client(admin.app())
    auth = {"Authorization": "Bearer s3cret-token"}
    for action in ("replay", "purge"):
        r = await client.post(f"/api/deadletters/{action}", data=b"[" * 5000, headers=auth)
        assert r.status == 400, action


async def test_requests_the_admin_parser_refuses_log_one_line_without_their_bytes(
    tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp logs each with its traceback, quoting the request — here, with bare LF
    line ends, the whole head and its token."""
    token = "adm-token-0123456789abcdef"
    path = tmp_path / "relay.toml"
    write_toml(path, config_dict(redis_url=redis_url, admin={"token": token}))
    service = Service(load_config(path), roles=("admin",), config_path=path)
    task = asyncio.create_task(service.run())
    await asyncio.wait_for(service.started.wait(), 20)
    try:
        role: Any = service.roles["admin"]
        host, port = role.addresses[0][:2]
        with caplog.at_level(logging.DEBUG, logger="relay.admin.http"):
            for _ in range(20):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(
                    f"GET /api/pollers HTTP/1.1\nAuthorization: Bearer {token}\n\n".encode()
                )
                line = await asyncio.wait_for(reader.readline(), 10)
                writer.close()
                assert b" 400 " in line, line
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 20)
    assert token not in caplog.text
    lines = [r for r in caplog.records if r.name == "relay.admin.http"]
    assert len(lines) == 1
    assert lines[0].levelno == logging.WARNING
    assert lines[0].exc_info is None
    assert "bad_request_line" in lines[0].getMessage()


class GatedRole:
    """A role whose start waits until the test lets it go (a slow listener's bind)."""

    name = "poller"

    def __init__(self, gate: asyncio.Event) -> None:
        self.gate = gate
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        await self.gate.wait()

    async def run(self) -> None:
        await self.stopped.wait()

    async def stop(self) -> None:
        self.stopped.set()

    def reload(self, config: Any) -> None:
        pass


async def test_readyz_says_starting_until_every_role_has_started(
    tmp_path: Path, redis_url: str
) -> None:
    path = write_toml(tmp_path / "relay.toml", config_dict(redis_url=redis_url))
    gate = asyncio.Event()
    service = Service(
        load_config(path),
        roles=("admin", "poller"),
        config_path=path,
        extra_roles={"poller": lambda rt: GatedRole(gate)},
    )
    task = asyncio.create_task(service.run())
    try:
        # The admin role starts first: it answers, but not ready, while the next starts.
        await wait_for(lambda: getattr(service.roles.get("admin"), "addresses", None))
        role: Any = service.roles["admin"]
        host, port = role.addresses[0][:2]
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{host}:{port}/readyz") as r:
                assert (r.status, (await r.json())["problems"]) == (503, ["starting"])
            assert not service.started.is_set()
            gate.set()
            await asyncio.wait_for(service.started.wait(), 20)
            async with s.get(f"http://{host}:{port}/readyz") as r:
                assert (r.status, await r.json()) == (200, {"ready": True, "problems": []})
    finally:
        gate.set()
        service.request_stop()
        await asyncio.wait_for(task, 20)


async def test_refusals_from_many_addresses_are_one_line_with_a_count(
    aiohttp_client: ClientFactory, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = await make_admin(aiohttp_client, redis, admin={"token": "s3cret-token"})
    caplog.set_level(logging.WARNING, logger="relay.admin")
    url = client.make_url("/api/ping")
    for n in range(2, 42):  # 40 clients, each from its own loopback address
        connector = aiohttp.TCPConnector(local_addr=(f"127.0.0.{n}", 0))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(url, headers={"Authorization": "Bearer nope"}) as r,
        ):
            assert r.status == 401
    refused = [r for r in caplog.records if "admin: refused" in r.getMessage()]
    assert len(refused) == 1  # not one per address
    assert "from 127.0.0.2" in refused[0].getMessage()
