"""Redis high availability with real processes: a primary, a replica and three
sentinels. A failover loses no event that got a 2xx (with ``min_replica_acks = 1`` a
2xx means the event is on a replica too), and a replica that lags or is gone turns
202s into 503s."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from relay.config import parse_config
from relay.errors import UnsafeRedisError
from relay.service import Service
from relay.store.client import check_server
from relay.store.embedded import EmbeddedRedis, free_port
from relay.store.endpoint import Endpoint, close_client
from tests.support.common import TENANT, config_dict, envelope, signed, wait_for
from tests.support.delivery import Sink, sinks
from tests.support.process import RelayProcess
from tests.support.sentinel import SERVICE, deployment


class Chert:
    """Sends webhooks as Chert does: a non-2xx or a connection error is tried again, up
    to 3 attempts; remembers which events got a 2xx."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.acked: set[str] = set()
        self.refused = 0
        self.sent = 0

    async def send(self, session: aiohttp.ClientSession, event_id: str) -> None:
        raw, headers = signed(envelope(event_id))
        for attempt in range(3):
            self.sent += 1
            try:
                async with session.post(self.url, data=raw, headers=headers) as resp:
                    if 200 <= resp.status < 300:
                        self.acked.add(event_id)
                        return
                    self.refused += 1
            except aiohttp.ClientError:
                self.refused += 1
            await asyncio.sleep(0.2 * (attempt + 1))  # Chert's own backoff, not a sync


async def test_a_failover_loses_no_acknowledged_event(
    tmp_path: Path, procs: list[RelayProcess]
) -> None:
    async with deployment(tmp_path / "ha", replicas=1) as d, sinks(Sink()) as (sink,):
        path, port, admin = d.relay_config(tmp_path / "relay.toml", sink.url)
        relay = RelayProcess(path, "run").start()
        procs.append(relay)
        await relay.wait_ready(f"http://127.0.0.1:{admin}")
        chert = Chert(f"http://127.0.0.1:{port}/webhooks/chert/{TENANT}")
        old_primary = await d.primary_address()
        assert old_primary is not None

        stop = asyncio.Event()

        async def load(session: aiohttp.ClientSession) -> None:
            n = 0
            pending: set[asyncio.Task[None]] = set()
            while not stop.is_set():
                task = asyncio.create_task(chert.send(session, f"ha:{n}"))
                pending.add(task)
                task.add_done_callback(pending.discard)
                n += 1
                await asyncio.sleep(0.02)  # a steady 50 events/s, not a synchronization
            await asyncio.gather(*pending)

        async with aiohttp.ClientSession() as session:
            loader = asyncio.create_task(load(session))
            await wait_for(lambda: len(chert.acked) >= 50, 30)
            killed = d.node(old_primary)
            killed.kill()  # the primary's machine dies

            async def promoted() -> str | None:
                now = await d.primary_address()
                return now if now is not None and now != old_primary else None

            new_primary = await wait_for(promoted, 30)
            # The old primary comes back (as a replica: the sentinels make it one), so
            # that the new primary has a replica to acknowledge ingests again.
            await killed.start()
            acked_before = len(chert.acked)
            await wait_for(lambda: len(chert.acked) >= acked_before + 50, 60)
            stop.set()
            await loader

        # Every event that got a 2xx is delivered.
        await wait_for(lambda: chert.acked <= set(sink.ids()), 60)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                assert resp.status == 200
            async with session.get(f"http://127.0.0.1:{admin}/metrics") as resp:
                metrics = await resp.text()
        assert re.search(r"^chert_relay_redis_primary_changes_total [1-9]", metrics, re.M)
        assert f"the Redis primary is now {new_primary} (was {old_primary})" in relay.log
        assert chert.refused > 0  # the failover was felt, as 503s Chert retried
        relay.signal(signal.SIGTERM)
        assert await relay.wait(60) == 0


@contextlib.asynccontextmanager
async def replicated(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedRedis, EmbeddedRedis]]:
    primary = EmbeddedRedis(tmp_path / "primary", port=free_port())
    await primary.start()
    replica = EmbeddedRedis(
        tmp_path / "replica",
        port=free_port(),
        extra=("--replicaof", "127.0.0.1", str(primary.port)),
    )
    try:
        await replica.start()
        yield primary, replica
    finally:
        await replica.stop()
        await primary.stop()


async def test_a_lagging_or_stopped_replica_turns_202_into_503(tmp_path: Path) -> None:
    async with replicated(tmp_path) as (primary, replica):
        data = config_dict(redis_url=primary.url, redis={})
        # long enough for a healthy replica on a busy machine; a stopped one never acks
        data["redis"].update(min_replica_acks=1, replica_ack_timeout="1s")
        service = Service(parse_config(data, env={}), roles=("receiver", "admin"))
        task = asyncio.create_task(service.run())
        try:
            await asyncio.wait_for(service.started.wait(), 30)
            role = service.roles["receiver"]
            host, port = role.addresses[0][:2]  # type: ignore[attr-defined]
            url = f"http://{host}:{port}/webhooks/chert/{TENANT}"
            async with aiohttp.ClientSession() as session:

                async def post(event_id: str) -> int:
                    raw, headers = signed(envelope(event_id))
                    async with session.post(url, data=raw, headers=headers) as resp:
                        return resp.status

                await wait_for(lambda: _synced(primary), 20)
                assert await post("r1") == 202
                assert replica.process is not None
                os.kill(replica.process.pid, signal.SIGSTOP)  # lagging: it acks nothing
                try:
                    assert await post("r2") == 503
                    assert await post("r2") == 503  # stored, not yet on a replica
                finally:
                    os.kill(replica.process.pid, signal.SIGCONT)

                async def duplicate_acked() -> bool:
                    return await post("r2") == 200  # replicated now: Chert's retry gets 200

                await wait_for(duplicate_acked, 20)
                await replica.stop()  # gone
                assert await post("r3") == 503
                assert service.runtime is not None
                registry = service.runtime.metrics.registry
                assert (registry.get_sample_value("chert_relay_ingest_unacked_total") or 0) >= 3
        finally:
            service.request_stop()
            await asyncio.wait_for(task, 30)


async def _synced(primary: EmbeddedRedis) -> bool:
    client: Redis = Redis.from_url(primary.url)
    try:
        info = await client.info("replication")
    finally:
        await client.aclose()
    return any(k.startswith("slave") and v.get("state") == "online" for k, v in info.items())


async def test_start_up_refuses_a_replica_and_warns_about_missing_replicas(
    tmp_path: Path,
) -> None:
    async with replicated(tmp_path) as (primary, replica):
        client: Redis = Redis.from_url(replica.url)
        try:
            with pytest.raises(UnsafeRedisError, match="is a replica"):
                await check_server(client)
        finally:
            await client.aclose()
        client = Redis.from_url(primary.url)
        try:
            await wait_for(lambda: _synced(primary), 20)
            warnings = await check_server(client, min_replica_acks=2)
            assert any("min_replica_acks is 2 but 1 replica(s)" in w for w in warnings)
            assert any("min-replicas-to-write 0" in w for w in warnings)
            replica_client: Redis = Redis.from_url(replica.url)
            try:
                await replica_client.config_set("appendonly", "no")
            finally:
                await replica_client.aclose()
            warnings = await check_server(client, min_replica_acks=1)
            assert any(f"replica at 127.0.0.1:{replica.port} has AOF off" in w for w in warnings)
        finally:
            await client.aclose()


async def test_every_client_finds_the_primary_through_the_sentinels(tmp_path: Path) -> None:
    async with deployment(tmp_path / "ha", replicas=1) as d:
        sentinels = tuple(("127.0.0.1", p) for p in d.sentinel_ports)
        endpoint = Endpoint(sentinels=sentinels, service_name=SERVICE)
        client = endpoint.client(timeout=2)
        sync = endpoint.sync_client()
        try:
            await client.set("k", "v")
            assert sync.get("k") == b"v"
            assert endpoint.describe().startswith(f"the primary of {SERVICE!r}")
            seen: list[tuple[str | None, str]] = []
            watch = asyncio.create_task(
                endpoint.watch_primary(lambda old, new: seen.append((old, new)), every=0.2)
            )
            await wait_for(lambda: seen, 10)
            old = seen[0][1]
            d.node(old).kill()
            await wait_for(lambda: len(seen) >= 2, 30)
            assert seen[1][0] == old
            assert seen[1][1] != old
            # The same clients write to the new primary once their connections notice.
            await wait_for(lambda: _writes(client), 30)
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        finally:
            await close_client(client)
            sync.close()


async def _writes(client: Redis) -> bool:
    try:
        await client.set("after", "failover")
    except Exception:
        return False
    return True
