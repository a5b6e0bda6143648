"""The event log on the operator page: search, one event's page with its attempts,
resend from it — each within what the session's token may see and do — and every value
an event or a sink put there shown as text."""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from relay.admin.app import Admin
from relay.admin.ui import events as event_pages
from relay.admin.ui.routes import OperatorPage
from relay.ingest.envelope import from_object
from relay.keys import Keys
from relay.runtime import Runtime
from tests.admin.test_page import EVIL_ERROR, EVIL_ID, EVIL_TYPE, csrf_of, log_in
from tests.admin.test_page import no_markup_from_events as no_markup
from tests.support.common import TENANT, envelope, wait_for
from tests.support.deadletters import (
    ADMIN_TOKEN,
    OTHER,
    READ_ACME,
    READ_ALL,
    REPLAY_ACME,
    refusals,
    two_tenants,
)
from tests.support.delivery import Received, Sink, drained, event, runtime, sinks, worker

KEYS = Keys("chert-relay")
EVIL_BODY = "<script>alert('body')</script>"
Client = TestClient[Any, Any]


@pytest.fixture
async def page(redis: Redis, redis_url: str) -> AsyncIterator[tuple[Client, Sink, Runtime]]:
    """The operator page over delivered events: acme's hostile one (its first attempt
    answered 500 with hostile HTML), a1 and a2; other-1's o1 and a1. The sink stays up
    for resends."""
    failed_once: set[str] = set()

    def answer(_s: Sink, got: Received) -> tuple[int, dict[str, str]]:
        if got.event_id == EVIL_ID and EVIL_ID not in failed_once:
            failed_once.add(EVIL_ID)
            return 500, {}
        return 200, {}

    async with sinks(Sink(answer, body=EVIL_ERROR)) as (sink,):
        config = two_tenants(redis_url, sink.url)
        rt = runtime(redis, config)
        hostile = from_object(envelope(EVIL_ID, EVIL_TYPE, note=EVIL_BODY))
        await rt.ingestor.ingest(TENANT, hostile, "webhook")
        for tenant, event_id in ((TENANT, "a1"), (TENANT, "a2"), (OTHER, "o1"), (OTHER, "a1")):
            await rt.ingestor.ingest(tenant, event(event_id), "webhook")
        async with worker(rt):
            await wait_for(lambda: drained(redis), 20)
        admin = Admin(config, redis, rt.metrics)
        admin.add_routes(OperatorPage(admin, rt, lambda: None).routes())
        async with TestClient(TestServer(admin.app())) as client:
            yield client, sink, rt


def rows(text: str) -> list[str]:
    """The event ids of a result table, as the links to their pages name them."""
    links = re.findall(r'<tr class="event">.*?<a href="([^"]+)"', text)
    return [parse_qs(urlsplit(html.unescape(link)).query)["event_id"][0] for link in links]


def event_page(tenant: str, event_id: str) -> str:
    return "/ui/event?" + urlencode({"tenant": tenant, "event_id": event_id})


async def test_search_by_id_and_by_filters_within_the_sessions_tenants(page: Any) -> None:
    client, _, _ = page
    await log_in(client, READ_ALL)
    r = await client.get("/ui/events")
    text = await r.text()
    assert r.status == 200
    assert len(rows(text)) == 5
    assert "scanned 5 record(s)" in text
    assert "older →" not in text
    r = await client.get("/ui/events", params={"event_id": "a1"})  # by id alone
    text = await r.text()
    assert rows(text) == ["a1", "a1"]
    assert f"<code>{OTHER}</code>" in text
    assert "Looked in 2 tenant(s)" in text
    r = await client.get("/ui/events", params={"tenant": OTHER, "sink": "s"})
    text = await r.text()
    assert sorted(rows(text)) == ["a1", "o1"]
    assert "last attempt to s" in text
    assert "HTTP 200" in text
    r = await client.get("/ui/events", params={"state": "failed"})  # any failed attempt
    assert rows(await r.text()) == [EVIL_ID]
    r = await client.get("/ui/events", params={"q": "ALERT('body')"})  # text in the payload
    assert rows(await r.text()) == [EVIL_ID]
    r = await client.get("/ui/events", params={"q": "nowhere", "evnt_id": "x"})
    text = await r.text()
    assert r.status == 200  # an unknown parameter is ignored, as on the rest of the page
    assert "No events match." in text
    assert "scanned 5 record(s)" in text
    for params, message in (
        ({"state": "bogus"}, "unknown state &#x27;bogus&#x27;"),
        ({"since": "yesterday"}, "is not a time"),
        ({"until": "1e308"}, "out of range"),
        ({"tenant": "nope"}, "unknown tenant"),
        ({"cursor": "%%%"}, "not one this relay gave out"),
    ):
        r = await client.get("/ui/events", params=params)
        assert r.status == 400, params
        text = await r.text()
        assert message in text
        assert 'action="/ui/events"' in text  # the form is still there


async def test_older_pages_follow_the_cursor(page: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    client, _, _ = page
    monkeypatch.setattr(event_pages, "PAGE_SIZE", 2)
    await log_in(client, READ_ALL)
    seen: list[str] = []
    path = "/ui/events?type=message.received"
    for _ in range(5):
        text = await (await client.get(path)).text()
        seen += rows(text)
        older = re.search(r'<a class="older" href="([^"]+)"', text)
        if older is None:
            break
        path = html.unescape(older.group(1))
        assert "type=message.received" in path  # the search goes on with its filters
        assert "cursor=" in path
    assert sorted(seen) == ["a1", "a1", "a2", "o1"]


async def test_the_event_page_shows_arrivals_payload_and_each_attempt(page: Any) -> None:
    client, _, _ = page
    await log_in(client, READ_ALL)
    text = await (await client.get("/ui/events", params={"state": "failed"})).text()
    (link,) = re.findall(r'<tr class="event">.*?<a href="([^"]+)"', text)
    r = await client.get(html.unescape(link))  # the hostile id makes a working link
    text = await r.text()
    assert r.status == 200
    assert "Arrivals" in text
    assert "<td>webhook</td>" in text
    for sink in ("crm", "all"):
        section = text[text.index(f'id="sink-{sink}"') :].split("</section>")[0]
        assert '<span class="badge ok">delivered</span>' in section
        assert "HTTP 200" in section
    # the first attempt, to whichever sink got it first
    assert text.count('<td class="bad">HTTP 500</td>') == 1
    assert "Resend" not in text  # a read session sees no buttons
    r = await client.get(event_page(TENANT, "nope"))
    assert r.status == 404
    assert "No record of this event" in await r.text()


async def test_hostile_ids_types_payloads_and_answers_render_as_text(page: Any) -> None:
    client, _, _ = page
    await log_in(client, ADMIN_TOKEN)
    for path in (
        "/ui/events",
        "/ui/events?" + urlencode({"event_id": EVIL_ID}),
        "/ui/events?state=failed",
        event_page(TENANT, EVIL_ID),
    ):
        r = await client.get(path)
        assert r.status == 200, path
        text = await r.text()
        no_markup(text)
        assert "&lt;script&gt;alert(&quot;type&quot;)&lt;/script&gt;" in text
        assert "x&quot;&gt;&lt;script&gt;alert(&quot;id&quot;)" in text
    assert "&lt;script&gt;alert(&#x27;body&#x27;)&lt;/script&gt;" in text  # the payload
    assert "&lt;script&gt;alert(&#x27;error&#x27;)&lt;/script&gt;" in text  # the sink's 500
    # The resend form carries the hostile id as an attribute value, escaped.
    assert 'name="event_id" value="x&quot;&gt;&lt;script&gt;' in text
    # Values typed into the search come back as text too.
    r = await client.get("/ui/events", params={"q": '"><script>alert(2)</script>'})
    text = await r.text()
    no_markup(text)
    assert 'value="&quot;&gt;&lt;script&gt;alert(2)&lt;/script&gt;"' in text
    # A made-up outcome on the event page shows nothing it names.
    r = await client.get(
        "/ui/event",
        params=[
            ("tenant", TENANT),
            ("event_id", EVIL_ID),
            ("resent", "crm:<script>"),
            ("resent", "<b>nosink</b>:ok"),
        ],
    )
    text = await r.text()
    no_markup(text)
    assert 'class="note result"' not in text
    assert "nosink" not in text


async def test_resend_needs_the_replay_scope_and_a_form_from_the_page(
    page: Any, redis: Redis
) -> None:
    client, sink, rt = page
    await log_in(client, READ_ALL)
    csrf = csrf_of(await (await client.get(event_page(TENANT, "a1"))).text())
    form = {"tenant": TENANT, "event_id": "a1", "sink": "crm"}
    r = await client.post("/ui/event/resend", data={**form, "csrf": csrf})
    assert r.status == 403
    assert "scope is &#x27;read&#x27;: it cannot resend" in await r.text()
    assert await refusals(client, "forbidden_scope") == 1
    await client.post("/ui/logout", data={"csrf": csrf})
    await log_in(client, REPLAY_ACME)
    text = await (await client.get(event_page(TENANT, "a1"))).text()
    assert "Resend to every sink" in text
    assert ">Resend</button>" in text[text.index('id="sink-crm"') :]
    csrf = csrf_of(text)
    for data, headers in (
        (form, {}),
        ({**form, "csrf": "not-it"}, {}),
        ({**form, "csrf": csrf}, {"Origin": "http://evil.example"}),
    ):
        r = await client.post("/ui/event/resend", data=data, headers=headers)
        assert r.status == 403
    assert await redis.zcard(KEYS.queue) == 0  # nothing was queued
    r = await client.post("/ui/event/resend", data={**form, "csrf": csrf}, allow_redirects=False)
    assert r.status == 303
    assert r.headers["Location"].startswith("/ui/event?")
    text = await (await client.get(r.headers["Location"])).text()
    assert "<li><code>crm</code>: resent</li>" in text
    crm = text[text.index('id="sink-crm"') :].split("</section>")[0]
    assert "a delivery is under way" in crm  # due, not yet taken
    # To all: crm's resend is still queued, all's goes.
    r = await client.post(
        "/ui/event/resend", data={"tenant": TENANT, "event_id": "a1", "csrf": csrf}
    )
    text = await r.text()
    assert r.status == 200  # followed the redirect
    assert "<li><code>crm</code>: not resent — a delivery to this sink is under way</li>" in text
    assert "<li><code>all</code>: resent</li>" in text
    before = len(sink.for_event("a1"))
    async with worker(rt):
        await wait_for(lambda: len(sink.for_event("a1")) == before + 2, 10)
        await wait_for(lambda: drained(redis), 10)
    for got in sink.for_event("a1")[-2:]:
        assert got.headers["X-Relay-Source"] == "resend"
        assert got.headers["webhook-id"] == "a1"
    text = await (await client.get(event_page(TENANT, "a1"))).text()
    crm = text[text.index('id="sink-crm"') :].split("</section>")[0]
    assert "<td>resend</td>" in crm  # the fresh attempt, queued by the resend
    assert ">Resend</button>" in crm  # delivered again: it may be resent again


async def test_a_tenant_token_sees_and_touches_only_its_tenants_events(
    page: Any, redis: Redis
) -> None:
    client, _, _ = page
    await log_in(client, READ_ACME)
    text = await (await client.get("/ui/events")).text()
    assert sorted(rows(text)) == sorted(["a1", "a2", EVIL_ID])
    assert OTHER not in text  # not in the rows, nor in the tenant choice
    r = await client.get("/ui/events", params={"event_id": "o1"})
    assert "No record of <code>o1</code> in 1 tenant(s)" in await r.text()
    assert rows(await (await client.get("/ui/events", params={"event_id": "a1"})).text()) == ["a1"]
    r = await client.get("/ui/events", params={"tenant": OTHER})
    assert r.status == 403
    # Another tenant's event and a made-up one are refused alike: nothing says which exists.
    for event_id in ("o1", "never-was"):
        r = await client.get(event_page(OTHER, event_id))
        assert r.status == 403
        assert "may not see tenant &#x27;other-1&#x27;" in await r.text()
    assert await refusals(client, "forbidden_tenant") == 3
    await client.post("/ui/logout", data={"csrf": csrf_of(text)})
    await log_in(client, REPLAY_ACME)
    csrf = csrf_of(await (await client.get("/ui/events")).text())
    r = await client.post(
        "/ui/event/resend", data={"tenant": OTHER, "event_id": "o1", "csrf": csrf}
    )
    assert r.status == 403
    assert await redis.zcard(KEYS.queue) == 0


async def test_sink_rows_link_to_their_recent_attempts(page: Any) -> None:
    client, _, _ = page
    await log_in(client, READ_ACME)
    text = await (await client.get("/ui")).text()
    assert '<a href="/ui/events">Events</a>' in text
    crm = next(row for row in text.split("<tr>") if "<td><code>crm</code></td>" in row)
    link = re.search(r'<a href="([^"]+)">recent attempts</a>', crm)
    assert link is not None
    r = await client.get(html.unescape(link.group(1)))
    text = await r.text()
    assert html.unescape(link.group(1)) == f"/ui/events?tenant={TENANT}&sink=crm"
    assert sorted(rows(text)) == sorted(["a1", "a2", EVIL_ID])
    assert "last attempt to crm" in text
