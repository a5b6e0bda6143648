"""``worker.refuse_private_targets``: an HTTP sink is never reached at a loopback,
private or link-local address — refused at load when the URL names one, and at
delivery when its host name resolves to one."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from aiohttp import web

from relay.admin.sinks import send_test_event
from relay.config import parse_config
from relay.config.values import is_public, target_problem
from relay.delivery.egress import proxy_hosts
from relay.delivery.targets import PublicResolver
from relay.errors import ConfigError
from relay.store.embedded import free_port
from tests.support.common import TENANT, config_dict


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("2606:2800:220:1:248:1893:25c8:1946", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fd00::1", False),
        ("fe80::1%eth0", False),
        ("::ffff:127.0.0.1", False),
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 for 169.254.169.254
        ("64:ff9b::808:808", True),  # NAT64 for 8.8.8.8
        ("2002:7f00:1::", False),  # 6to4 for 127.0.0.1
        ("::7f00:1", False),  # IPv4-compatible 127.0.0.1
        ("not-an-address", False),
    ],
)
def test_what_counts_as_public(address: str, public: bool) -> None:
    assert is_public(address) is public


def config_with(url: str, refuse: bool = True, **sink: Any) -> dict[str, Any]:
    data = config_dict(redis_url="redis://127.0.0.1:9/0")
    data["tenants"] = data["tenants"][:1]  # the other tenant's sinks are local ones
    data["tenants"][0]["sinks"] = [{"name": "s", "url": url, **sink}]
    data["worker"] = {"refuse_private_targets": refuse}
    return data


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://169.254.169.254/latest/meta-data",
        "https://[::1]:8443/hook",
        "http://10.0.0.5/hook",
        "http://localhost:8080/hook",
        "http://api.localhost/hook",
    ],
)
def test_a_sink_url_at_a_private_address_is_refused_at_load(url: str) -> None:
    with pytest.raises(ConfigError, match=r"tenants\[0\]\.sinks\[0\] \(s\): .*refuse_private"):
        parse_config(config_with(url), env={})
    parse_config(config_with(url, refuse=False), env={})  # the default: allowed


def test_an_oauth2_token_url_at_a_private_address_is_refused_at_load() -> None:
    oauth2 = {
        "token_url": "https://10.0.0.9/oauth2/token",
        "client_id": "relay",
        "client_secret": "s3cret-s3cret-s3cret",
    }
    data = config_with("https://crm.example.com/hook", oauth2=oauth2)
    with pytest.raises(ConfigError, match=r"oauth2\.token_url: 10\.0\.0\.9 is not a public"):
        parse_config(data, env={})


def test_names_public_addresses_and_broker_sinks_pass_at_load() -> None:
    for url in ("https://crm.example.com/hook", "http://93.184.216.34/hook"):
        assert target_problem(url) is None
        parse_config(config_with(url), env={})
    parse_config(config_with("redis://127.0.0.1:6379/0", stream="events"), env={})


async def test_the_resolver_keeps_only_public_addresses() -> None:
    with pytest.raises(OSError, match=r"resolves only to non-public addresses.*refuse_private"):
        await PublicResolver().resolve("localhost", 80)
    exempt = PublicResolver(frozenset({"localhost"}))  # a proxy's host
    assert [r["host"] for r in await exempt.resolve("localhost", 80)]
    await exempt.close()


def test_proxies_are_exempt() -> None:
    data = config_with("https://crm.example.com/hook", proxy="http://egress.internal:3128")
    config = parse_config(data, env={})
    assert proxy_hosts(config, {"HTTPS_PROXY": "http://Other.Proxy.:8080"}) == {
        "egress.internal",
        "other.proxy",
    }


async def test_a_name_that_resolves_inward_is_never_reached() -> None:
    """This machine's own name resolves to one of its addresses: a sink there is
    reached without the setting, and never with it."""
    name = socket.gethostname()
    addresses = {str(a[4][0]) for a in socket.getaddrinfo(name, None, socket.AF_INET)}
    if any(is_public(a) for a in addresses):
        pytest.skip(f"this machine's name {name} resolves to a public address")
    got: list[bytes] = []

    async def hook(request: web.Request) -> web.Response:
        got.append(await request.read())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    try:
        url = f"http://{name}:{port}/hook"
        allowed = parse_config(config_with(url, refuse=False), env={})
        reply = await send_test_event(allowed, TENANT, "s", "test")
        assert reply.ok, reply
        assert len(got) == 1
        refused = parse_config(config_with(url), env={})
        reply = await send_test_event(refused, TENANT, "s", "test")
        assert not reply.ok
        assert reply.status is None
        assert "refuse_private_targets" in reply.excerpt, reply
        assert len(got) == 1  # nothing more reached it
    finally:
        await runner.cleanup()
