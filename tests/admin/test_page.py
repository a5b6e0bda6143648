"""The operator page: log-in, what it shows, escaping of everything events and sinks
put in it, CSRF refusals, and scoped tokens on the page."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from redis.asyncio import Redis

from relay.admin.app import MAX_REQUEST_BYTES, Admin
from relay.admin.ui import sessions
from relay.admin.ui.routes import SECURITY_HEADERS, OperatorPage
from relay.config import Config
from relay.keys import Keys
from relay.store.deadletters import DeadLetterStore, Filter
from tests.support.common import TENANT
from tests.support.deadletters import (
    ADMIN_TOKEN,
    OTHER,
    READ_ACME,
    READ_ALL,
    REPLAY_ACME,
    make_dead_letters,
    refusals,
    two_tenants,
)
from tests.support.delivery import Sink, runtime, sinks

# What events and sinks can put on the page, and must stay text there.
EVIL_TYPE = '<script>alert("type")</script>'
EVIL_ID = 'x"><script>alert("id")</script><img src=x onerror=alert(1)>'
EVIL_ERROR = "<script>alert('error')</script><iframe src=//evil.example>"
EVENTS = {TENANT: [(EVIL_ID, EVIL_TYPE), ("plain-1", "message.received")], OTHER: [("o1", "x")]}
Client = TestClient[Any, Any]


@pytest.fixture
async def page(redis: Redis, redis_url: str) -> AsyncIterator[tuple[Client, Admin, Config]]:
    """The admin app with the operator page; dead letters whose type, id and error are
    hostile HTML."""
    refusing = Sink(lambda s, r: (400, {}))
    refusing.body = EVIL_ERROR
    async with sinks(refusing) as (sink,):
        config = two_tenants(redis_url, sink.url)
        await make_dead_letters(redis, config, EVENTS)
    rt = runtime(redis, config)
    admin = Admin(config, redis, rt.metrics)
    admin.add_routes(OperatorPage(admin, rt, lambda: None).routes())
    async with TestClient(TestServer(admin.app())) as client:
        yield client, admin, config


async def log_in(client: Client, token: str) -> None:
    r = await client.get("/ui/login")
    nonce = re.search(r'name="nonce" value="([^"]+)"', await r.text())
    assert nonce is not None
    r = await client.post(
        "/ui/login", data={"nonce": nonce.group(1), "token": token}, allow_redirects=False
    )
    assert (r.status, r.headers.get("Location")) == (303, "/ui"), await r.text()


def csrf_of(text: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', text)
    assert found is not None
    return found.group(1)


def no_markup_from_events(text: str) -> None:
    """Nothing of the hostile values is live markup; all of them are shown as text."""
    assert "<script" not in text
    assert "<iframe" not in text
    assert "<img" not in text
    assert "onerror=alert" not in text.replace("onerror=alert(1)&gt;", "")


async def test_the_page_needs_a_log_in_and_sets_a_strict_session_cookie(page: Any) -> None:
    client, _, _ = page
    r = await client.get("/ui", allow_redirects=False)
    assert (r.status, r.headers["Location"]) == (303, "/ui/login")
    r = await client.get("/ui/login")
    text = await r.text()
    assert r.status == 200
    assert 'type="password" name="token"' in text
    login_cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in login_cookie
    assert "SameSite=Strict" in login_cookie
    nonce = re.search(r'name="nonce" value="([^"]+)"', text)
    assert nonce is not None
    r = await client.post("/ui/login", data={"nonce": nonce.group(1), "token": "wrong"})
    assert r.status == 401
    assert "not a valid admin token" in await r.text()
    assert await refusals(client, "login_failed") == 1
    await log_in(client, ADMIN_TOKEN)
    session = next(c for c in client.session.cookie_jar if c.key == "chert_relay_session")
    assert session["httponly"] is True
    assert session["samesite"] == "Strict"
    assert session["path"] == "/ui"
    assert ADMIN_TOKEN not in session.value
    r = await client.get("/ui")
    assert r.status == 200
    text = await r.text()
    assert "Tenants" in text
    assert "Sinks" in text
    assert f"<code>{TENANT}</code>" in text
    assert "<td><code>crm</code></td>" in text


async def test_a_log_in_from_another_site_is_refused(page: Any) -> None:
    client, _, _ = page
    await client.get("/ui/login")
    # Without the form's one-time value (another site cannot read it): refused.
    r = await client.post("/ui/login", data={"nonce": "guess", "token": ADMIN_TOKEN})
    assert r.status == 401
    assert "expired" in await r.text()
    r = await client.get("/ui", allow_redirects=False)
    assert r.status == 303  # not logged in


async def test_every_answer_forbids_scripts_framing_and_sniffing(page: Any) -> None:
    client, _, _ = page
    await log_in(client, ADMIN_TOKEN)
    for path in ("/ui", "/ui/login", "/ui/style.css", f"/ui/deadletter?tenant={TENANT}&sink=crm"):
        r = await client.get(path)
        csp = r.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp, path
        assert "frame-ancestors 'none'" in csp
        assert "script-src" not in csp  # no script source at all: default-src 'none'
        assert "unsafe-inline" not in csp
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["X-Frame-Options"] == "DENY"


async def test_the_readme_quotes_the_security_headers_the_page_sends(page: Any) -> None:
    client, _, _ = page
    await log_in(client, ADMIN_TOKEN)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("**Event content is text.**") :].split("\n\n")[0]
    quoted = dict(re.findall(r"`([A-Z][A-Za-z-]+): ([^`]+)`", section))
    r = await client.get("/ui")
    assert set(quoted) == set(SECURITY_HEADERS)
    for name, value in quoted.items():
        assert r.headers[name] == " ".join(value.split()), name


async def test_hostile_event_types_ids_and_errors_render_as_text(page: Any) -> None:
    client, _, _ = page
    await log_in(client, ADMIN_TOKEN)
    text = await (await client.get("/ui")).text()
    no_markup_from_events(text)
    assert "&lt;script&gt;alert(&quot;type&quot;)&lt;/script&gt;" in text
    assert "&lt;script&gt;alert(&#x27;error&#x27;)&lt;/script&gt;" in text
    assert "x&quot;&gt;&lt;script&gt;alert(&quot;id&quot;)" in text
    # The filter form shows a hostile value typed into it as text, too.
    r = await client.get("/ui", params={"type": '"><script>alert(2)</script>'})
    text = await r.text()
    no_markup_from_events(text)
    assert 'value="&quot;&gt;&lt;script&gt;alert(2)&lt;/script&gt;"' in text
    # One dead letter with its event, and the confirmation of its replay.
    r = await client.get(
        "/ui/deadletter", params={"tenant": TENANT, "sink": "crm", "event_id": EVIL_ID}
    )
    assert r.status == 200
    no_markup_from_events(await r.text())
    csrf = csrf_of(text)
    r = await client.post(
        "/ui/deadletters/replay",
        data={"csrf": csrf, "tenant": TENANT, "sink": "crm", "event_id": EVIL_ID},
    )
    assert r.status == 200
    text = await r.text()
    no_markup_from_events(text)
    assert "Replay 1 dead letter(s)?" in text


async def test_replay_and_purge_need_a_confirmation_and_the_csrf_token(
    page: Any, redis: Redis
) -> None:
    client, _, config = page
    await log_in(client, ADMIN_TOKEN)
    csrf = csrf_of(await (await client.get("/ui")).text())
    one = {"tenant": TENANT, "sink": "crm", "event_id": "plain-1"}
    store = DeadLetterStore(redis, config)
    for data, headers in (
        ({**one, "confirm": "yes"}, {}),  # no CSRF token
        ({**one, "confirm": "yes", "csrf": "not-it"}, {}),
        ({**one, "confirm": "yes", "csrf": csrf}, {"Origin": "http://evil.example"}),
    ):
        r = await client.post("/ui/deadletters/replay", data=data, headers=headers)
        assert r.status == 403
        assert "did not come from this page" in await r.text()
    assert await store.get(TENANT, "crm", "plain-1") is not None
    assert await refusals(client, "csrf") == 3
    # The first POST only asks; the dead letter stays.
    r = await client.post("/ui/deadletters/replay", data={**one, "csrf": csrf})
    assert "Confirm: replay 1" in await r.text()
    assert await store.get(TENANT, "crm", "plain-1") is not None
    r = await client.post("/ui/deadletters/replay", data={**one, "csrf": csrf, "confirm": "yes"})
    assert "Replayed 1 dead letter(s); 0 skipped." in await r.text()
    assert await store.get(TENANT, "crm", "plain-1") is None
    job = Keys("chert-relay").job_id(TENANT, "crm", "plain-1")
    assert await redis.zscore(Keys("chert-relay").queue, job) is not None
    # Purge by filter: every rejected dead letter of other-1.
    flt = {"tenant": OTHER, "class": "rejected", "csrf": csrf}
    r = await client.post("/ui/deadletters/purge", data=flt)
    assert "Purge 1 dead letter(s)?" in await r.text()
    r = await client.post("/ui/deadletters/purge", data={**flt, "confirm": "yes"})
    assert "Purged 1 dead letter(s)" in await r.text()
    assert await store.find(Filter(tenant=OTHER)) == []


async def test_a_read_token_sees_but_cannot_change(page: Any, redis: Redis) -> None:
    client, _, config = page
    await log_in(client, READ_ALL)
    text = await (await client.get("/ui")).text()
    assert "Replay…" not in text
    assert "Purge…" not in text
    assert f"<code>{OTHER}</code>" in text
    csrf = csrf_of(text)  # the log-out form's
    one = {"tenant": TENANT, "sink": "crm", "event_id": "plain-1", "csrf": csrf, "confirm": "yes"}
    r = await client.post("/ui/deadletters/replay", data=one)
    assert r.status == 403
    assert "scope is &#x27;read&#x27;" in await r.text()
    assert await DeadLetterStore(redis, config).get(TENANT, "crm", "plain-1") is not None


async def test_a_tenant_token_sees_only_its_tenant_on_the_page(page: Any) -> None:
    client, _, _ = page
    await log_in(client, READ_ACME)
    text = await (await client.get("/ui")).text()
    assert f"<code>{TENANT}</code>" in text
    assert OTHER not in text  # not in the tables, the list or the tenant choice
    r = await client.get("/ui", params={"tenant": OTHER})
    assert r.status == 403
    r = await client.get("/ui/deadletter", params={"tenant": OTHER, "sink": "s", "event_id": "o1"})
    assert r.status == 403
    await client.post("/ui/logout", data={"csrf": csrf_of(text)})
    await log_in(client, REPLAY_ACME)
    csrf = csrf_of(await (await client.get("/ui")).text())
    data = {"tenant": OTHER, "sink": "s", "event_id": "o1", "csrf": csrf, "confirm": "yes"}
    r = await client.post("/ui/deadletters/replay", data=data)
    assert r.status == 403
    # "every matching" for a tenant token means its own tenant's only.
    r = await client.post("/ui/deadletters/purge", data={"csrf": csrf})
    text = await r.text()
    assert "Purge 4 dead letter(s)?" in text  # two events, two sinks
    assert "<code>o1</code>" not in text


async def test_log_out_and_a_changed_token_end_the_session(page: Any, redis_url: str) -> None:
    client, admin, _ = page
    await log_in(client, READ_ACME)
    csrf = csrf_of(await (await client.get("/ui")).text())
    r = await client.post("/ui/logout", data={"csrf": csrf}, allow_redirects=False)
    assert (r.status, r.headers["Location"]) == (303, "/ui/login")
    assert (await client.get("/ui", allow_redirects=False)).status == 303
    await log_in(client, READ_ACME)
    assert (await client.get("/ui", allow_redirects=False)).status == 200
    changed = two_tenants(redis_url, "http://127.0.0.1:9/")
    tokens = [t for t in changed.admin.tokens if t.name != "acme-read"]
    admin.set_config(
        changed.model_copy(update={"admin": changed.admin.model_copy(update={"tokens": tokens})})
    )  # what a reload does
    assert (await client.get("/ui", allow_redirects=False)).status == 303


async def test_bad_filters_are_explained_not_failures(page: Any) -> None:
    client, _, _ = page
    await log_in(client, ADMIN_TOKEN)
    for params, message in (
        ({"until": "1e308"}, "out of range"),
        ({"since": "yesterday"}, "is not a time"),
        ({"class": "<b>nope</b>"}, "unknown class &#x27;&lt;b&gt;nope&lt;/b&gt;&#x27;"),
        ({"limit": "0"}, "limit must be a number from 1 to 1000"),
    ):
        r = await client.get("/ui", params=params)
        assert r.status == 400, params
        text = await r.text()
        assert message in text
        assert "Tenants" in text  # the rest of the page is still there


def test_a_session_ends_when_idle_or_too_old() -> None:
    s = sessions
    store = s.Sessions()
    for field, past in (("seen", s.IDLE_S), ("created", s.MAX_AGE_S)):
        sid, session = store.create(b"digest")
        request = make_mocked_request("GET", "/ui", headers={"Cookie": f"{s.SESSION_COOKIE}={sid}"})
        assert store.get(request) is session
        setattr(session, field, getattr(session, field) - past - 1)
        assert store.get(request) is None
        assert store.get(request) is None  # and it is gone


async def test_no_token_can_log_another_out_by_logging_in_often(page: Any) -> None:
    client, _, _ = page
    await log_in(client, ADMIN_TOKEN)
    jar = client.session.cookie_jar
    admins = {c.key: c.value for c in jar if c.key == sessions.SESSION_COOKIE}
    first_read = ""
    for n in range(sessions.MAX_PER_TOKEN + 10):
        await log_in(client, READ_ALL)
        if n == 0:
            first_read = next(c.value for c in jar if c.key == sessions.SESSION_COOKIE)
    jar.clear()  # each session by its cookie alone

    async def page_for(session_id: str) -> tuple[int, str | None]:
        cookie = {"Cookie": f"{sessions.SESSION_COOKIE}={session_id}"}
        r = await client.get("/ui", headers=cookie, allow_redirects=False)
        return r.status, r.headers.get("Location")

    # the admin's session outlived 60 log-ins of another token; that token's oldest went
    assert await page_for(admins[sessions.SESSION_COOKIE]) == (200, None)
    assert await page_for(first_read) == (303, "/ui/login")


async def test_a_log_in_form_past_the_admin_listeners_body_limit_is_not_read(page: Any) -> None:
    # Read before anyone is known: at most MAX_REQUEST_BYTES, not aiohttp's 1 MiB.
    client, _, _ = page
    r = await client.get("/ui/login")
    nonce = re.search(r'name="nonce" value="([^"]+)"', await r.text())
    assert nonce is not None
    big = {"nonce": nonce.group(1), "token": "x" * (MAX_REQUEST_BYTES + 1)}
    r = await client.post("/ui/login", data=big)
    assert r.status == 413
    r = await client.post("/ui/login", data={"nonce": nonce.group(1), "token": "x" * 1000})
    assert r.status == 401  # a form within it is read, and refused for its token


@pytest.mark.parametrize(
    "cookie",
    [
        None,  # never shown the form
        "1700000000.guessed.0123456789abcdef0123456789abcdef",  # not signed by this process
    ],
)
async def test_a_log_in_without_a_form_this_page_gave_is_refused_before_its_body_is_read(
    page: Any, cookie: str | None
) -> None:
    client, _, _ = page
    server = client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    head = (
        "POST /ui/login HTTP/1.1\r\nHost: x\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 60000\r\n"
    )
    if cookie is not None:
        head += f"Cookie: {sessions.LOGIN_COOKIE}={cookie}\r\n"
    writer.write((head + "\r\n").encode() + b"nonce=x&token=")  # 60,000 announced; 14 sent
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 10)  # answered without the rest
    writer.close()
    assert status.startswith(b"HTTP/1.1 401"), status


def test_log_in_nonces_are_signed_and_dated() -> None:
    nonces = sessions.LoginNonces()
    good = nonces.issue()
    assert nonces.valid(good)
    assert not sessions.LoginNonces().valid(good)  # another process's key
    stamp, rand, mac = good.split(".")
    assert not nonces.valid(f"{int(stamp) - sessions.LOGIN_FORM_S - 5}.{rand}.{mac}")
    assert not nonces.valid("")
    assert not nonces.valid("x.y.z")
