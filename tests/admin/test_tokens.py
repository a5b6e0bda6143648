"""Scoped admin tokens: each sees only its tenants, only ``replay`` changes dead letters,
``admin.token`` stays an every-tenant replay token, and ``/metrics`` may need a token."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from relay.admin.app import Admin
from relay.admin.auth import TokenTable
from relay.admin.deadletter_routes import DeadLetterApi
from relay.admin.poller_routes import PollerStatusApi
from relay.config import Config
from relay.errors import ConfigError
from relay.metrics import Metrics
from tests.support.common import TENANT, config_dict, make_config
from tests.support.deadletters import (
    ADMIN_TOKEN,
    OTHER,
    READ_ACME,
    READ_ALL,
    REPLAY_ACME,
    make_dead_letters,
    refusals,
    two_tenants,
)
from tests.support.delivery import Sink, runtime, sinks

EVENTS = {TENANT: [("a1", "message.received")], OTHER: [("o1", "message.received")]}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def client(redis: Redis, redis_url: str) -> AsyncIterator[tuple[TestClient[Any, Any], Admin]]:
    """The admin app, with acme's a1 (to crm and all) and other-1's o1 dead-lettered."""
    async with sinks(Sink(lambda s, r: (400, {}))) as (sink,):
        config = two_tenants(redis_url, sink.url)
        await make_dead_letters(redis, config, EVENTS)
    rt = runtime(redis, config)
    admin = Admin(config, redis, rt.metrics)
    admin.add_api_routes(DeadLetterApi(redis, lambda: config, admin.refusals).routes())
    admin.add_api_routes(PollerStatusApi(rt, lambda: None).routes())
    async with TestClient(TestServer(admin.app())) as c:
        yield c, admin


async def tenants_listed(c: TestClient[Any, Any], token: str, query: str = "") -> list[str]:
    r = await c.get(f"/api/deadletters{query}", headers=auth(token))
    assert r.status == 200, await r.text()
    return sorted(f"{e['tenant']}/{e['sink']}/{e['event_id']}" for e in (await r.json())["entries"])


async def test_a_tenant_token_sees_only_its_tenants_dead_letters(client: Any) -> None:
    c, _ = client
    assert await tenants_listed(c, ADMIN_TOKEN) == [
        f"{TENANT}/all/a1",
        f"{TENANT}/crm/a1",
        f"{OTHER}/s/o1",
    ]
    assert await tenants_listed(c, READ_ALL) == await tenants_listed(c, ADMIN_TOKEN)
    assert await tenants_listed(c, READ_ACME) == [f"{TENANT}/all/a1", f"{TENANT}/crm/a1"]
    assert await tenants_listed(c, READ_ACME, "?sink=s") == []
    r = await c.get(f"/api/deadletters?tenant={OTHER}", headers=auth(READ_ACME))
    assert (r.status, (await r.json())["error"]) == (403, "forbidden_tenant")
    r = await c.get(f"/api/deadletters/{OTHER}/s/o1", headers=auth(READ_ACME))
    assert r.status == 403
    r = await c.get(f"/api/deadletters/{OTHER}/s/o1", headers=auth(READ_ALL))
    assert r.status == 200
    r = await c.get(f"/api/deadletters/{TENANT}/crm/a1", headers=auth(READ_ACME))
    assert (r.status, (await r.json())["event"]["event_id"]) == (200, "a1")
    assert await refusals(c, "forbidden_tenant") == 2


async def test_replay_and_purge_need_the_replay_scope_and_stay_within_the_tenants(
    client: Any, redis: Redis
) -> None:
    c, _ = client
    for path in ("/api/deadletters/replay", "/api/deadletters/purge"):
        r = await c.post(path, json={"all": True}, headers=auth(READ_ACME))
        assert (r.status, (await r.json())["error"]) == (403, "forbidden_scope")
        r = await c.post(path, json={"all": True}, headers=auth(READ_ALL))
        assert r.status == 403
        r = await c.post(path, json={"tenant": OTHER}, headers=auth(REPLAY_ACME))
        assert (r.status, (await r.json())["error"]) == (403, "forbidden_tenant")
    # "all" for a tenant token means all of its tenants'.
    r = await c.post("/api/deadletters/replay", json={"all": True}, headers=auth(REPLAY_ACME))
    body = await r.json()
    assert r.status == 200
    assert sorted(e["tenant"] for e in body["entries"]) == [TENANT, TENANT]
    assert await tenants_listed(c, ADMIN_TOKEN) == [f"{OTHER}/s/o1"]
    r = await c.post("/api/deadletters/purge", json={"tenant": OTHER}, headers=auth(ADMIN_TOKEN))
    assert (await r.json())["count"] == 1


async def test_pollers_lists_only_the_tokens_tenants(redis: Redis, redis_url: str) -> None:
    tenants = config_dict()["tenants"]
    for t in tenants:
        t["poll"] = {"mode": "always"}
        t["api"] = {"signing_secret": "s" * 32}
    config = make_config(
        redis_url=redis_url,
        tenants=tenants,
        admin={"token": ADMIN_TOKEN, "tokens": two_tenants(redis_url, "http://x/").admin.tokens},
    )
    rt = runtime(redis, config)
    admin = Admin(config, redis, rt.metrics)
    admin.add_api_routes(PollerStatusApi(rt, lambda: None).routes())
    async with TestClient(TestServer(admin.app())) as c:
        for token, expected in ((ADMIN_TOKEN, [TENANT, OTHER]), (READ_ACME, [TENANT])):
            r = await c.get("/api/pollers", headers=auth(token))
            assert [t["tenant"] for t in (await r.json())["tenants"]] == expected


async def test_metrics_can_require_a_token(redis: Redis, redis_url: str) -> None:
    config = two_tenants(redis_url, "http://127.0.0.1:9/", metrics_token_required=True)
    admin = Admin(config, redis, Metrics())
    async with TestClient(TestServer(admin.app())) as c:
        r = await c.get("/metrics")
        assert (r.status, r.headers["WWW-Authenticate"]) == (401, "Bearer")
        assert (await c.get("/metrics", headers=auth("nope"))).status == 401
        for token in (READ_ACME, READ_ALL, ADMIN_TOKEN):  # any token will do
            r = await c.get("/metrics", headers=auth(token))
            assert r.status == 200
            assert "chert_relay_admin_refusals_total" in await r.text()
        assert (await c.get("/healthz")).status == 200
    open_config = two_tenants(redis_url, "http://127.0.0.1:9/")
    admin = Admin(open_config, redis, Metrics())
    async with TestClient(TestServer(admin.app())) as c:
        assert (await c.get("/metrics")).status == 200  # the default: no token


def test_every_token_is_found_and_only_by_its_own_value(redis_url: str) -> None:
    table = TokenTable(two_tenants(redis_url, "http://127.0.0.1:9/"))
    found = {t: table.find(t.encode()) for t in (ADMIN_TOKEN, READ_ACME, REPLAY_ACME, READ_ALL)}
    assert {t: (p.name, p.scope) for t, p in found.items() if p} == {
        ADMIN_TOKEN: ("admin", "replay"),
        READ_ACME: ("acme-read", "read"),
        REPLAY_ACME: ("acme-replay", "replay"),
        READ_ALL: ("monitoring", "read"),
    }
    assert found[READ_ACME] is not None
    assert found[READ_ACME].tenants == {TENANT}
    assert found[READ_ALL] is not None
    assert found[READ_ALL].tenants is None
    for wrong in (b"", READ_ACME[:-1].encode(), READ_ACME.encode() + b"x", b"\xff\xfe"):
        assert table.find(wrong) is None


def bad_config(**admin: Any) -> str:
    with pytest.raises(ConfigError) as e:
        make_config(admin=admin)
    return str(e.value)


def test_token_configuration_is_checked() -> None:
    good = {"name": "ops", "token": "t" * 32, "scope": "read", "tenants": [TENANT]}
    config: Config = make_config(admin={"tokens": [good]})
    assert config.admin.tokens[0].tenants == [TENANT]
    assert "unknown tenant(s): nope" in bad_config(tokens=[{**good, "tenants": ["nope"]}])
    assert "list it alone" in bad_config(tokens=[{**good, "tenants": ["*", TENANT]}])
    assert "scope" in bad_config(tokens=[{**good, "scope": "purge"}])
    assert "tenants" in bad_config(tokens=[{k: v for k, v in good.items() if k != "tenants"}])
    twice = [good, {**good, "name": "ops2"}]
    message = bad_config(tokens=twice)
    assert "same value" in message
    assert "t" * 32 not in message
    assert "unique" in bad_config(tokens=[good, {**good, "token": "u" * 32}])
    assert "same value as admin.token" in bad_config(token="t" * 32, tokens=[good])
    assert "metrics_token_required needs" in bad_config(metrics_token_required=True)
    short = make_config(admin={"tokens": [{**good, "token": "short-token"}]})
    assert any("admin.tokens[0] (ops) is shorter" in w for w in short.warnings())


async def test_refusals_are_counted_and_logged_once_per_reason_and_client(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    c, _ = client
    with caplog.at_level(logging.WARNING, logger="relay.admin.auth"):
        for _ in range(5):
            assert (await c.get("/api/deadletters", headers=auth("wrong"))).status == 401
    lines = [r.getMessage() for r in caplog.records if "admin: refused" in r.getMessage()]
    assert len(lines) == 1
    assert "unauthorized" in lines[0]
    assert "wrong" not in lines[0]  # never the token given
    assert await refusals(c, "unauthorized") == 5
