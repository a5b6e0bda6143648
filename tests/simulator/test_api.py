"""The simulator's events API: auth and its error codes, listings, paging, faults, control."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.cli import build_parser
from relay.ingest.envelope import from_object
from relay.signing import api_request_headers, chert_signature
from relay.simulator import SimTenant, Simulator
from relay.simulator.eventlog import EventLog, parse_query

API_SECRET = "5f2b8c1d9e4a7f3b6c0d2e8f1a9b4c7d"
OTHER_API_SECRET = "0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f"
HOOK_SECRET = "7f3c1e9a5b2d4f6081a3c5e7f9b1d3e5a7c9e1f3b5d7f9a1c3e5b7d9f1a3c5e7"
TENANT = "acme-7a3f"


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    simulator = Simulator(
        tenants=[
            SimTenant(slug=TENANT, api_secret=API_SECRET, webhook_secret=HOOK_SECRET),
            SimTenant(slug="other-1", api_secret=OTHER_API_SECRET, webhook_secret=HOOK_SECRET),
        ],
        seed=7,
    )
    await simulator.start(host="127.0.0.1", port=0)
    yield simulator
    await simulator.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def hmac_auth(tenant: str = TENANT, secret: str = API_SECRET, body: bytes = b"") -> dict[str, str]:
    return api_request_headers(tenant, secret, body)


def bearer(secret: str = API_SECRET) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


async def call(
    client: aiohttp.ClientSession,
    sim: Simulator,
    path: str,
    headers: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
    method: str = "GET",
) -> tuple[int, dict[str, Any], aiohttp.typedefs.LooseHeaders]:
    url = sim.base_url + path
    async with client.request(method, url, headers=headers or {}, params=params) as resp:
        return resp.status, await resp.json(), resp.headers


async def all_pages(
    client: aiohttp.ClientSession, sim: Simulator, params: dict[str, Any]
) -> list[list[dict[str, Any]]]:
    pages = []
    params = dict(params)
    for _ in range(100):
        status, body, _ = await call(client, sim, "/events", hmac_auth(), params)
        assert status == 200, body
        assert body["count"] == len(body["events"])
        pages.append(body["events"])
        if body["next_cursor"] is None:
            return pages
        params["cursor"] = body["next_cursor"]
    raise AssertionError("paging did not end")


# --- authentication ----------------------------------------------------------------------


@pytest.mark.parametrize("auth", ["hmac", "bearer", "bearer+tenant"])
async def test_both_auth_modes_are_accepted(
    sim: Simulator, client: aiohttp.ClientSession, auth: str
) -> None:
    sim.emit(TENANT, count=2)
    headers = {
        "hmac": hmac_auth(),
        "bearer": bearer(),
        "bearer+tenant": bearer() | {"x-chert-tenant": TENANT},
    }[auth]
    status, body, resp_headers = await call(client, sim, "/events", headers)
    assert status == 200
    assert body["count"] == 2
    assert resp_headers["X-Trace-ID"]
    assert sim.api_requests[-1].tenant == TENANT
    assert sim.api_requests[-1].status == 200


async def test_bearer_secret_picks_its_own_tenant(
    sim: Simulator, client: aiohttp.ClientSession
) -> None:
    sim.emit(TENANT, count=3)
    other = sim.emit("other-1", count=1)
    status, body, _ = await call(client, sim, "/events", bearer(OTHER_API_SECRET))
    assert status == 200
    assert [r["id"] for r in body["events"]] == [other[0]["id"]]


def _old_signature(seconds: int) -> dict[str, str]:
    ts = int(time.time()) + seconds
    return {
        "x-chert-tenant": TENANT,
        "x-chert-signature": f"v1,{ts}," + chert_signature(API_SECRET, ts, b""),
    }


def auth_errors() -> dict[str, tuple[dict[str, str], int, int]]:
    """Signed afresh at each call: a table built at import time would go stale."""
    return {
        "nothing": ({}, 401, 2012),
        "tenant only": ({"x-chert-tenant": TENANT}, 401, 2012),
        "signature without tenant": (
            {"x-chert-signature": hmac_auth()["x-chert-signature"]},
            401,
            2012,
        ),
        "wrong secret": (hmac_auth(secret=OTHER_API_SECRET), 401, 2004),
        "malformed signature": (
            {"x-chert-tenant": TENANT, "x-chert-signature": "v1,abc"},
            401,
            2004,
        ),
        "current format is not the API format": (
            {"x-chert-tenant": TENANT, "x-chert-signature": "t=1,v1=" + "0" * 64},
            401,
            2004,
        ),
        "stale timestamp": (_old_signature(-400), 401, 2013),
        "future timestamp": (_old_signature(+400), 401, 2013),
        "unknown tenant (hmac)": (hmac_auth(tenant="nobody-1"), 404, 2001),
        "unknown tenant (bearer)": (bearer() | {"x-chert-tenant": "nobody-1"}, 404, 2001),
        "wrong bearer": (bearer("f" * 32), 401, 2004),
        "bearer of another tenant": (
            bearer(OTHER_API_SECRET) | {"x-chert-tenant": TENANT},
            401,
            2004,
        ),
        "not bearer": ({"authorization": "Basic dXNlcjpwYXNz"}, 401, 2004),
    }


@pytest.mark.parametrize("case", list(auth_errors()))
async def test_auth_errors_use_chert_codes_and_envelope(
    sim: Simulator, client: aiohttp.ClientSession, case: str
) -> None:
    headers, status, code = auth_errors()[case]
    got, body, resp_headers = await call(client, sim, "/events", headers)
    assert got == status
    assert body["success"] is False
    assert body["error"]["status"] == status
    assert body["error"]["code"] == code
    assert body["error"]["retryable"] is False
    assert body["error"]["message"]
    assert body["trace_id"] == resp_headers["X-Trace-ID"]
    assert sim.api_requests[-1].status == status
    assert sim.api_requests[-1].code == code


async def test_within_tolerance_passes(sim: Simulator, client: aiohttp.ClientSession) -> None:
    status, _, _ = await call(client, sim, "/events", _old_signature(-200))
    assert status == 200


async def test_hmac_covers_the_post_body(sim: Simulator, client: aiohttp.ClientSession) -> None:
    body = b'{"note": "signed"}'
    url = sim.base_url + "/events/evt_missing/replay"
    async with client.post(url, data=body, headers=hmac_auth(body=body)) as resp:
        assert resp.status == 404  # authenticated; the event does not exist
        assert (await resp.json())["error"]["code"] == 2011
    async with client.post(url, data=body, headers=hmac_auth(body=b"")) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == 2004


# --- rows, listings, paging ---------------------------------------------------------------


async def test_rows_have_the_log_row_shape(sim: Simulator, client: aiohttp.ClientSession) -> None:
    emitted = sim.emit(TENANT, type="message.received", count=5)
    status, body, _ = await call(client, sim, "/events", hmac_auth())
    assert status == 200
    rows = body["events"]
    assert [r["id"] for r in rows] == [r["id"] for r in reversed(emitted)]  # newest first
    created = [r["created_at"] for r in reversed(rows)]
    assert created == sorted(set(created))  # strictly increasing
    for row in rows:
        assert row["id"].startswith("evt_")
        assert row["lead_id"].startswith("ld_")
        assert row["convo_id"].startswith("cv_")
        assert row["created_at"].endswith("Z")
        assert len(row["created_at"]) == len("2026-05-24T01:35:34.000Z")
        assert row["delivery"] == {
            "status": "dev_inbox",
            "url": None,
            "attempts": [],
            "delivered_at": None,
        }
        payload = row["payload"]
        assert payload["event"] == payload["event_type"] == "message.received"
        assert payload["partner_id"] == TENANT
        assert payload["event_id"] == row["event_id"]
        assert payload["data"]["message"]["parts"][0]["type"] == "text"
        event = from_object(row)
        assert event.event_id == row["event_id"]
        assert event.log_id == row["id"]
    assert sim.log(TENANT) == list(reversed(rows))


@pytest.mark.parametrize("etype", ["reaction.added", "reaction.removed", "lead_reply", "x.custom"])
async def test_other_event_types(sim: Simulator, etype: str) -> None:
    [row] = sim.emit(TENANT, type=etype)
    assert row["type"] == row["payload"]["event"] == etype
    assert from_object(row).type == etype
    if etype.startswith("reaction."):
        assert row["payload"]["data"]["reaction"]["type"]
    if etype == "lead_reply":
        for field in ("from", "to", "text", "message_guid", "line_id"):
            assert row["payload"][field]


async def test_cursor_paging_is_stable_while_events_arrive(
    sim: Simulator, client: aiohttp.ClientSession
) -> None:
    first = sim.emit(TENANT, count=25)
    status, body, _ = await call(client, sim, "/events", hmac_auth(), {"limit": 10})
    assert status == 200
    seen = [r["id"] for r in body["events"]]
    cursor = body["next_cursor"]
    sim.emit(TENANT, count=7)  # new events at the head must not shift the pages
    while cursor:
        _, body, _ = await call(
            client, sim, "/events", hmac_auth(), {"limit": 10, "cursor": cursor}
        )
        seen += [r["id"] for r in body["events"]]
        cursor = body["next_cursor"]
    assert seen == [r["id"] for r in reversed(first)]


async def test_default_limit_is_50(sim: Simulator, client: aiohttp.ClientSession) -> None:
    sim.emit(TENANT, count=51)
    pages = await all_pages(client, sim, {})
    assert [len(p) for p in pages] == [50, 1]


async def test_since_is_strictly_greater(sim: Simulator, client: aiohttp.ClientSession) -> None:
    rows = sim.emit(TENANT, count=12)
    since = rows[4]["created_at"]
    pages = await all_pages(client, sim, {"since": since, "limit": 3})
    got = [r["id"] for page in pages for r in page]
    assert got == [r["id"] for r in reversed(rows[5:])]
    assert all(len(p) <= 3 for p in pages)
    # Another notation of the same instant selects the same window.
    micro = since.replace("Z", "000+00:00")
    pages = await all_pages(client, sim, {"since": micro, "limit": 200})
    assert [r["id"] for r in pages[0]] == got


async def test_filters(sim: Simulator, client: aiohttp.ClientSession) -> None:
    messages = sim.emit(TENANT, type="message.received", count=6)
    reactions = sim.emit(TENANT, type="reaction.added", count=3)
    pages = await all_pages(client, sim, {"type": "reaction.added", "limit": 2})
    assert [r["id"] for p in pages for r in p] == [r["id"] for r in reversed(reactions)]

    lead = messages[0]["lead_id"]
    pages = await all_pages(client, sim, {"lead_id": lead})
    want = [r["id"] for r in reversed(messages + reactions) if r["lead_id"] == lead]
    assert [r["id"] for p in pages for r in p] == want

    pages = await all_pages(client, sim, {"status": "dev_inbox"})
    assert sum(len(p) for p in pages) == 9
    pages = await all_pages(client, sim, {"status": "delivered"})
    assert pages == [[]]


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 201},
        {"limit": "ten"},
        {"status": "lost"},
        {"since": "yesterday"},
        {"cursor": "not-a-cursor"},
    ],
)
async def test_bad_listing_parameters_are_400(
    sim: Simulator, client: aiohttp.ClientSession, params: dict[str, Any]
) -> None:
    status, body, _ = await call(client, sim, "/events", hmac_auth(), params)
    assert status == 400
    assert body["success"] is False
    assert body["error"]["retryable"] is False


async def test_limit_bounds_are_accepted(sim: Simulator, client: aiohttp.ClientSession) -> None:
    sim.emit(TENANT, count=2)
    for limit in (1, 200):
        status, body, _ = await call(client, sim, "/events", hmac_auth(), {"limit": limit})
        assert status == 200
        assert body["count"] == min(limit, 2)


async def test_get_one_event(sim: Simulator, client: aiohttp.ClientSession) -> None:
    [row] = sim.emit(TENANT)
    [other] = sim.emit("other-1")
    status, body, _ = await call(client, sim, f"/events/{row['id']}", hmac_auth())
    assert status == 200
    assert body == sim.log(TENANT)[0]
    for missing in ("evt_nope", other["id"]):  # another tenant's row is not found either
        status, body, _ = await call(client, sim, f"/events/{missing}", hmac_auth())
        assert status == 404
        assert body["error"]["code"] == 2011


# --- injected API faults ------------------------------------------------------------------


async def test_429_fault_with_retry_after(sim: Simulator, client: aiohttp.ClientSession) -> None:
    sim.faults.api_429 = 2
    sim.faults.api_retry_after = 1.5
    for _ in range(2):
        status, body, headers = await call(client, sim, "/events", hmac_auth())
        assert status == 429
        assert body["error"] == {
            "status": 429,
            "code": 1007,
            "retryable": True,
            "retry_after": 1.5,
            "message": body["error"]["message"],
        }
        assert headers["Retry-After"] == "2"
        assert body["trace_id"] == headers["X-Trace-ID"]
    status, _, _ = await call(client, sim, "/events", hmac_auth())
    assert status == 200
    assert sim.faults.api_429 == 0
    assert [r.status for r in sim.api_requests] == [429, 429, 200]
    sim.faults.api_429, sim.faults.api_retry_after = 1, 30
    status, body, headers = await call(client, sim, "/events", hmac_auth())
    assert (status, body["error"]["retry_after"], headers["Retry-After"]) == (429, 30, "30")
    assert all(r.tenant == TENANT for r in sim.api_requests)


async def test_500_fault(sim: Simulator, client: aiohttp.ClientSession) -> None:
    sim.faults.api_500 = 1
    status, body, headers = await call(client, sim, "/events", bearer())
    assert status == 500
    assert body["error"]["code"] == 3001
    assert body["error"]["retryable"] is True
    assert "retry_after" not in body["error"]
    assert "Retry-After" not in headers
    status, _, _ = await call(client, sim, "/events", bearer())
    assert status == 200


async def test_requests_are_recorded(sim: Simulator, client: aiohttp.ClientSession) -> None:
    before = time.time()
    await call(client, sim, "/events", hmac_auth(), {"limit": 5, "type": "lead_reply"})
    [req] = sim.api_requests
    assert (req.method, req.path, req.query) == (
        "GET",
        "/api/v1/events",
        {"limit": "5", "type": "lead_reply"},
    )
    assert before <= req.time <= time.time()
    assert (req.status, req.tenant, req.code) == (200, TENANT, None)


# --- control API --------------------------------------------------------------------------


async def test_control_api(sim: Simulator, client: aiohttp.ClientSession) -> None:
    async with client.get(sim.url + "/_sim/faults") as resp:
        assert (await resp.json())["drop_rate"] == 0.0
    patch = {"drop_rate": 0.3, "webhooks_enabled": False, "api_429": 2}
    async with client.patch(sim.url + "/_sim/faults", json=patch) as resp:
        assert resp.status == 200
        assert (await resp.json())["drop_rate"] == 0.3
    assert (sim.faults.drop_rate, sim.faults.webhooks_enabled, sim.faults.api_429) == (
        0.3,
        False,
        2,
    )
    for bad in (
        {"drop_rate": 2},
        {"no_such_fault": 1},
        {"webhooks_enabled": "yes"},
        {"api_429": -1},
        {"delay": -1},
    ):
        async with client.patch(sim.url + "/_sim/faults", json=bad) as resp:
            assert resp.status == 400, bad
    assert sim.faults.drop_rate == 0.3  # nothing half-applied

    async with client.post(
        sim.url + "/_sim/emit", json={"tenant": "other-1", "count": 3, "type": "reaction.added"}
    ) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["count"] == 3
    assert [r["id"] for r in sim.log("other-1")] == [e["id"] for e in body["events"]]
    async with client.post(sim.url + "/_sim/emit", json={"tenant": "nobody"}) as resp:
        assert resp.status == 404
    async with client.post(sim.url + "/_sim/emit", json={"count": 0}) as resp:
        assert resp.status == 400

    async with client.get(sim.url + "/_sim/stats") as resp:
        stats = await resp.json()
    assert stats["tenants"]["other-1"]["events"] == 3
    assert stats["tenants"]["other-1"]["dev_inbox"] == 3
    assert stats["faults"]["api_429"] == 2
    assert stats["api"]["requests"] == 0  # the control API is not the events API

    async with client.get(sim.url + "/_sim/tenants") as resp:
        text = await resp.text()
    assert TENANT in text
    assert API_SECRET not in text
    assert HOOK_SECRET not in text


# --- paging, as a property ----------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    initial=st.integers(0, 40),
    limit=st.integers(1, 12),
    arrivals=st.lists(st.integers(0, 5), max_size=10),
    etype=st.sampled_from([None, "message.received", "reaction.added"]),
    since_index=st.one_of(st.none(), st.integers(0, 39)),
)
def test_paging_property(
    initial: int, limit: int, arrivals: list[int], etype: str | None, since_index: int | None
) -> None:
    """Following cursors returns exactly the matching rows present at the first page,
    newest first, each once, however many rows arrive between pages."""
    log = EventLog()
    types = ["message.received", "reaction.added"]
    counter = iter(range(10_000))

    def add(n: int) -> None:
        for _ in range(n):
            i = next(counter)
            ms = log.next_ms(TENANT)
            row = {
                "id": f"evt_{i}",
                "type": types[i % 2],
                "lead_id": "ld_1",
                "delivery": {"status": "dev_inbox"},
            }
            log.append(TENANT, ms, row, b"{}")

    add(initial)
    entries = log.entries(TENANT)
    params: dict[str, str] = {"limit": str(limit)}
    if etype:
        params["type"] = etype
    since_us = None
    if since_index is not None and since_index < len(entries):
        params["since"] = entries[since_index].row["created_at"]
        since_us = entries[since_index].ms * 1000
    want = [
        e.row["id"]
        for e in reversed(entries)
        if (etype is None or e.row["type"] == etype)
        and (since_us is None or e.ms * 1000 > since_us)
    ]
    got: list[str] = []
    arrivals_left = list(arrivals)
    for _ in range(1000):
        page, cursor = log.page(TENANT, parse_query(params))
        assert len(page) <= limit
        got += [e.row["id"] for e in page]
        if cursor is None:
            break
        add(arrivals_left.pop(0) if arrivals_left else 0)
        params = {"limit": str(limit), "cursor": cursor}  # the cursor carries the filters
    assert got == want


def test_cli_config_option_in_either_place() -> None:
    parser = build_parser()
    assert parser.parse_args(["-c", "a.toml", "simulate"]).config == "a.toml"
    assert parser.parse_args(["simulate", "--config", "b.toml"]).config == "b.toml"
    assert parser.parse_args(["simulate"]).config is None
