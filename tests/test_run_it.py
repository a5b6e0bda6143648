"""The README's "Run it", as a newcomer follows it: the example configuration run as it
is (only its ports and state directory moved, so that the test can run anywhere), the
simulator's counting sink where the example's sinks point, one signed event — and
``chert-relay events show`` says it reached both sinks."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from pathlib import Path

import aiohttp

from relay.store.embedded import free_port
from tests.support.process import RelayProcess

EXAMPLE = Path(__file__).parent.parent / "config" / "relay.example.toml"
EVENT = b'{"event":"message.received","event_id":"chert:msg:1","partner_id":"acme-7a3f","data":{}}'


async def run(*args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "--log-format", "text", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_run_it_ends_with_the_event_delivered(tmp_path: Path) -> None:
    ports = {p: str(free_port()) for p in ("8080", "9090", "9091", "9000", "8070")}
    text = EXAMPLE.read_text()
    for old, new in ports.items():
        text = re.sub(rf"127\.0\.0\.1:{old}\b", f"127.0.0.1:{new}", text)
    text = text.replace('state_dir = "var/chert-relay"', f'state_dir = "{tmp_path / "state"}"')
    config = tmp_path / "relay.toml"
    config.write_text(text)
    sink = RelayProcess(
        config, "simulate", "-c", str(config), "--rate", "0",
        "--listen", f"127.0.0.1:{ports['8070']}", "--sink", f"127.0.0.1:{ports['9000']}", "-q",
    )  # fmt: skip
    relay = RelayProcess(config, "run")
    try:
        sink.start()
        relay.start()
        await relay.wait_ready(f"http://127.0.0.1:{ports['9090']}", timeout=60)
        code, out, err = await run(
            "--config", str(config), "sign", "--tenant", "acme-7a3f", "--json", stdin=EVENT
        )
        assert code == 0, err
        url = f"http://127.0.0.1:{ports['8080']}/webhooks/chert/acme-7a3f"
        async with aiohttp.ClientSession() as http:
            for status, said in ((202, "accepted"), (200, "duplicate")):
                async with http.post(url, data=EVENT, headers=json.loads(out)) as resp:
                    assert (resp.status, (await resp.json())["status"]) == (status, said)
        async with asyncio.timeout(30):
            while True:
                code, out, err = await run("--config", str(config), "events", "show", "chert:msg:1")
                if code == 0 and out.count(": delivered") == 2:
                    break
                await asyncio.sleep(0.2)
        assert "sink crm: delivered" in out
        assert "sink analytics: delivered" in out
        assert "arrived:    by webhook, 2 times" in out
    finally:
        for proc in (relay, sink):  # SIGTERM: the relay stops its own redis-server
            if proc.proc is not None and proc.proc.poll() is None:
                proc.signal(signal.SIGTERM)
                try:
                    await proc.wait(30)
                except TimeoutError:
                    proc.kill()
