"""The sink controls on every surface — ``/api/sinks``, the operator page and
``chert-relay sinks`` — with one permission model: a ``read`` token lists, ``replay``
pauses, resumes and tests, a tenant-scoped token sees and touches only its tenants; and
a test event reaches the sink signed, as a delivery does, with its answer shown."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from relay.admin.app import Admin
from relay.admin.sink_routes import SinkApi
from relay.admin.ui.routes import OperatorPage
from relay.config import Config
from relay.keys import Keys
from relay.store.sinks import SinkSwitch
from tests.admin.test_page import csrf_of, log_in
from tests.support.common import SINK_SECRET, TENANT
from tests.support.deadletters import (
    ADMIN_TOKEN,
    OTHER,
    READ_ACME,
    READ_ALL,
    REPLAY_ACME,
    refusals,
    two_tenants,
    two_tenants_data,
)
from tests.support.delivery import Sink, runtime, sinks
from tests.support.process import write_toml

Client = TestClient[Any, Any]
KEYS = Keys("chert-relay")


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def answering(status: int) -> Sink:
    sink = Sink(lambda s, r: (status, {}))
    sink.body = f"answer {status} with {SINK_SECRET}"  # a sink echoing a credential
    return sink


@pytest.fixture
async def api(redis: Redis, redis_url: str) -> AsyncIterator[tuple[Client, Admin, Sink, Config]]:
    """The admin app with the sink API and the operator page; every sink at one test
    sink that answers 200."""
    async with sinks(answering(200)) as (sink,):
        config = two_tenants(redis_url, sink.url)
        rt = runtime(redis, config)
        admin = Admin(config, redis, rt.metrics)
        admin.add_api_routes(SinkApi(redis, lambda: config, admin.refusals).routes())
        admin.add_routes(OperatorPage(admin, rt, lambda: None).routes())
        async with TestClient(TestServer(admin.app())) as c:
            yield c, admin, sink, config


async def listed(c: Client, token: str, query: str = "") -> list[tuple[str, str, bool]]:
    r = await c.get(f"/api/sinks{query}", headers=auth(token))
    assert r.status == 200, await r.text()
    return [(s["tenant"], s["sink"], s["paused"]) for s in (await r.json())["sinks"]]


async def test_a_read_token_lists_the_sinks_of_its_tenants_only(api: Any) -> None:
    c, _, _, _ = api
    everything = [(TENANT, "crm", False), (TENANT, "all", False), (OTHER, "s", False)]
    assert await listed(c, READ_ALL) == everything
    assert await listed(c, READ_ACME) == everything[:2]
    assert await listed(c, READ_ALL, f"?tenant={OTHER}") == everything[2:]
    r = await c.get(f"/api/sinks?tenant={OTHER}", headers=auth(READ_ACME))
    assert (r.status, (await r.json())["error"]) == (403, "forbidden_tenant")
    r = await c.get("/api/sinks?tenant=nobody", headers=auth(READ_ALL))
    assert r.status == 404
    r = await c.get("/api/sinks?sink=crm", headers=auth(READ_ALL))  # not a filter it knows
    assert (r.status, (await r.json())["error"]) == (400, "bad_request")
    assert "'sink'" in (await r.json())["message"]
    r = await c.get("/api/sinks")
    assert r.status == 401
    r = await c.get("/api/sinks", headers=auth(ADMIN_TOKEN))
    entry = (await r.json())["sinks"][0]
    assert entry == {
        "tenant": TENANT,
        "sink": "crm",
        "kind": "http",
        "paused": False,
        "paused_since": None,
        "gone": False,
        "breaker": "closed",
        "waiting": 0,
        "in_flight": 0,
    }


async def test_pause_and_resume_need_replay_and_the_tenant(api: Any, redis: Redis) -> None:
    c, _, _, _ = api
    path = f"/api/sinks/{TENANT}/crm"
    r = await c.post(f"{path}/pause", headers=auth(READ_ALL))
    assert (r.status, (await r.json())["error"]) == (403, "forbidden_scope")
    r = await c.post(f"/api/sinks/{OTHER}/s/pause", headers=auth(REPLAY_ACME))
    assert (r.status, (await r.json())["error"]) == (403, "forbidden_tenant")
    assert await redis.exists(KEYS.paused(OTHER, "s")) == 0
    r = await c.post(f"{path}/pause?now=1", headers=auth(REPLAY_ACME))
    assert r.status == 400
    r = await c.post(f"{path}/pause", headers=auth(REPLAY_ACME), json={"reason": "x"})
    assert (r.status, (await r.json())["error"]) == (400, "bad_request")
    r = await c.post(f"{path}/pause", headers=auth(REPLAY_ACME), data=b"[1]")
    assert r.status == 400
    r = await c.post(f"/api/sinks/{TENANT}/nope/pause", headers=auth(REPLAY_ACME))
    assert r.status == 404
    assert await redis.exists(KEYS.paused(TENANT, "crm")) == 0

    r = await c.post(f"{path}/pause", headers=auth(REPLAY_ACME), json={})
    paused = await r.json()
    assert (r.status, paused["changed"], paused["paused"]) == (200, True, True)
    r = await c.post(f"{path}/pause", headers=auth(ADMIN_TOKEN))
    again = await r.json()
    assert (again["changed"], again["paused_since"]) == (False, paused["paused_since"])
    assert (TENANT, "crm", True) in await listed(c, READ_ACME)
    r = await c.post(f"{path}/resume", headers=auth(READ_ACME))
    assert r.status == 403
    r = await c.post(f"{path}/resume", headers=auth(REPLAY_ACME))
    assert ((await r.json())["changed"], (await r.json())["paused"]) == (True, False)
    r = await c.post(f"{path}/resume", headers=auth(REPLAY_ACME))
    assert (await r.json())["changed"] is False
    assert await redis.exists(KEYS.paused(TENANT, "crm")) == 0
    assert await refusals(c, "forbidden_scope") == 2
    assert await refusals(c, "forbidden_tenant") == 1


async def test_a_test_event_reaches_the_sink_signed_and_its_answer_comes_back(
    api: Any, redis: Redis
) -> None:
    c, _, sink, _ = api
    await SinkSwitch(redis, KEYS).pause(TENANT, "crm")  # a paused sink is tested too
    r = await c.post(f"/api/sinks/{TENANT}/crm/test", headers=auth(READ_ALL))
    assert r.status == 403
    r = await c.post(f"/api/sinks/{TENANT}/crm/test", headers=auth(REPLAY_ACME))
    out = await r.json()
    assert r.status == 200, out
    assert (out["ok"], out["status"], out["kind"]) == (True, 200, "http")
    assert out["ms"] >= 0
    assert out["excerpt"] == "answer 200 with ***"  # the sink's secret blanked
    assert out["event_id"].startswith("relay-test:")
    (got,) = sink.received
    assert sink.bad_signatures == 0
    assert got.event_id == out["event_id"]
    assert got.headers["X-Relay-Source"] == "test"
    assert got.headers["X-Chert-Event-Type"] == "relay.test"
    assert got.headers["X-Chert-Tenant"] == TENANT
    body = json.loads(got.body)
    assert (body["event"], body["event_id"], body["partner_id"]) == (
        "relay.test",
        out["event_id"],
        TENANT,
    )
    assert await redis.zcard(KEYS.queue) == 0  # not through the queue


async def test_a_failing_sinks_test_answer_says_why(redis: Redis, redis_url: str) -> None:
    async with sinks(answering(503)) as (sink,):
        config = two_tenants(redis_url, sink.url)
        admin = Admin(config, redis, runtime(redis, config).metrics)
        admin.add_api_routes(SinkApi(redis, lambda: config, admin.refusals).routes())
        async with TestClient(TestServer(admin.app())) as c:
            r = await c.post(f"/api/sinks/{OTHER}/s/test", headers=auth(ADMIN_TOKEN))
            out = await r.json()
    assert (r.status, out["ok"], out["status"]) == (200, False, 503)
    assert out["excerpt"] == "HTTP 503: answer 503 with ***"


async def test_the_page_pauses_resumes_and_tests_a_sink_for_a_replay_session(
    api: Any, redis: Redis
) -> None:
    c, _, sink, _ = api
    await log_in(c, REPLAY_ACME)
    text = await (await c.get("/ui")).text()
    csrf = csrf_of(text)
    assert 'action="/ui/sinks/pause"' in text
    form = {"csrf": csrf, "tenant": TENANT, "sink": "crm"}
    r = await c.post("/ui/sinks/pause", data=form, allow_redirects=False)
    assert (r.status, r.headers.get("Location")) == (303, "/ui")
    assert await redis.exists(KEYS.paused(TENANT, "crm")) == 1
    text = await (await c.get("/ui")).text()
    crm = next(row for row in text.split("<tr>") if "<code>crm</code>" in row)
    assert "paused</span>" in crm
    assert 'action="/ui/sinks/resume"' in crm
    r = await c.post("/ui/sinks/test", data=form)
    text = await r.text()
    assert r.status == 200
    assert "HTTP 200" in text
    assert len(sink.received) == 1
    r = await c.post("/ui/sinks/pause", data={**form, "tenant": OTHER, "sink": "s"})
    assert r.status == 403
    r = await c.post("/ui/sinks/resume", data={**form, "csrf": "forged"})
    assert r.status == 403
    assert await redis.exists(KEYS.paused(TENANT, "crm")) == 1
    r = await c.post("/ui/sinks/resume", data=form, allow_redirects=False)
    assert r.status == 303
    assert await redis.exists(KEYS.paused(TENANT, "crm")) == 0


async def test_a_read_session_sees_no_sink_buttons_and_cannot_pause(api: Any, redis: Redis) -> None:
    c, _, _, _ = api
    await log_in(c, READ_ALL)
    text = await (await c.get("/ui")).text()
    assert "/ui/sinks/" not in text
    form = {"csrf": csrf_of(text), "tenant": TENANT, "sink": "crm"}
    r = await c.post("/ui/sinks/pause", data=form)
    assert r.status == 403
    assert await redis.exists(KEYS.paused(TENANT, "crm")) == 0


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


async def cli(config: Path, *args: str) -> Ran:
    """``chert-relay -c config args…`` as a process, while this loop serves the sinks."""
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "relay", "--log-format", "text", "-c", str(config), *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


async def test_the_command_line_lists_pauses_resumes_and_tests(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    async with sinks(answering(200), answering(500)) as (good, bad):
        data = two_tenants_data(redis_url, good.url)
        data["tenants"][1]["sinks"][0]["url"] = bad.url
        path = write_toml(tmp_path / "relay.toml", data)

        out = await cli(path, "sinks", "pause", "--tenant", TENANT, "--sink", "crm")
        assert out.returncode == 0, out.stderr
        assert f"{TENANT}/crm: paused since" in out.stdout
        assert "paused by the command line" in out.stderr  # the log line names who
        out = await cli(path, "sinks", "pause", "--tenant", TENANT, "--sink", "crm", "--json")
        assert json.loads(out.stdout)["changed"] is False
        assert await redis.exists(KEYS.paused(TENANT, "crm")) == 1

        out = await cli(path, "sinks", "list")
        assert out.returncode == 0, out.stderr
        header, *rows = out.stdout.splitlines()
        assert header.split() == [
            "tenant",
            "sink",
            "kind",
            "paused",
            "paused_since",
            "gone",
            "breaker",
            "waiting",
            "in_flight",
        ]
        assert [r.split()[:4] for r in rows] == [
            [TENANT, "crm", "http", "yes"],
            [TENANT, "all", "http", "no"],
            [OTHER, "s", "http", "no"],
        ]
        out = await cli(path, "sinks", "list", "--tenant", OTHER, "--json")
        (entry,) = [json.loads(line) for line in out.stdout.splitlines()]
        assert (entry["sink"], entry["paused"], entry["breaker"]) == ("s", False, "closed")

        out = await cli(path, "sinks", "test", "--tenant", TENANT, "--sink", "crm")
        assert out.returncode == 0, out.stderr
        assert f"{TENANT}/crm: HTTP 200 in " in out.stdout
        assert "answer: answer 200 with ***" in out.stdout
        assert SINK_SECRET not in out.stdout + out.stderr
        out = await cli(path, "sinks", "test", "--tenant", OTHER, "--sink", "s", "--json")
        assert out.returncode == 1
        said = json.loads(out.stdout)
        assert (said["ok"], said["status"]) == (False, 500)

        out = await cli(path, "sinks", "resume", "--tenant", TENANT, "--sink", "crm")
        assert out.returncode == 0, out.stderr
        assert "resumed after" in out.stdout
        assert await redis.exists(KEYS.paused(TENANT, "crm")) == 0
        out = await cli(path, "sinks", "resume", "--tenant", TENANT, "--sink", "crm")
        assert "was not paused" in out.stdout

        out = await cli(path, "sinks", "pause", "--tenant", TENANT, "--sink", "nope")
        assert out.returncode == 2
        assert "no sink 'nope'" in out.stderr
        out = await cli(path, "sinks", "list", "--tenant", "nobody")
        assert out.returncode == 2
    assert len(good.received) == 1
    assert good.received[0].headers["X-Relay-Source"] == "test"
