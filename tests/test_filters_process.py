"""Sink filters in a running relay (``chert-relay run``): signed webhooks to a tenant with
two sinks, one filtered — only the other gets what the filter keeps out, ``/metrics``
counts it, ``events show`` says "not routed (filter: …)", and ``events resend`` to every
routed sink leaves the filtered one out."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import aiohttp

from tests.support.common import TENANT, config_dict, envelope, metric_sample, signed, wait_for
from tests.support.delivery import FAST_WORKER, Sink, sink_conf, sinks
from tests.support.process import RelayProcess, listen_ports, write_toml


async def cli(path: Path, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHERT_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "--log-format", "text", "--config", str(path), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_running_relay_routes_by_filter_counts_it_and_keeps_it_on_resend(
    tmp_path: Path, redis_url: str, procs: list[RelayProcess]
) -> None:
    async with sinks(Sink(), Sink()) as (to_all, to_groups):
        port, admin_port = listen_ports()
        data = config_dict(
            redis_url=redis_url,
            sinks=[
                sink_conf("all", to_all.url),
                sink_conf("groups", to_groups.url, filter={"data": {"chat": {"is_group": True}}}),
            ],
            worker=FAST_WORKER,
        )
        data["server"]["listen"] = f"127.0.0.1:{port}"
        data["admin"]["listen"] = f"127.0.0.1:{admin_port}"
        data["relay"]["state_dir"] = str(tmp_path / "state")
        path = write_toml(tmp_path / "relay.toml", data)
        admin = f"http://127.0.0.1:{admin_port}"
        relay = RelayProcess(path, "run").start()
        procs.append(relay)
        await relay.wait_ready(admin)
        url = f"http://127.0.0.1:{port}/webhooks/chert/{TENANT}"
        async with aiohttp.ClientSession() as http:
            for event_id, group in (("one", False), ("grp", True)):
                raw, headers = signed(
                    envelope(event_id, data={"chat": {"id": f"c-{event_id}", "is_group": group}})
                )
                async with http.post(url, data=raw, headers=headers) as resp:
                    assert resp.status == 202, await resp.text()
            await wait_for(lambda: len(to_all.received) == 2 and len(to_groups.received) == 1, 20)
            assert sorted(to_all.ids()) == ["grp", "one"]
            assert to_groups.ids() == ["grp"]
            async with http.get(f"{admin}/metrics") as resp:
                exposition = await resp.text()
        name = "chert_relay_events_filtered_total"
        assert metric_sample(exposition, name, tenant=TENANT, sink="groups") == 1
        assert metric_sample(exposition, name, tenant=TENANT, sink="all") == 0

        async def recorded() -> bool:
            code, out, _ = await cli(path, "events", "show", "one")
            return code == 0 and "sink all: delivered" in out

        await wait_for(recorded, 20, interval=0.2)
        code, out, err = await cli(path, "events", "show", "one")
        assert code == 0, err
        assert "sink groups: not_routed (filter: its filter did not take this event)" in out
        code, out, err = await cli(path, "events", "resend", "one")
        assert code == 0, err
        assert f"{TENANT}/all: resent" in out
        assert "groups" not in out
        await wait_for(lambda: len(to_all.received) == 3, 20)
        assert to_all.received[-1].headers["X-Relay-Source"] == "resend"
        code, _, err = await cli(path, "events", "resend", "one", "--sink", "groups")
        assert code != 0
        assert "not routed to sink 'groups' (filter:" in err
        assert to_groups.ids() == ["grp"]
