"""Deliveries through a forward proxy — a real tinyproxy on 127.0.0.1 — end to end
through the worker: the sink's own ``proxy`` (with credentials as a secret), the
environment's ``HTTP_PROXY``/``HTTPS_PROXY`` unless ``NO_PROXY`` names the host or the
sink says ``proxy = "none"``; http:// forwarded, https:// tunnelled with CONNECT. A
proxy that refuses is retried, never a ``rejected`` dead letter, and its credentials
reach no log, no dead letter and no Redis key."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from redis.asyncio import Redis
from yarl import URL

from relay.delivery.egress import env_proxy, no_proxy_covers
from relay.store.deadletters import DeadLetterStore, Filter
from relay.store.embedded import free_port
from tests.delivery.test_sink_credentials import _values
from tests.support.certs import Authority, server_context
from tests.support.common import wait_for
from tests.support.delivery import Sink, config_with, ingest, runtime, sink_conf, sinks, worker
from tests.support.proxy import tinyproxy

PROXY_PASSWORD = "pr0xy-pass-4471"


async def test_an_http_sink_is_reached_through_its_proxy_with_a_secret_password(
    redis: Redis,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("PROXY_PASSWORD", PROXY_PASSWORD)
    async with (
        tinyproxy(tmp_path / "proxy", "relay", PROXY_PASSWORD) as proxy,
        sinks(Sink()) as (s,),
    ):
        via = proxy.url.replace("http://", "http://relay@")
        conf = sink_conf("s", s.url, proxy=via, proxy_password="env:PROXY_PASSWORD")
        rt = runtime(redis, config_with(redis_url, [conf]))
        await ingest(rt, ["e1", "e2"])
        async with worker(rt):
            await wait_for(lambda: len(s.received) >= 2, 15)
        assert sorted(s.ids()) == ["e1", "e2"]
        assert all("tinyproxy" in r.headers.get("Via", "") for r in s.received)
        assert not any("Proxy-Authorization" in r.headers for r in s.received)
        assert proxy.requests() == [f"POST {s.url}"] * 2
        assert s.bad_signatures == 0
    assert PROXY_PASSWORD not in caplog.text


async def test_an_https_sink_is_tunnelled_through_the_proxy_with_mutual_tls(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    ca = Authority(tmp_path / "ca", "private-ca")
    server, client = ca.issue("sink", server=True), ca.issue("relay", server=False)
    sink = Sink(ssl_context=server_context(server, client_ca=ca.ca_file))
    async with tinyproxy(tmp_path / "proxy", "relay", PROXY_PASSWORD) as proxy, sinks(sink) as (s,):
        via = proxy.url.replace("http://", f"http://relay:{PROXY_PASSWORD}@")
        conf = sink_conf(
            "s",
            s.url,
            proxy=via,
            ca_file=str(ca.ca_file),
            client_cert_file=str(client.cert),
            client_key_file=str(client.key),
        )
        rt = runtime(redis, config_with(redis_url, [conf]))
        await ingest(rt, ["e1"])
        async with worker(rt):
            await wait_for(lambda: s.ids() == ["e1"], 15)
        assert s.received[0].client == "relay"  # TLS end to end, through the tunnel
        assert "Via" not in s.received[0].headers  # the proxy saw only ciphertext
        assert proxy.requests() == [f"CONNECT 127.0.0.1:{s.port}"]


async def test_a_proxy_that_refuses_or_is_down_is_retried_and_its_password_kept_out(
    redis: Redis, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wr0ng-proxy-pass-93"
    ca = Authority(tmp_path / "ca", "private-ca")
    tls = Sink(ssl_context=server_context(ca.issue("sink", server=True)))
    async with (
        tinyproxy(tmp_path / "proxy", "relay", PROXY_PASSWORD) as proxy,
        sinks(Sink(), tls) as (plain, secure),
    ):
        # No credentials: 407. Wrong ones: tinyproxy answers 401 — which, to an http://
        # sink's request, cannot be told from the sink's own; to a CONNECT, it can.
        anonymous = proxy.url
        via = proxy.url.replace("http://", f"http://relay:{wrong}@")
        down = f"http://relay:{wrong}@127.0.0.1:{free_port()}"
        ca_file = str(ca.ca_file)
        cfg = config_with(
            redis_url,
            [
                sink_conf("plain", plain.url, proxy=anonymous, max_attempts=2),
                sink_conf("secure", secure.url, proxy=via, ca_file=ca_file, max_attempts=2),
                sink_conf("down", plain.url, proxy=down, max_attempts=2),
            ],
        )
        rt = runtime(redis, cfg)
        store = DeadLetterStore(redis, cfg)
        await ingest(rt, ["e1"])
        async with worker(rt):
            await wait_for(lambda: _dead_letters(store, 3), 15)
        assert plain.received == secure.received == []
    errors = {d.sink: d for d in await store.find(Filter())}
    assert {d.cls for d in errors.values()} == {"exhausted"}  # retried, not rejected
    assert "proxy: HTTP 407, the proxy refused its credentials" in errors["plain"].error
    assert "proxy: CONNECT refused with HTTP 401" in errors["secure"].error
    assert "proxy: cannot connect to the proxy 127.0.0.1" in errors["down"].error
    for d in errors.values():
        assert wrong not in d.error
    assert wrong not in caplog.text
    stored = [v for key in await redis.keys("*") for v in await _values(redis, key)]
    assert stored
    assert not [v for v in stored if wrong.encode() in v]


async def test_the_environments_proxy_is_used_unless_no_proxy_or_none_says_otherwise(
    redis: Redis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = Authority(tmp_path / "ca", "private-ca")
    tls = Sink(ssl_context=server_context(ca.issue("sink", server=True)))
    async with (
        tinyproxy(tmp_path / "proxy", "relay", PROXY_PASSWORD) as proxy,
        sinks(Sink(), Sink(), Sink(), tls) as (proxied, listed, opted_out, tunnelled),
    ):
        env_proxy = proxy.url.replace("http://", f"http://relay:{PROXY_PASSWORD}@")
        monkeypatch.setenv("HTTP_PROXY", env_proxy)
        monkeypatch.setenv("HTTPS_PROXY", env_proxy)
        monkeypatch.setenv("NO_PROXY", "example.com, localhost")
        localhost = listed.url.replace("127.0.0.1", "localhost")
        cfg = config_with(
            redis_url,
            [
                sink_conf("proxied", proxied.url),
                sink_conf("listed", localhost),  # NO_PROXY names it: direct
                sink_conf("opted-out", opted_out.url, proxy="none"),
                sink_conf("tunnelled", tunnelled.url, ca_file=str(ca.ca_file)),
            ],
        )
        rt = runtime(redis, cfg)
        await ingest(rt, ["e1"])
        async with worker(rt):
            every = (proxied, listed, opted_out, tunnelled)
            await wait_for(lambda: all(s.ids() == ["e1"] for s in every), 15)
        assert "tinyproxy" in proxied.received[0].headers.get("Via", "")
        assert "Via" not in listed.received[0].headers
        assert "Via" not in opted_out.received[0].headers
        assert sorted(proxy.requests()) == sorted(
            [f"POST {proxied.url}", f"CONNECT 127.0.0.1:{tunnelled.port}"]
        )


@pytest.mark.parametrize(
    ("host", "port", "no_proxy", "covered"),
    [
        ("crm.internal", 443, "internal", True),
        ("crm.internal", 443, ".internal", True),
        ("crm.internal", 443, "crm.internal", True),
        ("xcrm.internal", 443, "crm.internal", False),
        ("crm.internal", 443, "other.internal, *", True),
        ("crm.internal", 443, "crm.internal:8443", False),
        ("crm.internal", 8443, "crm.internal:8443", True),
        ("10.1.2.3", 443, "10.0.0.0/8", True),
        ("11.1.2.3", 443, "10.0.0.0/8", False),
        ("::1", 443, "::1/128", True),
        ("CRM.Internal", 443, "crm.INTERNAL", True),
        ("crm.internal", 443, "", False),
        ("crm.internal", 443, " , ,", False),
    ],
)
def test_no_proxy_names_hosts_domains_and_ranges(
    host: str, port: int, no_proxy: str, covered: bool
) -> None:
    assert no_proxy_covers(host, port, no_proxy) is covered


def test_the_environments_proxy_is_read_as_curl_reads_it() -> None:
    https = URL("https://crm.internal/hooks")
    lower = {"https_proxy": "http://lower:3128", "HTTPS_PROXY": "http://upper:3128"}
    assert env_proxy(https, lower) == (URL("http://lower:3128"), None)
    assert env_proxy(https, {"HTTPS_PROXY": "egress:3128"}) == (URL("http://egress:3128"), None)
    assert env_proxy(https, {"HTTP_PROXY": "http://egress:3128"}) == (None, None)
    assert env_proxy(URL("http://crm/h"), {"http_proxy": "http://e:1"}) == (URL("http://e:1"), None)
    for unusable in ("https://egress:3128", "socks5://egress:1080"):
        proxy, problem = env_proxy(https, {"HTTPS_PROXY": unusable})
        assert proxy is None
        assert problem is not None
        assert problem.startswith("the environment's HTTPS_PROXY is not an http://host:port proxy")


async def _dead_letters(store: DeadLetterStore, n: int) -> bool:
    return len(await store.find(Filter())) >= n
