"""OAuth2 client credentials to sinks, end to end through the worker, against a real
token endpoint the test runs: one token fetched and shared by concurrent deliveries,
reused until shortly before it expires, one refetch and one resend on a sink's 401;
an endpoint that fails or refuses is a retry; the secret and the tokens reach no log,
no dead letter, no event log and no Redis key."""

from __future__ import annotations

import asyncio
import base64
import logging
from urllib.parse import quote_plus

import aiohttp
import pytest
from redis.asyncio import Redis
from yarl import URL

from relay.config import parse_config
from relay.delivery.egress import way_to
from relay.delivery.oauth2 import Tokens
from relay.store.deadletters import DeadLetterStore, Filter
from tests.delivery.test_sink_credentials import _values
from tests.support.common import TENANT, config_dict, wait_for
from tests.support.delivery import (
    Received,
    Reply,
    Sink,
    config_with,
    ingest,
    runtime,
    sink_conf,
    sinks,
    worker,
)
from tests.support.oauth2 import TokenEndpoint, bearer_only

SECRET = "cl1ent-s3cret:with/odd+chars"


@pytest.fixture(autouse=True)
def client_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIENT_SECRET", SECRET)


async def test_one_token_is_fetched_for_concurrent_deliveries_and_reused(
    redis: Redis, redis_url: str
) -> None:
    async with (
        TokenEndpoint("chert-relay", SECRET) as endpoint,
        sinks(Sink(bearer_only(endpoint))) as (s,),
    ):
        oauth2 = endpoint.oauth2(scope="events.write", audience="https://crm.internal")
        # Two sinks of one OAuth2 client (the same URL, to count on one sink): one token.
        confs = [sink_conf(n, s.url, concurrency=16, oauth2=oauth2) for n in ("a", "b")]
        cfg = config_with(redis_url, confs)
        rt = runtime(redis, cfg)
        ids = [f"e{i:02d}" for i in range(15)]
        await ingest(rt, ids)
        endpoint.gate = asyncio.Event()  # the endpoint answers when the test says
        async with worker(rt) as role:
            # Many deliveries under way, all waiting for the one fetch:
            await wait_for(lambda: len(role.deliverer.running) >= 16 and endpoint.fetches, 15)
            assert endpoint.fetches == 1
            endpoint.gate.set()
            await wait_for(lambda: len(s.received) >= 30, 15)
            assert sorted(s.ids()) == sorted(ids * 2)
            assert endpoint.fetches == 1  # ...and every later one reused its token
            # A reload starts afresh: the next delivery fetches a new token.
            role.reload(config_with(redis_url, confs))
            await ingest(rt, ["after-reload"])
            await wait_for(lambda: len(s.received) >= 32, 15)
        assert endpoint.fetches == 2
        tokens = [r.headers["Authorization"] for r in s.received]
        assert set(tokens[:30]) == {f"Bearer {endpoint.issued[0]}"}
        assert set(tokens[30:]) == {f"Bearer {endpoint.issued[1]}"}
        asked = endpoint.asked[0]
        assert asked.basic
        assert (asked.client_id, asked.client_secret) == ("chert-relay", SECRET)
        assert asked.form == {
            "grant_type": "client_credentials",
            "scope": "events.write",
            "audience": "https://crm.internal",
        }


async def test_a_401_fetches_one_fresh_token_and_sends_again_in_the_same_attempt(
    redis: Redis, redis_url: str
) -> None:
    async with (
        TokenEndpoint("chert-relay", SECRET) as endpoint,
        sinks(Sink(bearer_only(endpoint))) as (s,),
    ):
        conf = sink_conf("s", s.url, concurrency=16, oauth2=endpoint.oauth2())
        rt = runtime(redis, config_with(redis_url, [conf]))
        await ingest(rt, ["first"])
        async with worker(rt):
            await wait_for(lambda: s.ids() == ["first"], 15)
            endpoint.revoke_all()  # the sink no longer takes the token the relay holds
            later = [f"e{i}" for i in range(8)]
            await ingest(rt, later)
            await wait_for(lambda: all(_delivered(s, endpoint, i) for i in later), 15)
        assert endpoint.fetches == 2  # one refetch, shared by every refused delivery
        refused = [i for i in later if len(s.for_event(i)) == 2]
        assert refused  # the first to go out still had the revoked token
        for event_id in later:
            tries = s.for_event(event_id)
            assert tries[-1].headers["Authorization"] == f"Bearer {endpoint.issued[1]}"
            assert {r.attempt for r in tries} == {1}  # the resend is the same attempt
        assert await redis.zcard(rt.keys.dead_letters(TENANT)) == 0


async def test_a_sink_that_refuses_the_fresh_token_too_is_a_rejected_dead_letter(
    redis: Redis, redis_url: str
) -> None:
    async with (
        TokenEndpoint("chert-relay", SECRET) as endpoint,
        sinks(Sink(lambda s, r: (401, {}))) as (s,),
    ):
        cfg = config_with(redis_url, [sink_conf("s", s.url, oauth2=endpoint.oauth2())])
        rt = runtime(redis, cfg)
        store = DeadLetterStore(redis, cfg)
        await ingest(rt, ["e1"])
        async with worker(rt):
            await wait_for(lambda: store.find(Filter()), 15)
        [dead] = await store.find(Filter())
        assert (dead.cls, dead.status, dead.attempts) == ("rejected", 401, 1)
        assert len(s.received) == 2  # sent, refused, a fresh token, sent once more
        assert endpoint.fetches == 2


async def test_tokens_are_renewed_shortly_before_they_expire() -> None:
    now = [1000.0]
    async with (
        TokenEndpoint("chert-relay", SECRET) as endpoint,
        aiohttp.ClientSession() as session,
    ):
        tokens = Tokens(session, clock=lambda: now[0])
        for expires_in, fresh_for in ((600, 570.0), (100, 90.0), ("60", 54.0), (None, 270.0)):
            endpoint.expires_in = expires_in
            cfg = parse_config(
                config_dict(sinks=[{"name": "s", "url": "http://127.0.0.1:9/h",
                                    "oauth2": endpoint.oauth2()}]),
                env={},
            )  # fmt: skip
            sink = cfg.tenants[0].sinks[0]
            assert sink.oauth2 is not None
            way = way_to(sink, URL(endpoint.url), {})
            fetched = endpoint.fetches
            first = await tokens.get(sink.oauth2, way, 5)
            assert endpoint.fetches == fetched + 1
            now[0] += fresh_for - 0.5
            assert await tokens.get(sink.oauth2, way, 5) == first  # still fresh: reused
            assert endpoint.fetches == fetched + 1
            now[0] += 1.0
            assert await tokens.get(sink.oauth2, way, 5) != first  # renewed
            assert endpoint.fetches == fetched + 2
            tokens.forget()


async def test_a_failing_token_endpoint_is_retried_and_warned_about_once(
    redis: Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery.oauth2")
    async with TokenEndpoint("chert-relay", SECRET, fail=503) as endpoint:
        async with sinks(Sink(bearer_only(endpoint))) as (s,):
            conf = sink_conf("s", s.url, max_attempts=1000, oauth2=endpoint.oauth2())
            rt = runtime(redis, config_with(redis_url, [conf]))
            att = rt.keys.attempts(TENANT, "s", "e1")
            await ingest(rt, ["e1"])
            async with worker(rt):
                await wait_for(lambda: _attempts_at_least(redis, att, 3), 15)
                error = (await redis.hget(att, "err") or b"").decode()
                assert error == (
                    "OAuth2 token endpoint: HTTP 503 temporarily_unavailable: try later"
                )
                assert s.received == []  # no token, no request
                endpoint.fail = None
                await wait_for(lambda: s.ids() == ["e1"], 15)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "no token (HTTP 503" in warnings[0].getMessage()
        assert "gives tokens again" in caplog.text
        assert await redis.zcard(rt.keys.dead_letters(TENANT)) == 0


async def test_a_refused_client_is_retried_and_its_echoed_secret_scrubbed(
    redis: Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with (
        TokenEndpoint("chert-relay", "another-secret") as endpoint,
        sinks(Sink(bearer_only(endpoint))) as (s,),
    ):
        conf = sink_conf("s", s.url, max_attempts=2, oauth2=endpoint.oauth2())
        cfg = config_with(redis_url, [conf])
        rt = runtime(redis, cfg)
        store = DeadLetterStore(redis, cfg)
        await ingest(rt, ["e1"])
        async with worker(rt):
            await wait_for(lambda: store.find(Filter()), 15)
        [dead] = await store.find(Filter())
        assert dead.cls == "exhausted"  # the sink never saw the event: not "rejected"
        assert "OAuth2 token endpoint: HTTP 401 invalid_client: unknown client" in dead.error
        assert endpoint.asked[0].client_secret == SECRET  # what the endpoint echoes back
        for text in (dead.error, caplog.text):
            assert SECRET not in text
            assert quote_plus(SECRET) not in text
    await _nowhere_in_redis(redis, [SECRET])


async def test_auth_method_post_sends_the_credentials_in_the_form(
    redis: Redis, redis_url: str
) -> None:
    async with (
        TokenEndpoint("chert-relay", SECRET) as endpoint,
        sinks(Sink(bearer_only(endpoint))) as (s,),
    ):
        oauth2 = endpoint.oauth2(auth_method="post")
        rt = runtime(redis, config_with(redis_url, [sink_conf("s", s.url, oauth2=oauth2)]))
        await ingest(rt, ["e1"])
        async with worker(rt):
            await wait_for(lambda: s.ids() == ["e1"], 15)
        [asked] = endpoint.asked
        assert not asked.basic
        assert asked.form["client_secret"] == SECRET


async def test_the_secret_and_the_tokens_reach_no_log_and_no_redis_key(
    redis: Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    def echo(sink: Sink, got: Received) -> Reply:
        # A sink that echoes the credential it got: in a 500's body, then a 2xx's.
        sink.body = f"you sent: {got.headers.get('Authorization')}"
        return (500, {}) if len(sink.received) == 1 else (200, {})

    async with TokenEndpoint("chert-relay", SECRET) as endpoint, sinks(Sink(echo)) as (s,):
        rt = runtime(
            redis, config_with(redis_url, [sink_conf("s", s.url, oauth2=endpoint.oauth2())])
        )
        await ingest(rt, ["e1"])
        async with worker(rt):
            await wait_for(lambda: len(s.received) == 2, 15)
            await wait_for(
                lambda: _no_attempt_record(redis, rt.keys.attempts(TENANT, "s", "e1")), 15
            )
        [token] = endpoint.issued
        assert s.received[1].headers["Authorization"] == f"Bearer {token}"
        basic = base64.b64encode(f"chert-relay:{quote_plus(SECRET)}".encode()).decode()
        for secret in (SECRET, token, basic):
            assert secret not in caplog.text
        record = await redis.hgetall(rt.keys.event_log(TENANT, "e1"))
        attempts = [v for k, v in record.items() if k.startswith(b"a:s:")]
        assert len(attempts) == 2  # the event log holds both, with what the sink said
        assert b"you sent: Bearer ***" in attempts[1]
        await _nowhere_in_redis(redis, [SECRET, token, basic])


def _delivered(sink: Sink, endpoint: TokenEndpoint, event_id: str) -> bool:
    """The sink took the event: its last request had a token the endpoint stands by."""
    tries = sink.for_event(event_id)
    return bool(tries) and endpoint.valid(tries[-1].headers["Authorization"].partition(" ")[2])


async def _attempts_at_least(redis: Redis, att: str, n: int) -> bool:
    return int(await redis.hget(att, "a") or 0) >= n


async def _no_attempt_record(redis: Redis, att: str) -> bool:
    return not await redis.exists(att)


async def _nowhere_in_redis(redis: Redis, secrets: list[str]) -> None:
    stored = [v for key in await redis.keys("*") for v in [key, *await _values(redis, key)]]
    assert stored
    for secret in secrets:
        assert not [v for v in stored if secret.encode() in v], secret
