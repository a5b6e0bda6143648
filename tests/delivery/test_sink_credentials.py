"""A sink's credentials never reach a dead letter, a log line or Redis — including the
``Authorization: Basic …`` that aiohttp derives from credentials in the sink's URL."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from redis.asyncio import Redis

from relay.delivery.sink_client import scrub
from relay.store.deadletters import DeadLetterStore, Filter
from tests.support.common import wait_for
from tests.support.delivery import (
    Received,
    Sink,
    config_with,
    ingest,
    runtime,
    sink_conf,
    sinks,
    worker,
)


def _basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def test_the_basic_value_derived_from_url_credentials_is_scrubbed() -> None:
    cfg = config_with(
        "redis://127.0.0.1:1/0",
        [sink_conf("s", "https://relay-user:p%40ss-word99@sink.example/h")],
    )
    sink = cfg.tenants[0].sinks[0]
    token = _basic("relay-user", "p@ss-word99")  # percent-decoded, as aiohttp sends it
    for echoed in (f"Authorization: Basic {token}", f"bad credentials {token}", "p@ss-word99"):
        text = scrub(f"HTTP 400: {echoed}", sink)
        assert token not in text
        assert "p@ss-word99" not in text
        assert "p%40ss-word99" not in scrub("https://relay-user:p%40ss-word99@sink", sink)


def test_what_a_configured_basic_header_decodes_to_is_scrubbed() -> None:
    token = _basic("svc-account", "hunter2hunter2")
    cfg = config_with(
        "redis://127.0.0.1:1/0",
        [sink_conf("s", "https://sink.example/h", headers={"Authorization": f"Basic {token}"})],
    )
    sink = cfg.tenants[0].sinks[0]
    text = scrub(f"HTTP 400: user svc-account password hunter2hunter2 ({token})", sink)
    for secret in (token, "hunter2hunter2", "svc-account"):
        assert secret not in text
    assert "HTTP 400: user" in text


async def test_a_sink_echoing_the_derived_basic_value_leaks_it_nowhere(
    redis: Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    def echo(sink: Sink, got: Received) -> tuple[int, dict[str, str]]:
        sink.body = f"refused: Authorization: {got.headers.get('Authorization')}"
        return 400, {}

    async with sinks(Sink(echo)) as (s,):
        url = s.url.replace("http://", "http://relay-user:s3cret-pass-77@")
        cfg = config_with(redis_url, [sink_conf("s", url)])
        rt = runtime(redis, cfg)
        store = DeadLetterStore(redis, cfg)
        await ingest(rt, ["e1"])
        async with worker(rt):
            await wait_for(lambda: _one_dead_letter(store), 15)
        sent = s.received[0].headers["Authorization"]
    token = _basic("relay-user", "s3cret-pass-77")
    assert sent == f"Basic {token}"  # what aiohttp derived and sent
    (dead,) = await store.find(Filter())
    assert dead.error.startswith("HTTP 400: refused: Authorization:")
    assert token not in dead.error
    assert token not in caplog.text
    assert "s3cret-pass-77" not in caplog.text
    stored = [v for key in await redis.keys("*") for v in await _values(redis, key)]
    assert stored  # the dead letter is there
    assert not [v for v in stored if token.encode() in v]


async def _values(redis: Redis, key: Any) -> list[bytes]:
    kind = await redis.type(key)
    if kind == b"string":
        return [await redis.get(key)]
    if kind == b"hash":
        return [x for kv in (await redis.hgetall(key)).items() for x in kv]
    if kind == b"zset":
        return await redis.zrange(key, 0, -1)
    if kind == b"list":
        return await redis.lrange(key, 0, -1)
    if kind == b"set":
        return list(await redis.smembers(key))
    return []


async def _one_dead_letter(store: DeadLetterStore) -> bool:
    return len(await store.find(Filter())) == 1
