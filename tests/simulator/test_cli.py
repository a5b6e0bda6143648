"""``chert-relay simulate``: option parsing, tenants from the relay config, and a real run
as a subprocess that pushes to a receiver, answers the events API, and exits 0 on a signal.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from relay.errors import SignatureError
from relay.signing import (
    api_request_headers,
    standard_webhooks_key,
    standard_webhooks_signature,
    verify_webhook,
)
from relay.simulator.cli import parse_rate, tenants_from_config
from relay.simulator.sink import CountingSink
from relay.store.embedded import free_port
from tests.support.common import WEBHOOK_SECRET, make_config, wait_for

API_SECRET = "5f2b8c1d9e4a7f3b6c0d2e8f1a9b4c7d"


@pytest.mark.parametrize(
    ("text", "per_second"),
    [("2/s", 2.0), ("30/m", 0.5), ("360/h", 0.1), ("0.5", 0.5), ("0", 0.0), (" 4 / s ", 4.0)],
)
def test_parse_rate(text: str, per_second: float) -> None:
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["", "fast", "2/d", "-1/s", "1/s/s"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_rate(text)


def test_tenants_from_config() -> None:
    config = make_config(server={"listen": "0.0.0.0:8181"})
    data_tenants = config.tenants
    assert data_tenants[0].api.signing_secret is None  # poll mode off in the fixture config
    tenants = tenants_from_config(config, [], None)
    assert [t.slug for t in tenants] == ["acme-7a3f", "other-1"]
    first = tenants[0]
    assert first.webhook_secret == WEBHOOK_SECRET
    assert first.webhook_url == "http://127.0.0.1:8181/webhooks/chert/acme-7a3f"
    assert len(first.api_secret) == 32  # generated: the tenant has none configured
    only = tenants_from_config(config, ["other-1"], "http://127.0.0.1:9999/hooks/{tenant}")
    assert [(t.slug, t.webhook_url) for t in only] == [
        ("other-1", "http://127.0.0.1:9999/hooks/other-1")
    ]
    with pytest.raises(ValueError, match="nobody"):
        tenants_from_config(config, ["nobody"], None)


def _config_file(tmp_path: Path, receiver_port: int, sim_port: int) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(f"""
[server]
listen = "127.0.0.1:{receiver_port}"

[[tenants]]
slug = "acme-7a3f"
webhook_secrets = ["{WEBHOOK_SECRET}"]
[tenants.api]
base_url = "http://127.0.0.1:{sim_port}/api/v1"
auth = "hmac"
signing_secret = "{API_SECRET}"
[tenants.poll]
mode = "always"
[[tenants.sinks]]
name = "all"
url = "http://127.0.0.1:9/all"
""")
    return path


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[int, list[str]]]:
    """A webhook endpoint that keeps the event ids of pushes that verify."""
    verified: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            verify_webhook(request.headers, body, [WEBHOOK_SECRET.encode()], tolerance=300)
        except SignatureError:
            return web.Response(status=401)
        verified.append(request.headers["X-Webhook-Event-Id"])
        return web.Response(status=202)

    app = web.Application()
    app.router.add_post("/webhooks/chert/{tenant}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield runner.addresses[0][1], verified
    await runner.cleanup()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_simulate_subprocess(
    tmp_path: Path, receiver: tuple[int, list[str]], signum: signal.Signals
) -> None:
    receiver_port, verified = receiver
    sim_port = free_port()
    config = _config_file(tmp_path, receiver_port, sim_port)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        "--log-format",
        "json",
        "simulate",
        "--config",
        str(config),
        "--listen",
        f"127.0.0.1:{sim_port}",
        "--rate",
        "50/s",
        "--types",
        "message.received,lead_reply",
        "--stats-every",
        "0.2s",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_for(lambda: len(verified) >= 5, timeout=20)
        base = f"http://127.0.0.1:{sim_port}"
        async with aiohttp.ClientSession() as client:
            async with client.patch(f"{base}/_sim/faults", json={"webhooks_enabled": False}) as r:
                assert r.status == 200
            headers = api_request_headers("acme-7a3f", API_SECRET)
            async with client.get(f"{base}/api/v1/events?limit=200", headers=headers) as r:
                assert r.status == 200
                rows = (await r.json())["events"]
        assert {row["type"] for row in rows} <= {"message.received", "lead_reply"}
        assert set(verified) <= {row["event_id"] for row in rows}
        proc.send_signal(signum)
        async with asyncio.timeout(20):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert "emit  acme-7a3f" in text
    assert "-> 202" in text
    assert "counts: events" in text
    assert "simulator stopped" in text
    assert WEBHOOK_SECRET not in text + err.decode()
    assert API_SECRET not in text + err.decode()


async def test_simulate_refuses_a_busy_port(tmp_path: Path) -> None:
    busy = web.AppRunner(web.Application(), access_log=None)
    await busy.setup()
    await web.TCPSite(busy, "127.0.0.1", 0).start()
    port = busy.addresses[0][1]
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relay",
            "simulate",
            "--listen",
            f"127.0.0.1:{port}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(20):
            _, err = await proc.communicate()
    finally:
        await busy.cleanup()
    assert proc.returncode == 1
    assert b"cannot listen" in err


async def test_counting_sink() -> None:
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    key = standard_webhooks_key(secret)
    sink = CountingSink(keys=[key])
    runner = web.AppRunner(sink.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/crm"
    body = b'{"event_id": "e1"}'
    now = int(time.time())

    def headers(msg_id: str, signature: str) -> dict[str, str]:
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": str(now),
            "webhook-signature": signature,
            "X-Chert-Event-Type": "message.received",
        }

    good = standard_webhooks_signature(key, "e1", now, body)
    try:
        async with aiohttp.ClientSession() as client:
            for h in (headers("e1", good), headers("e1", good), headers("e1", "v1,AAAA")):
                async with client.post(url, data=body, headers=h) as resp:
                    await resp.read()
    finally:
        await runner.cleanup()
    assert (sink.received, sink.unique, sink.bad_signatures) == (3, 1, 1)
    assert sink.by_type == {"message.received": 2}
