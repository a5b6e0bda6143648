"""SIGHUP on a running relay: what applies at once, what waits for a restart, and a file
that does not load."""

from __future__ import annotations

import signal
from pathlib import Path

import aiohttp

from relay.store.embedded import free_port
from tests.support.common import TENANT, config_dict, envelope, signed, wait_for
from tests.support.delivery import FAST_WORKER, Sink, sink_conf, sinks
from tests.support.process import RelayProcess, write_toml


async def post(port: int, event_id: str) -> int:
    raw, headers = signed(envelope(event_id))
    url = f"http://127.0.0.1:{port}/webhooks/chert/{TENANT}"
    async with aiohttp.ClientSession() as s, s.post(url, data=raw, headers=headers) as resp:
        return resp.status


async def test_a_reload_keeps_what_needs_a_restart_and_applies_the_rest(
    tmp_path: Path, redis_url: str, procs: list[RelayProcess]
) -> None:
    async with sinks(Sink(), Sink()) as (first, second):
        port, admin = free_port(), free_port()

        def data(sink_url: str, **redis: str) -> dict[str, object]:
            d = config_dict(
                redis_url=redis_url, sinks=[sink_conf("s", sink_url)], worker=FAST_WORKER
            )
            d["server"]["listen"] = f"127.0.0.1:{port}"
            d["admin"] = {"listen": f"127.0.0.1:{admin}"}
            d["redis"].update(redis)
            return d

        path = write_toml(tmp_path / "relay.toml", data(first.url))
        relay = RelayProcess(path, "run").start()
        procs.append(relay)
        await relay.wait_ready(f"http://127.0.0.1:{admin}")
        assert await post(port, "r1") == 202
        await wait_for(lambda: first.ids() == ["r1"], 20)

        # A new key prefix beside a new sink URL: the URL applies now; the prefix, which
        # every part of the relay must agree on, waits for the restart. Taken by some
        # parts and not others, it would queue events that no worker reads.
        write_toml(path, data(second.url, key_prefix="moved"))
        relay.signal(signal.SIGHUP)
        await wait_for(lambda: "configuration reloaded" in relay.log, 20)
        assert "changes to [redis] need a restart" in relay.log
        assert await post(port, "r2") == 202
        await wait_for(lambda: second.ids() == ["r2"], 20)

        # A file that does not load: logged, and the running configuration stays.
        path.write_text("[redis\n")
        relay.signal(signal.SIGHUP)
        await wait_for(lambda: "configuration not reloaded" in relay.log, 20)
        assert await post(port, "r3") == 202
        await wait_for(lambda: second.ids() == ["r2", "r3"], 20)
        assert first.ids() == ["r1"]
        relay.signal(signal.SIGTERM)
        assert await relay.wait() == 0
