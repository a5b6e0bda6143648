"""The simulator's SSE stream: backlog after ``since``, live rows, heartbeats, close, drops."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from relay.signing import api_request_headers
from relay.simulator import SimTenant, Simulator
from tests.support.common import wait_for

API_SECRET = "5f2b8c1d9e4a7f3b6c0d2e8f1a9b4c7d"
HOOK_SECRET = "7f3c1e9a5b2d4f6081a3c5e7f9b1d3e5a7c9e1f3b5d7f9a1c3e5b7d9f1a3c5e7"
TENANT = "acme-7a3f"


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    simulator = Simulator(
        tenants=[
            SimTenant(slug=TENANT, api_secret=API_SECRET, webhook_secret=HOOK_SECRET),
            SimTenant(slug="other-1", api_secret="1" * 32, webhook_secret=HOOK_SECRET),
        ],
        stream_lifetime=30.0,
        heartbeat_interval=30.0,
    )
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def read_line(resp: aiohttp.ClientResponse, timeout: float = 5.0) -> str:
    async with asyncio.timeout(timeout):
        return (await resp.content.readline()).decode()


async def read_event(resp: aiohttp.ClientResponse, timeout: float = 5.0) -> list[str]:
    """The lines of the next SSE block (up to the blank line); [] at end of stream."""
    lines: list[str] = []
    while True:
        line = await read_line(resp, timeout)
        if line == "":
            return lines
        if line == "\n":
            if lines:
                return lines
            continue
        lines.append(line.rstrip("\n"))


async def read_all(resp: aiohttp.ClientResponse, into: list[str]) -> None:
    while line := await read_line(resp):
        into.append(line)


def data_of(block: list[str]) -> dict[str, Any]:
    [line] = block
    assert line.startswith("data: ")
    row: dict[str, Any] = json.loads(line[len("data: ") :])
    return row


def stream_url(sim: Simulator, query: str = "") -> str:
    return f"{sim.base_url}/events/stream{query}"


async def test_backlog_after_since_then_live_rows(
    sim: Simulator, client: aiohttp.ClientSession
) -> None:
    old = sim.emit(TENANT, count=4)
    sim.emit("other-1", count=2)
    since = old[1]["created_at"]
    headers = api_request_headers(TENANT, API_SECRET)
    async with client.get(stream_url(sim, f"?since={since}"), headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["X-Trace-ID"]
        backlog = [data_of(await read_event(resp)) for _ in range(2)]
        assert [r["id"] for r in backlog] == [old[2]["id"], old[3]["id"]]  # strictly after
        live = sim.emit(TENANT, type="reaction.added", count=2)
        sim.emit("other-1")  # another tenant's rows never appear
        got = [data_of(await read_event(resp)) for _ in range(2)]
        assert [r["id"] for r in got] == [r["id"] for r in live]
        assert got[0]["payload"]["event"] == "reaction.added"
    req = next(r for r in sim.api_requests if r.path.endswith("/stream"))
    assert (req.status, req.tenant) == (200, TENANT)


async def test_no_backlog_without_since(sim: Simulator, client: aiohttp.ClientSession) -> None:
    sim.emit(TENANT, count=3)
    async with client.get(
        stream_url(sim), headers={"authorization": f"Bearer {API_SECRET}"}
    ) as resp:
        await wait_for(lambda: sim.open_streams == 1)
        [row] = sim.emit(TENANT)
        assert data_of(await read_event(resp))["id"] == row["id"]


async def test_heartbeats(sim: Simulator, client: aiohttp.ClientSession) -> None:
    sim.heartbeat_interval = 0.05
    async with client.get(stream_url(sim), headers=api_request_headers(TENANT, API_SECRET)) as resp:
        blocks = [await read_event(resp) for _ in range(3)]
    assert all(len(b) == 1 and b[0].startswith(":") for b in blocks), blocks


async def test_close_after_lifetime(sim: Simulator, client: aiohttp.ClientSession) -> None:
    sim.stream_lifetime = 0.2
    async with client.get(stream_url(sim), headers=api_request_headers(TENANT, API_SECRET)) as resp:
        assert await read_event(resp) == ["event: close", 'data: {"reason":"lifetime"}']
        assert await read_event(resp) == []  # then the server ends the response
    await wait_for(lambda: sim.open_streams == 0)


async def test_disconnect_streams_drops_without_close(
    sim: Simulator, client: aiohttp.ClientSession
) -> None:
    headers = api_request_headers(TENANT, API_SECRET)
    async with (
        client.get(stream_url(sim), headers=headers) as first,
        client.get(stream_url(sim), headers=headers) as second,
    ):
        await wait_for(lambda: sim.open_streams == 2)
        assert sim.disconnect_streams() == 2
        for resp in (first, second):
            lines: list[str] = []
            with pytest.raises(aiohttp.ClientPayloadError):
                await read_all(resp, lines)
            assert not any(line.startswith("event: close") for line in lines)
    await wait_for(lambda: sim.open_streams == 0)


async def test_stream_auth_errors_are_json(sim: Simulator, client: aiohttp.ClientSession) -> None:
    async with client.get(stream_url(sim)) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == 2012
    async with client.get(
        stream_url(sim, "?since=nope"), headers=api_request_headers(TENANT, API_SECRET)
    ) as resp:
        assert resp.status == 400
    sim.faults.api_429 = 1
    async with client.get(stream_url(sim), headers=api_request_headers(TENANT, API_SECRET)) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "1"
    assert sim.open_streams == 0


async def test_type_filter(sim: Simulator, client: aiohttp.ClientSession) -> None:
    async with client.get(
        stream_url(sim, "?type=lead_reply"), headers=api_request_headers(TENANT, API_SECRET)
    ) as resp:
        await wait_for(lambda: sim.open_streams == 1)
        sim.emit(TENANT, type="message.received")
        [row] = sim.emit(TENANT, type="lead_reply")
        assert data_of(await read_event(resp))["id"] == row["id"]


async def test_stop_ends_open_streams(client: aiohttp.ClientSession) -> None:
    sim = Simulator(tenants=[SimTenant(TENANT, API_SECRET, HOOK_SECRET)])
    await sim.start()
    async with client.get(stream_url(sim), headers=api_request_headers(TENANT, API_SECRET)) as resp:
        await wait_for(lambda: sim.open_streams == 1)
        await sim.stop()
        assert await read_event(resp) == []  # ended: a clean end of stream
