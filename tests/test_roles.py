"""The roles side by side on one host, from one configuration file: ``serve`` on
``admin.listen``, a ``worker`` on ``admin.worker_listen`` and a second ``worker`` on a
free port named by ``--admin-listen`` — each with its own metrics and health."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp

from relay.store.embedded import free_port
from tests.support.common import TENANT, config_dict, envelope, metric_sample, signed, wait_for
from tests.support.delivery import FAST_WORKER, Received, Sink, sink_conf, sinks
from tests.support.process import RelayProcess, write_toml


async def scraped(session: aiohttp.ClientSession, admin: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples with ``labels`` in a process's /metrics."""
    async with session.get(f"{admin}/metrics") as resp:
        return metric_sample(await resp.text(), name, **labels)


async def delivered(session: aiohttp.ClientSession, admin: str) -> float:
    return await scraped(session, admin, "chert_relay_deliveries_total", outcome="delivered")


async def test_serve_and_two_workers_run_side_by_side_from_one_config(
    tmp_path: Path, redis_url: str, procs: list[RelayProcess]
) -> None:
    async def slow(sink: Sink, got: Received) -> tuple[int, dict[str, str]]:
        await asyncio.sleep(0.05)  # so that one worker alone cannot take every job
        return 200, {}

    async with sinks(Sink(slow)) as (sink,):
        port, admin, worker_admin = free_port(), free_port(), free_port()
        data = config_dict(
            redis_url=redis_url,
            sinks=[sink_conf("s", sink.url)],
            worker={**FAST_WORKER, "max_jobs": 3},
        )
        data["server"]["listen"] = f"127.0.0.1:{port}"
        data["admin"] = {
            "listen": f"127.0.0.1:{admin}",
            "worker_listen": f"127.0.0.1:{worker_admin}",
        }
        path = write_toml(tmp_path / "relay.toml", data)

        serve = RelayProcess(path, "serve").start()
        first = RelayProcess(path, "worker").start()
        second = RelayProcess(path, "worker", "--admin-listen", "127.0.0.1:0")
        second.log_path = tmp_path / "relay.worker2.log"
        second.start()
        procs += [serve, first, second]
        await serve.wait_ready(f"http://127.0.0.1:{admin}")
        await first.wait_ready(f"http://127.0.0.1:{worker_admin}")
        # With port 0 the bound address is logged.
        bound = await wait_for(
            lambda: re.search(r"admin listening on (127\.0\.0\.1:\d+)", second.log)
        )
        second_admin = f"http://{bound.group(1)}"
        await second.wait_ready(second_admin)

        ids = [f"side:{i}" for i in range(60)]
        url = f"http://127.0.0.1:{port}/webhooks/chert/{TENANT}"
        async with aiohttp.ClientSession() as session:
            for event_id in ids:
                raw, headers = signed(envelope(event_id))
                async with session.post(url, data=raw, headers=headers) as resp:
                    assert resp.status == 202
            await wait_for(lambda: set(sink.ids()) >= set(ids), 60)

            # Each process has its own metrics: both workers delivered, serve none.
            async def counts() -> tuple[float, float] | None:
                by_first = await delivered(session, f"http://127.0.0.1:{worker_admin}")
                by_second = await delivered(session, second_admin)
                return (by_first, by_second) if by_first + by_second >= len(ids) else None

            by_first, by_second = await wait_for(counts, 30)
            assert by_first > 0
            assert by_second > 0
            assert await delivered(session, f"http://127.0.0.1:{admin}") == 0
            serve_admin = f"http://127.0.0.1:{admin}"
            accepted = await scraped(
                session, serve_admin, "chert_relay_webhooks_total", outcome="accepted"
            )
            assert accepted == len(ids)
        for p in (serve, first, second):
            p.signal()
        for p in (serve, first, second):
            assert await p.wait(60) == 0, p.log
