"""The whole path in one ``chert-relay run`` process: a signed webhook in, the sink's
2xx out; then SIGTERM, exit 0."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import aiohttp

from relay.store.embedded import free_port
from tests.support.common import TENANT, WEBHOOK_SECRET, config_dict, envelope, signed, wait_for
from tests.support.delivery import FAST_WORKER, Sink, sink_conf, sinks
from tests.support.process import RelayProcess, write_toml


async def test_run_delivers_signed_webhooks_and_exits_0_on_sigterm(
    redis_url: str, tmp_path: Path
) -> None:
    port, admin = free_port(), free_port()
    async with sinks(Sink()) as (s,):
        data = config_dict(
            redis_url=redis_url,
            tenants=[
                {
                    "slug": TENANT,
                    "webhook_secrets": [WEBHOOK_SECRET],
                    "poll": {"mode": "off"},
                    "sinks": [sink_conf("s", s.url)],
                }
            ],
            server={"listen": f"127.0.0.1:{port}"},
            admin={"listen": f"127.0.0.1:{admin}"},
            worker=FAST_WORKER,
        )
        relay = RelayProcess(write_toml(tmp_path / "relay.toml", data), "run").start()
        try:
            await relay.wait_ready(f"http://127.0.0.1:{admin}", 20)
            async with aiohttp.ClientSession() as http:
                ids = [f"w{i}" for i in range(20)]
                for event_id in ids:
                    body, headers = signed(envelope(event_id))
                    url = f"http://127.0.0.1:{port}/webhooks/chert/{TENANT}"
                    async with http.post(url, data=body, headers=headers) as r:
                        assert r.status in (200, 202)
                await wait_for(lambda: sorted(s.ids()) == sorted(ids), 20)
                async with http.get(f"http://127.0.0.1:{admin}/metrics") as r:
                    text = await r.text()
                assert "chert_relay_delivery_relay_seconds_count" in text
            relay.signal(signal.SIGTERM)
            assert await relay.wait(20) == 0, relay.log
        finally:
            relay.kill()
        assert json.loads(s.for_event("w3")[0].body)["event_id"] == "w3"
        assert s.bad_signatures == 0
