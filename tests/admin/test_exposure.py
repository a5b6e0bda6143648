"""What the admin listener lets out: only to a Host it expects (DNS rebinding), only a
scoped token's own tenants in /metrics and on the page, and a session cookie marked
``Secure`` behind a TLS-terminating proxy."""

from __future__ import annotations

import re
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from relay.admin.app import Admin
from relay.admin.hosts import HostCheck
from relay.admin.ui.routes import OperatorPage
from relay.config import parse_config
from relay.config.values import parse_listen
from relay.errors import ConfigError
from relay.metrics import Metrics, only_tenants
from tests.support.common import TENANT, config_dict
from tests.support.deadletters import ADMIN_TOKEN, OTHER, READ_ACME, two_tenants
from tests.support.delivery import runtime

LOOPBACK = parse_listen("127.0.0.1:9090")


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:9090", True),
        ("[::1]:9090", True),
        ("localhost:9090", True),
        ("LOCALHOST", True),
        ("dev.localhost:9090", True),
        ("10.1.2.3", True),
        (None, True),  # HTTP/1.0 sends none
        ("evil.example:9090", False),
        ("127.0.0.1.evil.example", False),
        ("localhost.evil.example", False),
        ("[::1", False),
    ],
)
def test_a_loopback_listener_answers_only_addresses_and_localhost(
    host: str | None, allowed: bool
) -> None:
    assert HostCheck(None, LOOPBACK).allows(host) is allowed


def test_named_hosts_and_a_listener_on_every_interface() -> None:
    named = HostCheck(["relay.internal", "*.corp.example"], LOOPBACK)
    assert named.allows("relay.internal:9090")
    assert named.allows("a.b.corp.example")
    assert not named.allows("corp.example.evil")
    assert not named.allows("evil.example")
    assert HostCheck(None, parse_listen("0.0.0.0:9090")).allows("relay-1.internal:9090")
    assert HostCheck(None, parse_listen("unix:/run/relay.sock")).allows("localhost")
    assert not HostCheck(None, parse_listen("unix:/run/relay.sock")).allows("evil.example")
    assert not HostCheck([], parse_listen("0.0.0.0:9090")).allows("evil.example")
    assert HostCheck(["*"], LOOPBACK).allows("anything.example")


def test_allowed_hosts_are_checked_at_load(redis_url: str) -> None:
    data = config_dict(redis_url=redis_url)
    data["admin"] = {"allowed_hosts": ["relay.internal", "bad host"]}
    with pytest.raises(ConfigError, match=r"'bad host' is not a host name"):
        parse_config(data, env={})


async def test_a_rebound_name_gets_421_on_every_route(redis: Redis, redis_url: str) -> None:
    config = two_tenants(redis_url, "http://127.0.0.1:9/")
    admin = Admin(config, redis, Metrics(), LOOPBACK)
    async with TestClient(TestServer(admin.app())) as c:
        for path in ("/metrics", "/healthz", "/readyz", "/api/deadletters", "/ui/login"):
            r = await c.get(path, headers={"Host": "rebound.evil.example"})
            assert r.status == 421, path
            assert (await r.json())["error"] == "host_not_allowed"
        assert (await c.get("/metrics", headers={"Host": "localhost:9090"})).status == 200
        r = await c.get("/metrics")
        assert r.status == 200  # the test client's own Host: 127.0.0.1:port
        text = await r.text()
        assert 'chert_relay_admin_refusals_total{reason="host_not_allowed"} 5.0' in text


def test_only_tenants_keeps_its_own_and_unlabelled_samples() -> None:
    text = (
        b"# HELP x_total help\n# TYPE x_total counter\n"
        b'x_total{tenant="acme",sink="a"} 1.0\n'
        b'x_total{sink="b",tenant="other"} 2.0\n'
        b'x_total{tenant="ac\\"me"} 3.0\n'
        b"y 4.0\n"
    )
    kept = only_tenants(text, frozenset({"acme"}))
    assert kept == (
        b'# HELP x_total help\n# TYPE x_total counter\nx_total{tenant="acme",sink="a"} 1.0\ny 4.0\n'
    )


async def test_a_scoped_token_reads_only_its_tenants_in_metrics(
    redis: Redis, redis_url: str
) -> None:
    config = two_tenants(redis_url, "http://127.0.0.1:9/", metrics_token_required=True)
    rt = runtime(redis, config)
    rt.metrics.webhooks.labels(TENANT, "accepted").inc(3)
    rt.metrics.webhooks.labels(OTHER, "accepted").inc(5)
    admin = Admin(config, redis, rt.metrics)
    async with TestClient(TestServer(admin.app())) as c:
        scoped = await (
            await c.get("/metrics", headers={"Authorization": f"Bearer {READ_ACME}"})
        ).text()
        everyone = await (
            await c.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        ).text()
    assert f'tenant="{TENANT}"' in scoped
    assert f'tenant="{OTHER}"' not in scoped
    assert "chert_relay_build_info" in scoped
    assert f'tenant="{OTHER}"' in everyone


async def _page(redis: Redis, redis_url: str) -> tuple[Admin, Any]:
    config = two_tenants(redis_url, "http://127.0.0.1:9/")
    rt = runtime(redis, config)
    admin = Admin(config, redis, rt.metrics)
    admin.add_routes(OperatorPage(admin, rt, lambda: None).routes())
    return admin, config


async def _log_in(c: TestClient[Any, Any], token: str, headers: dict[str, str]) -> list[str]:
    """Log in; the Set-Cookie lines of the form and of the log-in. The log-in cookie is
    sent back by hand: a client sends a ``Secure`` one only over HTTPS, which a
    TLS-terminating proxy would have given the browser."""
    r = await c.get("/ui/login", headers=headers)
    nonce = re.search(r'name="nonce" value="([^"]+)"', await r.text())
    assert nonce is not None
    form_cookie = r.headers["Set-Cookie"]
    value = form_cookie.split(";")[0]
    r = await c.post(
        "/ui/login",
        data={"nonce": nonce.group(1), "token": token},
        headers={**headers, "Cookie": value},
        allow_redirects=False,
    )
    assert r.status == 303, await r.text()
    return [form_cookie, r.headers["Set-Cookie"]]


@pytest.mark.parametrize(
    ("headers", "secure"),
    [
        ({}, False),
        ({"X-Forwarded-Proto": "https"}, True),
        ({"Forwarded": "for=10.0.0.1;proto=https"}, True),
        ({"Forwarded": 'for=10.0.0.1;proto="https"'}, True),
        ({"X-Forwarded-Proto": "http"}, False),
    ],
)
async def test_the_session_cookie_is_secure_behind_a_tls_proxy(
    redis: Redis, redis_url: str, headers: dict[str, str], secure: bool
) -> None:
    admin, _ = await _page(redis, redis_url)
    async with TestClient(TestServer(admin.app())) as c:
        form, session = await _log_in(c, ADMIN_TOKEN, headers)
    assert form.startswith("chert_relay_login=")
    assert session.startswith("chert_relay_session=")
    assert ("Secure" in form, "Secure" in session) == (secure, secure)


async def test_a_scoped_token_does_not_see_the_queue_line(redis: Redis, redis_url: str) -> None:
    admin, _ = await _page(redis, redis_url)
    async with TestClient(TestServer(admin.app())) as c:
        await _log_in(c, READ_ACME, {})
        assert "Queue, every sink" not in await (await c.get("/ui")).text()
    async with TestClient(TestServer(admin.app())) as c:
        await _log_in(c, ADMIN_TOKEN, {})
        assert "Queue, every sink" in await (await c.get("/ui")).text()
