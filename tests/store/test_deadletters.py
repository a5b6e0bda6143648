"""Dead letters: the store's filters, replay and purge, the ``dlq`` CLI and the admin API."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis

from relay.admin.app import Admin
from relay.admin.deadletter_routes import DeadLetterApi
from relay.cli import build_parser
from relay.config import Config
from relay.config.values import resolve_secret
from relay.errors import EXIT_OK, EXIT_USAGE, DeadLetterError
from relay.keys import Keys
from relay.store.deadletters import DeadLetterStore, Filter, parse_time
from tests.support.common import TENANT, config_dict, make_config, wait_for
from tests.support.delivery import (
    FAST_WORKER,
    Sink,
    config_with,
    event,
    ingest,
    runtime,
    sink_conf,
    sinks,
    worker,
)
from tests.support.process import write_toml

TOKEN = "admin-token-for-tests-0123456789"


def two_sinks(redis_url: str, a: str, b: str) -> Config:
    return config_with(redis_url, [sink_conf("crm", a), sink_conf("all", b)])


async def make_dead_letters(redis: Redis, cfg: Config) -> None:
    """crm and all both answer 400: every delivery becomes a ``rejected`` dead letter."""
    rt = runtime(redis, cfg)
    for i in range(4):
        await rt.ingestor.ingest(TENANT, event(f"m{i}"), "webhook")
    await rt.ingestor.ingest(TENANT, event("r0", "reaction.added"), "poll")
    store = DeadLetterStore(redis, cfg)
    async with worker(rt):
        await wait_for(lambda: _count(store, 10), 15)


async def _count(store: DeadLetterStore, n: int) -> bool:
    return len(await store.find(Filter())) == n


def rejecting() -> tuple[Sink, Sink]:
    return Sink(lambda s, r: (400, {})), Sink(lambda s, r: (400, {}))


async def test_filters(redis: Redis, redis_url: str) -> None:
    async with sinks(*rejecting()) as (a, b):
        cfg = two_sinks(redis_url, a.url, b.url)
        await make_dead_letters(redis, cfg)
        store = DeadLetterStore(redis, cfg)
        assert len(await store.find(Filter(sink="crm"))) == 5
        assert [d.event_id for d in await store.find(Filter(event_type="reaction.added"))] == [
            "r0",
            "r0",
        ]
        assert await store.find(Filter(cls="exhausted")) == []
        assert len(await store.find(Filter(cls="rejected", tenant=TENANT))) == 10
        assert len(await store.find(Filter(limit=3))) == 3
        assert await store.find(Filter(since=time.time() + 60)) == []
        assert await store.find(Filter(until=time.time() - 3600)) == []
        assert len(await store.find(Filter(since=time.time() - 3600))) == 10
        assert await store.counts() == {
            (TENANT, "rejected"): 10,
            (TENANT, "exhausted"): 0,
            (TENANT, "gone"): 0,
        }
        d = await store.get(TENANT, "all", "m2")
        assert d is not None
        assert d.status == 400
        assert d.attempts == 1


async def test_replay_requeues_and_skips_a_delivery_still_finishing(
    redis: Redis, redis_url: str
) -> None:
    async with sinks(*rejecting()) as (a, b):
        cfg = two_sinks(redis_url, a.url, b.url)
        await make_dead_letters(redis, cfg)
        store = DeadLetterStore(redis, cfg)
        busy = Keys("chert-relay").job_id(TENANT, "crm", "m1")
        await redis.set(in_progress_key_prefix + busy, b"1", px=60_000)
        out = await store.replay(Filter(sink="crm"))
        assert sorted(d.event_id for d in out.done) == ["m0", "m2", "m3", "r0"]
        assert [(d.event_id, "finishing" in r) for d, r in out.skipped] == [("m1", True)]
        # Replayed entries left the store; the skipped one and the other sink's stay.
        left = await store.find(Filter())
        assert sorted((d.sink, d.event_id) for d in left) == [
            ("all", "m0"),
            ("all", "m1"),
            ("all", "m2"),
            ("all", "m3"),
            ("all", "r0"),
            ("crm", "m1"),
        ]
        q = Keys("chert-relay").queue
        assert await redis.zcard(q) == 4
        att = await redis.hgetall(f"chert-relay:att:{TENANT}:crm:m0")
        assert att[b"src"] == b"replay"
        assert b"a" not in att


async def test_purge_lets_the_event_go_once_nothing_holds_it(redis: Redis, redis_url: str) -> None:
    async with sinks(*rejecting()) as (a, b):
        cfg = two_sinks(redis_url, a.url, b.url)
        await make_dead_letters(redis, cfg)
        store = DeadLetterStore(redis, cfg)
        ev = f"chert-relay:ev:{TENANT}:m0"
        dry = await store.purge(Filter(sink="crm"), dry_run=True)
        assert len(dry.done) == 5
        assert len(await store.find(Filter())) == 10
        out = await store.purge(Filter(sink="crm"))
        assert len(out.done) == 5
        assert await redis.exists(ev) == 1  # the "all" dead letter still holds it
        await store.purge(Filter(sink="all", event_type="message.received"))
        assert await redis.exists(ev) == 0
        assert [d.event_id for d in await store.find(Filter())] == ["r0"]
        assert (await store.counts())[(TENANT, "rejected")] == 1


def test_parse_time() -> None:
    assert parse_time("1767225600") == 1767225600.0
    assert parse_time("2026-01-01T00:00:00Z") == 1767225600.0
    assert parse_time("2h", now=10_000.0) == 10_000.0 - 7200
    with pytest.raises(ValueError, match="not a time"):
        parse_time("yesterday")


def _cli(path: Path, *argv: str) -> int:
    args = build_parser().parse_args(["-c", str(path), "dlq", *argv])
    code: int = args.func(args)
    return code


def test_dlq_cli(redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def setup() -> tuple[dict[str, Any], Sink, Sink]:
        a, b = rejecting()
        a.body = "nope \x1b[2J\x07\x9b31m"  # a sink answering with terminal controls
        await a.start()
        await b.start()
        cfg = two_sinks(redis_url, a.url, b.url)
        client: Redis = Redis.from_url(redis_url)
        await make_dead_letters(client, cfg)
        await client.aclose()
        await a.stop()
        await b.stop()
        data = config_dict(
            redis_url=redis_url,
            tenants=[
                {
                    "slug": TENANT,
                    "webhook_secrets": ["x" * 32],
                    "poll": {"mode": "off"},
                    "sinks": [sink_conf("crm", a.url), sink_conf("all", b.url)],
                }
            ],
            worker=FAST_WORKER,
        )
        return data, a, b

    data, _, _ = asyncio.run(setup())
    path = write_toml(tmp_path / "relay.toml", data)
    capsys.readouterr()

    assert _cli(path, "list", "--json", "--sink", "crm") == EXIT_OK
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 5
    assert {r["class"] for r in rows} == {"rejected"}

    # More than --limit match: the list says so, and how many there are in all. The
    # plain list has a header row naming its columns as --json does, and lines them up.
    assert _cli(path, "list", "--sink", "crm") == EXIT_OK
    out = capsys.readouterr()
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]", out.out)  # escaped, shown
    assert "\\x1b[2J\\x07\\x9b31m" in out.out
    assert _cli(path, "list", "--limit", "3") == EXIT_OK
    out = capsys.readouterr()
    header, *lines = out.out.splitlines()
    assert header.split() == [
        "tenant",
        "sink",
        "event_id",
        "event_type",
        "class",
        "status",
        "attempts",
        "dead_lettered_at",
        "error",
    ]
    assert set(header.split()) <= set(rows[0])  # the same names as --json's keys
    assert len(lines) == 3
    assert {line.index(" rejected ") + 1 for line in lines} == {header.index("class")}
    assert all(line.split()[5] == "400" for line in lines)
    assert "3 of 10 dead letter(s) shown: 7 more match (--limit 3" in out.err
    assert _cli(path, "list", "--limit", "3", "--json") == EXIT_OK
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 3
    assert "7 more match" in out.err
    assert _cli(path, "list", "--limit", "10") == EXIT_OK
    assert "10 dead letter(s)" in capsys.readouterr().err
    assert _cli(path, "list", "--tenant", TENANT, "--class", "gone") == EXIT_OK
    out = capsys.readouterr()
    assert (out.out, out.err.strip()) == ("", "0 dead letter(s)")

    # show: clean values — ISO times, no Python None/False, no unix floats.
    assert _cli(path, "show", "--tenant", TENANT, "--sink", "crm", "m1") == EXIT_OK
    text = capsys.readouterr().out
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]", text)
    assert "\\x1b[2J" in text
    fields = dict(
        line.split(":", 1) for line in text.split("\nevent:")[0].splitlines() if ":" in line
    )
    fields = {k: v.strip() for k, v in fields.items()}
    assert fields["status"] == "400"
    assert fields["class"] == "rejected"
    for name in ("first_attempt", "last_attempt", "dead_lettered_at"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", fields[name]), name
    assert "chat" not in fields  # not an ordered delivery: nothing to say
    assert not re.search(r"\b(None|True|False)\b", text)
    assert not re.search(r"\b1\d{9}\.\d", text)  # a unix time as a float
    assert '"event_id": "m1"' in text.split("\nevent:")[1]  # the event, pretty-printed

    assert _cli(path, "show", "--tenant", TENANT, "--sink", "crm", "m1", "--json") == EXIT_OK
    shown = json.loads(capsys.readouterr().out)
    assert shown["status"] == 400
    assert shown["event"]["event_id"] == "m1"

    assert _cli(path, "replay") == EXIT_USAGE  # no filter and no --all
    assert "--all" in capsys.readouterr().err
    assert _cli(path, "replay", "--all", "--dry-run", "--json") == EXIT_OK
    assert json.loads(capsys.readouterr().out)["count"] == 10
    # replay and purge end with counts per tenant and sink; --verbose lists the entries.
    assert _cli(path, "replay", "--all", "--dry-run") == EXIT_OK
    out = capsys.readouterr()
    assert out.out.splitlines() == [
        f"{TENANT}/all: 5 would be replayed",
        f"{TENANT}/crm: 5 would be replayed",
    ]
    assert "10 dead letter(s) would be replayed, 0 skipped" in out.err
    assert _cli(path, "replay", "--sink", "all", "--dry-run", "--verbose") == EXIT_OK
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.startswith("tenant")
    assert len(lines) == 5
    assert _cli(path, "replay", "--sink", "all", "--type", "reaction.added") == EXIT_OK
    out = capsys.readouterr()
    assert out.out.splitlines() == [f"{TENANT}/all: 1 replayed"]
    assert "1 dead letter(s) replayed" in out.err
    assert _cli(path, "purge", "--all", "--since", "1h") == EXIT_OK
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 2
    assert "9 dead letter(s) purged" in out.err
    assert _cli(path, "list") == EXIT_OK
    assert "0 dead letter(s)" in capsys.readouterr().err


async def test_admin_api(redis: Redis, redis_url: str) -> None:
    async with sinks(*rejecting()) as (a, b):
        cfg = two_sinks(redis_url, a.url, b.url)
        await make_dead_letters(redis, cfg)
        token = resolve_secret(TOKEN)
        cfg = cfg.model_copy(update={"admin": cfg.admin.model_copy(update={"token": token})})
        admin = Admin(cfg, redis, runtime(redis, cfg).metrics)
        admin.add_api_routes(DeadLetterApi(redis, lambda: cfg).routes())
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with TestClient(TestServer(admin.app())) as client:
            r = await client.get("/api/deadletters")
            assert r.status == 401
            r = await client.get("/api/deadletters?sink=crm&type=message.received", headers=auth)
            assert r.status == 200
            assert (await r.json())["count"] == 4
            r = await client.get("/api/deadletters?class=nope", headers=auth)
            assert r.status == 400
            # A filter the relay does not know is refused, not ignored (it would list
            # everything); a change with one changes nothing.
            r = await client.get("/api/deadletters?event_id=m0", headers=auth)
            assert r.status == 400
            assert "'event_id'" in (await r.json())["message"]
            r = await client.get("/api/deadletters?sink=crm&klass=gone", headers=auth)
            assert r.status == 400
            for action in ("replay", "purge"):
                r = await client.post(
                    f"/api/deadletters/{action}",
                    json={"sink": "crm", "event_id": "m0"},
                    headers=auth,
                )
                assert r.status == 400, action
            r = await client.get(f"/api/deadletters/{TENANT}/crm/m0", headers=auth)
            body = await r.json()
            assert body["class"] == "rejected"
            assert body["event"]["event_id"] == "m0"
            r = await client.get(f"/api/deadletters/{TENANT}/crm/zzz", headers=auth)
            assert r.status == 404
            r = await client.post("/api/deadletters/purge", json={}, headers=auth)
            assert r.status == 400  # a filter or "all" is required
            r = await client.post(
                "/api/deadletters/replay", json={"sink": "crm", "dry_run": True}, headers=auth
            )
            assert (await r.json())["count"] == 5
            r = await client.post("/api/deadletters/replay", json={"sink": "crm"}, headers=auth)
            assert (await r.json())["count"] == 5
            r = await client.post("/api/deadletters/purge", json={"all": True}, headers=auth)
            assert (await r.json())["count"] == 5
            r = await client.get("/api/deadletters", headers=auth)
            assert (await r.json())["count"] == 0
        assert await redis.zcard(Keys("chert-relay").queue) == 5


async def test_a_removed_tenants_dead_letters_can_still_be_reached(
    redis: Redis, redis_url: str
) -> None:
    async with sinks(Sink()) as (s,):
        rt = runtime(redis, one_tenant(redis_url, TENANT, s.url))
        await ingest(rt, ["e1", "e2"])
        renamed = one_tenant(redis_url, "acme-renamed", s.url)  # renamed by a reload
        rt.config = renamed.model_copy(
            update={"worker": renamed.worker.model_copy(update={"unknown_sink_grace": 0.3})}
        )
        async with worker(rt):
            await wait_for(lambda: redis.exists(rt.keys.dead_letter(TENANT, "s", "e2")), 10)
        store = DeadLetterStore(redis, rt.config)
        found = await store.find(Filter(tenant=TENANT))
        assert sorted(d.event_id for d in found) == ["e1", "e2"]
        assert {d.cls for d in found} == {"gone"}
        assert len((await store.purge(Filter(tenant=TENANT))).done) == 2
        assert await redis.exists(rt.keys.event(TENANT, "e1")) == 0  # let go with them
        with pytest.raises(DeadLetterError):
            await store.find(Filter(tenant="never-was"))


def one_tenant(redis_url: str, slug: str, sink_url: str) -> Config:
    return make_config(
        redis_url=redis_url,
        worker=FAST_WORKER,
        tenants=[
            {
                "slug": slug,
                "webhook_secrets": ["x" * 32],
                "poll": {"mode": "off"},
                "sinks": [sink_conf("s", sink_url)],
            }
        ],
    )
