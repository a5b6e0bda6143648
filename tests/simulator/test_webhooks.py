"""The simulator's webhook pushes: signatures, Chert's retry rule, faults, replay.

A real aiohttp server on 127.0.0.1 stands in for the webhook endpoint; it answers
from a script of statuses and records what it received.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from relay.errors import SignatureError
from relay.signing import api_request_headers, verify_webhook
from relay.simulator import Faults, SimTenant, Simulator
from relay.store.embedded import free_port
from tests.support.common import wait_for

API_SECRET = "5f2b8c1d9e4a7f3b6c0d2e8f1a9b4c7d"
HOOK_SECRET = "7f3c1e9a5b2d4f6081a3c5e7f9b1d3e5a7c9e1f3b5d7f9a1c3e5b7d9f1a3c5e7"
TENANT = "acme-7a3f"


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def event_id(self) -> str:
        return str(json.loads(self.body)["event_id"])


@dataclass
class Endpoint:
    """A webhook endpoint: answers ``script`` in turn, then ``default``."""

    url: str = ""
    script: list[int] = field(default_factory=list)
    default: int = 200
    received: list[Received] = field(default_factory=list)
    hold: asyncio.Event | None = None  # when set, requests wait for it

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append(Received(dict(request.headers), body))
        if self.hold is not None:
            await self.hold.wait()
        status = self.script.pop(0) if self.script else self.default
        return web.json_response({"status": status}, status=status)

    def ids(self) -> list[str]:
        return [r.event_id for r in self.received]


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    ep = Endpoint()
    app = web.Application()
    app.router.add_post("/webhooks/chert/{tenant}", ep.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    ep.url = f"http://{host}:{port}/webhooks/chert/{TENANT}"
    yield ep
    if ep.hold is not None:
        ep.hold.set()
    await runner.cleanup()


def make_sim(url: str | None, **kwargs: Any) -> Simulator:
    tenant = SimTenant(
        slug=TENANT,
        api_secret=API_SECRET,
        webhook_secret=HOOK_SECRET,
        webhook_url=url,
        subscription_id="sub_test1",
        legacy_signature=kwargs.pop("legacy", False),
    )
    kwargs.setdefault("webhook_retry_backoff", 0.02)
    kwargs.setdefault("seed", 11)
    return Simulator(tenants=[tenant], **kwargs)


@pytest.fixture
async def sim(endpoint: Endpoint) -> AsyncIterator[Simulator]:
    simulator = make_sim(endpoint.url)
    await simulator.start()
    yield simulator
    await simulator.stop()


def status_of(sim: Simulator, row: dict[str, Any]) -> str:
    [now] = [r for r in sim.log(TENANT) if r["id"] == row["id"]]
    return str(now["delivery"]["status"])


# --- delivery and signatures ----------------------------------------------------------


async def test_push_is_signed_and_logged_as_delivered(sim: Simulator, endpoint: Endpoint) -> None:
    [row] = sim.emit(TENANT, type="message.received")
    assert row["delivery"]["status"] == "pending"  # logged before any delivery
    await sim.wait_idle(timeout=10)
    [got] = endpoint.received
    assert json.loads(got.body) == row["payload"]
    assert got.headers["X-Webhook-Event"] == "message.received"
    assert got.headers["X-Webhook-Event-Id"] == row["event_id"]
    assert got.headers["X-Webhook-Subscription-Id"] == "sub_test1"
    assert got.headers["Content-Type"] == "application/json"
    assert "x-chert-signature" not in {k.lower() for k in got.headers}
    verify_webhook(got.headers, got.body, [HOOK_SECRET.encode()], tolerance=300)
    with pytest.raises(SignatureError):
        verify_webhook(got.headers, got.body, [API_SECRET.encode()], tolerance=300)
    [logged] = sim.log(TENANT)
    delivery = logged["delivery"]
    assert delivery["status"] == "delivered"
    assert delivery["delivered_at"]
    assert delivery["url"] == endpoint.url
    [attempt] = delivery["attempts"]
    assert attempt["status"] == 200
    assert attempt["subscription_id"] == "sub_test1"
    assert [(a.event_id, a.attempt, a.status) for a in sim.webhook_attempts] == [
        (row["event_id"], 1, 200)
    ]


@pytest.mark.parametrize("how", ["tenant", "fault"])
async def test_legacy_signature(endpoint: Endpoint, how: str) -> None:
    async with make_sim(endpoint.url, legacy=how == "tenant") as sim:
        sim.faults.legacy_signature = how == "fault"
        sim.emit(TENANT, type="lead_reply")
        await sim.wait_idle(timeout=10)
    [got] = endpoint.received
    headers = {k.lower(): v for k, v in got.headers.items()}
    assert "x-webhook-signature" not in headers
    assert headers["x-chert-signature"].startswith("v1,")
    verify_webhook(got.headers, got.body, [HOOK_SECRET.encode()], tolerance=300)


# --- Chert's retry rule ---------------------------------------------------------------


async def test_500_then_200_is_delivered_on_attempt_2(sim: Simulator, endpoint: Endpoint) -> None:
    endpoint.script = [500]
    [row] = sim.emit(TENANT)
    await sim.wait_idle(timeout=10)
    assert endpoint.ids() == [row["event_id"]] * 2
    assert [(a.attempt, a.status) for a in sim.webhook_attempts] == [(1, 500), (2, 200)]
    [logged] = sim.log(TENANT)
    assert logged["delivery"]["status"] == "delivered"
    assert [a["status"] for a in logged["delivery"]["attempts"]] == [500, 200]
    # Each attempt is signed afresh and verifies on its own.
    for got in endpoint.received:
        verify_webhook(got.headers, got.body, [HOOK_SECRET.encode()], tolerance=300)


@pytest.mark.parametrize("status", [400, 401, 404, 410, 429])
async def test_4xx_is_never_retried(sim: Simulator, endpoint: Endpoint, status: int) -> None:
    endpoint.default = status
    [row] = sim.emit(TENANT)
    await sim.wait_idle(timeout=10)
    assert len(endpoint.received) == 1
    assert status_of(sim, row) == "failed"
    assert [a.status for a in sim.webhook_attempts] == [status]


async def test_three_5xx_then_failed_with_backoff(sim: Simulator, endpoint: Endpoint) -> None:
    endpoint.default = 503
    [row] = sim.emit(TENANT)
    await sim.wait_idle(timeout=10)
    attempts = sim.webhook_attempts
    assert [(a.attempt, a.status) for a in attempts] == [(1, 503), (2, 503), (3, 503)]
    assert status_of(sim, row) == "failed"
    # Exponential backoff: base 0.02 s, then 0.04 s.
    assert attempts[1].time - attempts[0].time >= 0.02
    assert attempts[2].time - attempts[1].time >= 0.04


async def test_connection_errors_are_retried_then_failed() -> None:
    url = f"http://127.0.0.1:{free_port()}/webhooks/chert/{TENANT}"  # nothing listens
    async with make_sim(url) as sim:
        [row] = sim.emit(TENANT)
        await sim.wait_idle(timeout=10)
        attempts = sim.webhook_attempts
        assert [a.attempt for a in attempts] == [1, 2, 3]
        assert all(a.status is None and a.error for a in attempts)
        assert status_of(sim, row) == "failed"
        [logged] = sim.log(TENANT)
        assert all(a["status"] is None and a["error"] for a in logged["delivery"]["attempts"])


async def test_timeouts_are_retried(endpoint: Endpoint) -> None:
    endpoint.hold = asyncio.Event()  # never answers until the test ends
    async with make_sim(endpoint.url, webhook_timeout=0.05) as sim:
        [row] = sim.emit(TENANT)
        await sim.wait_idle(timeout=10)
        assert [(a.attempt, a.error) for a in sim.webhook_attempts] == [
            (1, "timeout"),
            (2, "timeout"),
            (3, "timeout"),
        ]
        assert status_of(sim, row) == "failed"


# --- faults ---------------------------------------------------------------------------


async def test_drop_everything(sim: Simulator, endpoint: Endpoint) -> None:
    sim.faults.drop_rate = 1.0
    rows = sim.emit(TENANT, count=5)
    await sim.wait_idle(timeout=10)
    assert endpoint.received == []
    assert all(status_of(sim, r) == "failed" for r in rows)
    assert [a.error for a in sim.webhook_attempts] == ["dropped"] * 5
    assert sim.stats()["webhooks"]["dropped"] == 5


async def test_drop_a_share(sim: Simulator, endpoint: Endpoint) -> None:
    sim.faults.drop_rate = 0.5
    rows = sim.emit(TENANT, count=40)
    await sim.wait_idle(timeout=10)
    delivered = {r["id"] for r in sim.log(TENANT) if r["delivery"]["status"] == "delivered"}
    failed = {r["id"] for r in sim.log(TENANT) if r["delivery"]["status"] == "failed"}
    assert delivered
    assert failed
    assert delivered | failed == {r["id"] for r in rows}
    assert len(endpoint.received) == len(delivered)  # each sent exactly once


async def test_duplicates(sim: Simulator, endpoint: Endpoint) -> None:
    sim.faults.duplicate_rate = 1.0
    rows = sim.emit(TENANT, count=4)
    await sim.wait_idle(timeout=10)
    assert sorted(endpoint.ids()) == sorted([r["event_id"] for r in rows] * 2)
    assert all(status_of(sim, r) == "delivered" for r in rows)
    for got in endpoint.received:
        verify_webhook(got.headers, got.body, [HOOK_SECRET.encode()], tolerance=300)


async def test_stop_and_resume(sim: Simulator, endpoint: Endpoint) -> None:
    sim.faults.webhooks_enabled = False
    stopped = sim.emit(TENANT, count=3)
    await sim.wait_idle(timeout=10)
    assert endpoint.received == []
    assert sim.webhook_attempts == []
    assert all(status_of(sim, r) == "pending" for r in stopped)
    sim.faults.webhooks_enabled = True
    resumed = sim.emit(TENANT, count=2)
    await sim.wait_idle(timeout=10)
    assert endpoint.ids() == [r["event_id"] for r in resumed]


async def test_stopping_during_retries_fails_the_row(sim: Simulator, endpoint: Endpoint) -> None:
    endpoint.default = 500
    [row] = sim.emit(TENANT)
    await wait_for(lambda: len(endpoint.received) == 1)
    sim.faults.webhooks_enabled = False
    await sim.wait_idle(timeout=10)
    assert len(endpoint.received) == 1
    assert status_of(sim, row) == "failed"


async def test_reorder(sim: Simulator, endpoint: Endpoint) -> None:
    sim.faults.reorder = True
    sim.faults.reorder_window = 0.05
    rows = sim.emit(TENANT, count=20)
    await sim.wait_idle(timeout=10)
    sent = [r["event_id"] for r in rows]
    assert sorted(endpoint.ids()) == sorted(sent)
    assert endpoint.ids() != sent


async def test_delay(sim: Simulator, endpoint: Endpoint) -> None:
    sim.faults.delay = 0.1
    [row] = sim.emit(TENANT)
    assert endpoint.received == []
    await sim.wait_idle(timeout=10)
    [attempt] = sim.webhook_attempts
    logged_ms = sim.event_log.entries(TENANT)[0].ms
    assert attempt.time * 1000 - logged_ms >= 95  # the wait, give or take clock rounding
    assert endpoint.ids() == [row["event_id"]]


async def test_wait_idle_times_out_while_pushes_are_pending(
    sim: Simulator, endpoint: Endpoint
) -> None:
    endpoint.hold = asyncio.Event()
    sim.emit(TENANT)
    with pytest.raises(TimeoutError):
        await sim.wait_idle(timeout=0.05)
    endpoint.hold.set()
    await sim.wait_idle(timeout=10)
    assert sim.webhook_attempts[0].status == 200


async def test_tenant_without_webhook_url_is_dev_inbox() -> None:
    async with make_sim(None) as sim:
        [row] = sim.emit(TENANT)
        await sim.wait_idle(timeout=1)
        assert row["delivery"]["status"] == "dev_inbox"
        assert sim.webhook_attempts == []


# --- replay ---------------------------------------------------------------------------


async def replay(sim: Simulator, log_id: str, query: str = "") -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as client:
        url = f"{sim.base_url}/events/{log_id}/replay{query}"
        async with client.post(url, headers=api_request_headers(TENANT, API_SECRET)) as resp:
            return resp.status, await resp.json()


async def test_replay_pushes_again(sim: Simulator, endpoint: Endpoint) -> None:
    endpoint.script = [400]
    [row] = sim.emit(TENANT)
    await sim.wait_idle(timeout=10)
    assert status_of(sim, row) == "failed"
    status, body = await replay(sim, row["id"], "?subscription_id=sub_test1")
    assert status == 200
    assert body["success"] is True
    assert body["delivery"]["status"] == "delivered"
    assert endpoint.ids() == [row["event_id"]] * 2
    assert sim.webhook_attempts[-1].replay is True
    verify_webhook(
        endpoint.received[-1].headers,
        endpoint.received[-1].body,
        [HOOK_SECRET.encode()],
        tolerance=300,
    )


async def test_replay_errors(sim: Simulator, endpoint: Endpoint) -> None:
    [row] = sim.emit(TENANT)
    await sim.wait_idle(timeout=10)
    status, body = await replay(sim, "evt_unknown")
    assert (status, body["error"]["code"]) == (404, 2011)
    status, body = await replay(sim, row["id"], "?subscription_id=sub_other")
    assert (status, body["error"]["code"]) == (400, 1002)
    endpoint.default = 500
    status, body = await replay(sim, row["id"])
    assert (status, body["error"]["code"], body["error"]["retryable"]) == (502, 3004, True)
    sim.faults.webhooks_enabled = False
    status, body = await replay(sim, row["id"])
    assert (status, body["error"]["code"]) == (502, 3004)


async def test_replay_without_destination() -> None:
    async with make_sim(None) as sim:
        [row] = sim.emit(TENANT)
        status, body = await replay(sim, row["id"])
        assert (status, body["error"]["code"]) == (400, 1002)


async def test_emit_before_start_pushes_once_started(endpoint: Endpoint) -> None:
    sim = make_sim(endpoint.url)
    [row] = sim.emit(TENANT)
    assert sim.log(TENANT)[0]["delivery"]["status"] == "pending"
    async with sim:
        await sim.wait_idle(timeout=10)
        assert endpoint.ids() == [row["event_id"]]


async def test_assigning_faults_takes_effect(sim: Simulator, endpoint: Endpoint) -> None:
    sim.faults = Faults(webhooks_enabled=False)
    sim.emit(TENANT)
    await sim.wait_idle(timeout=10)
    assert endpoint.received == []
    assert sim.faults.webhooks_enabled is False
