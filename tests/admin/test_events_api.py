"""The event log over the admin API and the command line: find by id alone, search,
show, resend — each within what the caller's token may see and do."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from relay.admin.app import Admin
from relay.admin.events_routes import EventLogApi
from relay.config import Config
from relay.keys import Keys
from tests.support.common import TENANT, wait_for
from tests.support.deadletters import (
    OTHER,
    READ_ACME,
    READ_ALL,
    REPLAY_ACME,
    two_tenants,
    two_tenants_data,
)
from tests.support.delivery import Sink, drained, event, runtime, sinks, worker
from tests.support.process import write_toml

KEYS = Keys("chert-relay")


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def delivered(redis: Redis, config: Config, events: dict[str, list[str]]) -> None:
    rt = runtime(redis, config)
    for tenant, ids in events.items():
        for i in ids:
            await rt.ingestor.ingest(tenant, event(i), "webhook")
    async with worker(rt):
        await wait_for(lambda: drained(redis), 20)


@pytest.fixture
async def api(
    redis: Redis, redis_url: str
) -> AsyncIterator[tuple[TestClient[Any, Any], Sink, Config]]:
    """The admin app over acme's a1, a2 (to crm and all) and other-1's o1 and a1, all
    delivered; the sink stays up for resends."""
    async with sinks(Sink()) as (sink,):
        config = two_tenants(redis_url, sink.url)
        await delivered(redis, config, {TENANT: ["a1", "a2"], OTHER: ["o1", "a1"]})
        admin = Admin(config, redis, runtime(redis, config).metrics)
        admin.add_api_routes(EventLogApi(redis, lambda: config, admin.refusals).routes())
        async with TestClient(TestServer(admin.app())) as c:
            yield c, sink, config


async def test_one_event_is_found_by_id_alone_within_the_tokens_tenants(api: Any) -> None:
    c, _, _ = api
    r = await c.get("/api/events?event_id=a1", headers=auth(READ_ALL))
    assert r.status == 200
    found = (await r.json())["events"]
    assert sorted(e["tenant"] for e in found) == sorted([TENANT, OTHER])
    r = await c.get("/api/events?event_id=a1", headers=auth(READ_ACME))
    (only,) = (await r.json())["events"]
    assert only["tenant"] == TENANT
    states = {s["sink"]: s["state"] for s in only["sinks"]}
    assert states == {"crm": "delivered", "all": "delivered"}
    (attempt,) = only["sinks"][0]["attempts"]
    assert (attempt["status"], attempt["n"], attempt["source"]) == (200, 1, "webhook")
    r = await c.get("/api/events?event_id=o1", headers=auth(READ_ACME))
    assert (await r.json())["events"] == []


async def test_search_shows_and_refuses_what_the_token_may_not(api: Any) -> None:
    c, _, _ = api
    r = await c.get("/api/events", headers=auth(READ_ACME))
    body = await r.json()
    assert [e["event_id"] for e in body["events"]] == ["a2", "a1"]  # newest first
    assert body["cursor"] is None
    r = await c.get(f"/api/events?tenant={OTHER}", headers=auth(READ_ACME))
    assert (r.status, (await r.json())["error"]) == (403, "forbidden_tenant")
    r = await c.get(f"/api/events/{OTHER}/o1", headers=auth(READ_ACME))
    assert r.status == 403
    r = await c.get(f"/api/events/{TENANT}/a2", headers=auth(READ_ACME))
    assert r.status == 200
    assert json.loads((await r.json())["payload"])["event_id"] == "a2"
    r = await c.get(f"/api/events/{TENANT}/nope", headers=auth(READ_ACME))
    assert r.status == 404
    for bad in ("?evnt_id=a1", "?state=bogus", "?limit=0", "?cursor=%%%", "?field=x"):
        r = await c.get(f"/api/events{bad}", headers=auth(READ_ALL))
        assert r.status == 400, bad
    r = await c.get("/api/events?limit=1", headers=auth(READ_ALL))
    page = await r.json()
    assert len(page["events"]) == 1
    assert page["cursor"]
    r = await c.get(f"/api/events?limit=10&cursor={page['cursor']}", headers=auth(READ_ALL))
    assert len((await r.json())["events"]) == 3


async def test_resend_needs_the_replay_scope_and_the_tenant(api: Any) -> None:
    c, sink, _ = api
    path = f"/api/events/{TENANT}/a1/resend"
    r = await c.post(path, headers=auth(READ_ALL))
    assert (r.status, (await r.json())["error"]) == (403, "forbidden_scope")
    r = await c.post(f"/api/events/{OTHER}/o1/resend", headers=auth(REPLAY_ACME))
    assert (r.status, (await r.json())["error"]) == (403, "forbidden_tenant")
    r = await c.post(path, json={"sink": "crm", "extra": 1}, headers=auth(REPLAY_ACME))
    assert r.status == 400
    r = await c.post(path, json={"sink": "nope"}, headers=auth(REPLAY_ACME))
    assert r.status == 400
    r = await c.post(f"/api/events/{TENANT}/nope/resend", headers=auth(REPLAY_ACME))
    assert r.status == 404
    before = len(sink.for_event("a1"))
    r = await c.post(path, json={"sink": "crm"}, headers=auth(REPLAY_ACME))
    assert r.status == 200
    assert (await r.json())["results"] == [{"sink": "crm", "resent": True, "reason": None}]
    r = await c.get(f"/api/events/{TENANT}/a1", headers=auth(REPLAY_ACME))
    states = {s["sink"]: s["state"] for s in (await r.json())["sinks"]}
    assert states == {"crm": "due", "all": "delivered"}
    assert len(sink.for_event("a1")) == before  # no worker runs here


@dataclass
class Ran:
    code: int
    out: str
    err: str


async def cli(path: Path, *args: str) -> Ran:
    """``chert-relay ARGS --config PATH`` as a process, with no admin-token variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHERT_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "--log-format", "text", *args, "--config", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


async def test_the_cli_shows_lists_and_resends_with_the_config_file_alone(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    async with sinks(Sink()) as (sink,):
        data = two_tenants_data(redis_url, sink.url)
        data["admin"]["token"] = "env:UNSET_ADMIN_TOKEN_FOR_THIS_TEST"  # never read here
        path = tmp_path / "relay.toml"
        write_toml(path, data)
        config = two_tenants(redis_url, sink.url)
        await delivered(redis, config, {TENANT: ["c1", "c2"]})
        ran = await cli(path, "events", "show", "c1")
        assert ran.code == 0, ran.err
        out = ran.out
        assert "sink crm: delivered" in out
        assert "#1" in out
        assert " 200 " in out
        ran = await cli(path, "events", "show", "c1", "--json")
        rec = json.loads(ran.out)
        assert (rec["tenant"], rec["event_id"], rec["type"]) == (TENANT, "c1", "message.received")
        assert rec["arrivals"][0]["source"] == "webhook"
        assert rec["sinks"][0]["attempts"][0]["status"] == 200
        ran = await cli(path, "events", "list", "--json")
        listed = [json.loads(line)["event_id"] for line in ran.out.splitlines()]
        assert listed == ["c2", "c1"]
        ran = await cli(path, "events", "list", "--grep", "nowhere")
        assert (ran.code, ran.out) == (0, "")
        assert "0 event(s), 2 record(s) read" in ran.err
        ran = await cli(path, "events", "show", "zz")
        assert ran.code == 1
        assert "no record of zz" in ran.err
        ran = await cli(path, "events", "list", "--tenant", "nope")
        assert (ran.code, ran.err.strip()) == (2, "chert-relay events: unknown tenant 'nope'")
        ran = await cli(path, "events", "resend", "c1", "--sink", "all")
        assert ran.code == 0, ran.err
        assert f"{TENANT}/all: resent" in ran.out
        async with worker(runtime(redis, config)):
            await wait_for(lambda: len(sink.for_event("c1")) == 3, 10)
        again = sink.for_event("c1")[-1]
        assert again.headers["X-Relay-Source"] == "resend"
        assert again.headers["webhook-id"] == "c1"
