"""TLS to sinks, end to end through the worker: real https sinks with certificates the
test makes (a private CA, server and client certificates). The right client
certificate is delivered; a refused handshake — no client certificate, another CA's,
an untrusted server, no TLS version in common — is never delivered and never a
``rejected`` dead letter: it is retried, and goes through once the configuration is
put right."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from relay.store.deadletters import DeadLetterStore, Filter
from tests.support.certs import AlertingTlsServer, Authority, Issued, server_context
from tests.support.common import TENANT, wait_for
from tests.support.delivery import (
    Sink,
    config_with,
    ingest,
    metric_sum,
    runtime,
    sink_conf,
    sinks,
    worker,
)


@dataclass(frozen=True)
class Pki:
    ca: Authority  # the private CA the relay is told to trust, and the sink too
    other: Authority  # a CA nobody here trusts
    server: Issued  # the sink's, from ca
    client: Issued  # the relay's, from ca
    stranger: Issued  # a client certificate from the other CA


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca, other = Authority(tmp_path / "ca", "private-ca"), Authority(tmp_path / "other", "other")
    return Pki(
        ca,
        other,
        ca.issue("sink", server=True),
        ca.issue("relay", server=False),
        other.issue("relay", server=False),
    )


def mtls_sink(pki: Pki, **extra: Any) -> Sink:
    """An https sink that requires a client certificate from the private CA."""
    return Sink(ssl_context=server_context(pki.server, client_ca=pki.ca.ca_file, **extra))


def tls_conf(pki: Pki, url: str, client: Issued | None = None, **extra: Any) -> dict[str, Any]:
    conf = sink_conf("s", url, ca_file=str(pki.ca.ca_file), **extra)
    if client is not None:
        conf |= {"client_cert_file": str(client.cert), "client_key_file": str(client.key)}
    return conf


async def attempts(redis: Redis, att: str) -> int:
    return int(await redis.hget(att, "a") or 0)


async def test_the_right_client_certificate_is_delivered_over_mutual_tls(
    redis: Redis, redis_url: str, pki: Pki
) -> None:
    async with sinks(mtls_sink(pki)) as (s,):
        rt = runtime(redis, config_with(redis_url, [tls_conf(pki, s.url, pki.client)]))
        await ingest(rt, ["e1", "e2", "e3"])
        async with worker(rt):
            await wait_for(lambda: len(s.received) >= 3, 15)
        assert sorted(s.ids()) == ["e1", "e2", "e3"]
        assert {r.client for r in s.received} == {"relay"}  # the sink saw our certificate
        assert s.bad_signatures == 0
        assert metric_sum(rt.metrics, "chert_relay_deliveries_total", outcome="delivered") == 3


async def test_a_refused_client_certificate_is_retried_until_the_right_one_is_set(
    redis: Redis, redis_url: str, pki: Pki, tmp_path: Path
) -> None:
    # Where the relay's certificate lives: another CA's at first, renewed in place later.
    current = Issued(tmp_path / "relay.crt", tmp_path / "relay.key")
    _install(pki.stranger, current)
    async with sinks(mtls_sink(pki)) as (s,):
        rt = runtime(redis, config_with(redis_url, [tls_conf(pki, s.url, max_attempts=1000)]))
        att = rt.keys.attempts(TENANT, "s", "e1")
        await ingest(rt, ["e1"])
        store = DeadLetterStore(redis, rt.config)
        async with worker(rt) as role:
            # No client certificate: the sink refuses (over TLS 1.3, aiohttp's server
            # resets the connection once the handshake is done).
            await wait_for(lambda: _at_least(redis, att, 2), 15)
            error = (await redis.hget(att, "err") or b"").decode()
            assert "reset" in error, error
            assert "refuses a client certificate" in error, error
            # Another CA's certificate: refused too.
            role.reload(config_with(redis_url, [tls_conf(pki, s.url, current)]))
            tried = await attempts(redis, att)
            await wait_for(lambda: _at_least(redis, att, tried + 2), 15)
            assert s.received == []
            assert await store.find(Filter()) == []  # retried, not rejected
            # The right one, renewed in place, and a reload: the waiting delivery goes.
            _install(pki.client, current)
            role.reload(config_with(redis_url, [tls_conf(pki, s.url, current)]))
            await wait_for(lambda: s.ids() == ["e1"], 15)
        assert s.received[0].client == "relay"
        assert s.received[0].attempt >= 4
        assert await store.find(Filter()) == []


def _install(issued: Issued, at: Issued) -> None:
    at.cert.write_bytes(issued.cert.read_bytes())
    at.key.write_bytes(issued.key.read_bytes())


async def test_a_sink_that_answers_with_a_tls_alert_is_named_in_the_error(
    redis: Redis, redis_url: str, pki: Pki
) -> None:
    # nginx or Apache refuse a missing client certificate with a TLS alert, which the
    # error names; still a retry, not a dead letter "rejected".
    tls12 = ssl.TLSVersion.TLSv1_2
    contexts = {
        "1.3": server_context(pki.server, client_ca=pki.ca.ca_file),
        "1.2": server_context(pki.server, client_ca=pki.ca.ca_file, max_version=tls12),
    }
    # Over TLS 1.3 the server checks the certificate after the client has finished its
    # side of the handshake: the client may already be sending its request, and then
    # reads the reset of the server's close before the alert. Both are named.
    said = {
        "1.3": (
            "TLS: the server requires a client certificate (set client_cert_file)",
            "(over TLS 1.3 this is also how a server refuses a client certificate)",
        ),
        "1.2": ("TLS: the server refused the handshake",),
    }
    for n, (version, context) in enumerate(contexts.items(), 1):
        with AlertingTlsServer(context) as server:
            cfg = config_with(redis_url, [tls_conf(pki, server.url, max_attempts=2)])
            rt = runtime(redis, cfg)
            store = DeadLetterStore(redis, cfg)
            await ingest(rt, [f"e-{version}"])
            async with worker(rt):
                await wait_for(lambda: _dead_letters(store, n), 15)  # noqa: B023 - awaited here
            [dead] = [d for d in await store.find(Filter()) if d.event_id == f"e-{version}"]
            assert dead.cls == "exhausted", dead
            assert any(s in dead.error for s in said[version]), dead.error
            assert server.handshakes == 0
            assert server.refused >= 2


async def test_an_untrusted_server_certificate_is_never_delivered(
    redis: Redis, redis_url: str, pki: Pki
) -> None:
    stranger_server = pki.other.issue("sink", server=True)
    async with sinks(
        Sink(ssl_context=server_context(stranger_server)),
        Sink(ssl_context=server_context(stranger_server)),
    ) as (private, default):
        cfg = config_with(
            redis_url,
            [
                sink_conf("private", private.url, ca_file=str(pki.ca.ca_file), max_attempts=2),
                sink_conf("default", default.url, max_attempts=2),  # the system's store
            ],
        )
        rt = runtime(redis, cfg)
        store = DeadLetterStore(redis, cfg)
        await ingest(rt, ["e1"])
        async with worker(rt):
            await wait_for(lambda: _dead_letters(store, 2), 15)
        assert private.received == default.received == []
        for dead in await store.find(Filter()):
            assert dead.cls == "exhausted"
            assert dead.attempts == 2
            assert "TLS: certificate verification failed" in dead.error, dead.error


async def test_a_minimum_of_tls_1_3_does_not_reach_a_sink_capped_at_1_2(
    redis: Redis, redis_url: str, pki: Pki
) -> None:
    capped = server_context(pki.server, max_version=ssl.TLSVersion.TLSv1_2)
    async with sinks(Sink(ssl_context=capped), Sink(ssl_context=capped)) as (strict, lenient):
        ca = str(pki.ca.ca_file)
        cfg = config_with(
            redis_url,
            [
                sink_conf("strict", strict.url, ca_file=ca, tls_min_version="1.3", max_attempts=2),
                sink_conf("lenient", lenient.url, ca_file=ca, tls_min_version="1.2"),
            ],
        )
        rt = runtime(redis, cfg)
        store = DeadLetterStore(redis, cfg)
        await ingest(rt, ["e1"])
        async with worker(rt):
            await wait_for(lambda: _dead_letters(store, 1), 15)
            await wait_for(lambda: lenient.ids() == ["e1"], 15)
        assert strict.received == []
        [dead] = await store.find(Filter())
        assert dead.sink == "strict"
        assert dead.error.startswith("out of attempts (2 of 2); last error: TLS:"), dead.error


async def test_an_https_url_to_a_plain_http_sink_says_so(redis: Redis, redis_url: str) -> None:
    async with sinks(Sink()) as (s,):
        url = s.url.replace("http://", "https://")
        cfg = config_with(redis_url, [sink_conf("s", url, max_attempts=1)])
        rt = runtime(redis, cfg)
        store = DeadLetterStore(redis, cfg)
        await ingest(rt, ["e1"])
        async with worker(rt):
            await wait_for(lambda: _dead_letters(store, 1), 15)
        [dead] = await store.find(Filter())
        assert "the server does not speak TLS on this port" in dead.error, dead.error


async def _at_least(redis: Redis, att: str, n: int) -> bool:
    return await attempts(redis, att) >= n


async def _dead_letters(store: DeadLetterStore, n: int) -> bool:
    return len(await store.find(Filter())) >= n
