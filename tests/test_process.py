"""The daemon as a real process: start-up checks, exit codes, SIGTERM, the embedded Redis."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis

from relay.errors import EXIT_CONFIG, EXIT_OK
from relay.keys import Keys
from relay.store.embedded import EmbeddedRedis
from tests.support.common import TENANT, config_dict, envelope, signed
from tests.support.process import RelayProcess, listen_ports, write_toml


def relay_config(tmp_path: Path, redis_url: str | None, **sections: Any) -> tuple[Path, str, str]:
    port, admin = listen_ports()
    data = config_dict(redis_url=redis_url, **sections)
    data["server"]["listen"] = f"127.0.0.1:{port}"
    data["admin"]["listen"] = f"127.0.0.1:{admin}"
    data.setdefault("relay", {})["state_dir"] = str(tmp_path / "state")
    path = write_toml(tmp_path / "relay.toml", data)
    return path, f"http://127.0.0.1:{port}/webhooks/chert/{TENANT}", f"http://127.0.0.1:{admin}"


async def post(session: aiohttp.ClientSession, url: str, event_id: str) -> int:
    raw, headers = signed(envelope(event_id))
    try:
        async with session.post(url, data=raw, headers=headers) as resp:
            return resp.status
    except aiohttp.ClientError:
        return 0  # refused or cut: never acknowledged


async def test_sigterm_during_a_burst_loses_no_acknowledged_event(
    tmp_path: Path, redis_url: str, redis: Redis, procs: list[RelayProcess]
) -> None:
    path, url, admin = relay_config(tmp_path, redis_url)
    relay = RelayProcess(path).start()
    procs.append(relay)
    await relay.wait_ready(admin)

    ids = [f"burst:{i}" for i in range(600)]
    statuses: dict[str, int] = {}
    answered = asyncio.Event()

    async def one(session: aiohttp.ClientSession, event_id: str) -> None:
        statuses[event_id] = await post(session, url, event_id)
        if sum(1 for s in statuses.values() if s == 202) >= 150:
            answered.set()

    connector = aiohttp.TCPConnector(limit=32)
    async with aiohttp.ClientSession(connector=connector) as session:
        burst = asyncio.gather(*(one(session, i) for i in ids))
        await asyncio.wait_for(answered.wait(), 60)
        relay.signal(signal.SIGTERM)
        await burst
    assert await relay.wait() == EXIT_OK, relay.log

    acked = [i for i, s in statuses.items() if s in (200, 202)]
    assert len(acked) >= 150
    assert set(statuses.values()) <= {0, 202, 503}
    keys = Keys("chert-relay")
    q = Keys("chert-relay").queue
    for event_id in acked:
        assert await redis.exists(keys.seen(TENANT, event_id)), event_id
        assert await redis.exists(keys.event(TENANT, event_id)), event_id
        for sink in ("crm", "all"):
            job_id = Keys("chert-relay").job_id(TENANT, sink, event_id)
            assert await redis.zscore(q, job_id) is not None, job_id
    assert "shutting down" in relay.log


async def test_embedded_redis_persists_across_restarts(
    tmp_path: Path, procs: list[RelayProcess]
) -> None:
    path, url, admin = relay_config(tmp_path, None)
    async with aiohttp.ClientSession() as session:
        for expected in (202, 200):  # the second run remembers the first run's event
            relay = RelayProcess(path).start()
            procs.append(relay)
            await relay.wait_ready(admin)
            assert await post(session, url, "persist:1") == expected
            relay.signal(signal.SIGTERM)
            assert await relay.wait() == EXIT_OK, relay.log
            assert "embedded redis-server stopped" in relay.log
    aof = list((tmp_path / "state" / "redis").rglob("*.aof"))
    assert aof, "AOF files are written under state_dir"
    assert not (tmp_path / "state" / "redis" / "redis.sock").exists()


async def test_bad_config_exits_78_listing_every_problem(
    tmp_path: Path, procs: list[RelayProcess]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[server]\nlisten = "nowhere"\nmax_body = 1\n[[tenants]]\nslug = "a"\n'
        'webhook_secrets = ["env:CHERT_TEST_UNSET_VAR"]\n'
        '[[tenants.sinks]]\nname = "s"\nurl = "http://x"\ntimeout = "soon"\n'
    )
    relay = RelayProcess(path).start()
    procs.append(relay)
    assert await relay.wait() == EXIT_CONFIG
    for needle in (
        "server.listen",
        "server.max_body: unknown key",
        "tenants[0].webhook_secrets[0]: environment variable CHERT_TEST_UNSET_VAR",
        "tenants[0].sinks[0].timeout",
    ):
        assert needle in relay.log

    check = RelayProcess(path, "check-config").start()
    procs.append(check)
    assert await check.wait() == EXIT_CONFIG
    assert "server.listen" in check.log


async def test_a_redis_that_can_evict_is_refused_and_aof_off_warns(
    tmp_path: Path,
    procs: list[RelayProcess],
    make_redis_server: Callable[[], Awaitable[EmbeddedRedis]],
) -> None:
    server = await make_redis_server()
    client: Redis = Redis.from_url(server.url)
    try:
        await client.config_set("maxmemory-policy", "volatile-lru")
        path, _, admin = relay_config(tmp_path, server.url)
        relay = RelayProcess(path).start()
        procs.append(relay)
        assert await relay.wait() == EXIT_CONFIG
        assert "maxmemory-policy is 'volatile-lru'" in relay.log

        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("appendonly", "no")
        relay = RelayProcess(path).start()
        procs.append(relay)
        await relay.wait_ready(admin)
        relay.signal(signal.SIGTERM)
        assert await relay.wait() == EXIT_OK
        assert "AOF off" in relay.log

        (tmp_path / "strict").mkdir()
        strict, _, _ = relay_config(tmp_path / "strict", server.url, redis={"require_aof": True})
        relay = RelayProcess(strict).start()
        procs.append(relay)
        assert await relay.wait() == EXIT_CONFIG
        assert "refusing to start: Redis has AOF off (appendonly no)" in relay.log

        await client.config_set("appendonly", "yes")
        relay = RelayProcess(path).start()
        procs.append(relay)
        await relay.wait_ready(admin)
        relay.signal(signal.SIGTERM)
        assert await relay.wait() == EXIT_OK
        assert "appendfsync everysec" in relay.log  # the test servers fsync every second

        # an event log allowed more than a quarter of Redis' memory: warned, not refused
        await client.config_set("maxmemory", str(64 * 2**20))
        (tmp_path / "log").mkdir()
        big_log, _, admin = relay_config(
            tmp_path / "log", server.url, event_log={"enabled": True, "max_memory": "32MiB"}
        )
        relay = RelayProcess(big_log).start()
        procs.append(relay)
        await relay.wait_ready(admin)
        relay.signal(signal.SIGTERM)
        assert await relay.wait() == EXIT_OK
        assert (
            "event_log.max_memory (33,554,432 bytes) is more than a quarter of Redis' "
            "maxmemory (67,108,864 bytes)" in relay.log
        )
    finally:
        await client.aclose()
