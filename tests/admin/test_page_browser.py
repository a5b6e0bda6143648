"""The operator page in a real browser: Debian's chromium, headless, driven by
Playwright (with ``executable_path``: Playwright's own browser downloads are never
used). A real relay (receiver, worker, admin) on the test Redis delivers a webhook to a
real sink that refuses it with 400 — a dead letter — and then accepts; the browser logs
in, finds the dead letter, replays it with the confirmation step, and the sink gets it.
And an event delivered at once is found by its id in the event log's search, opened,
and resent to one sink from its page; the sink gets it again, as a resend.

``CHERT_RELAY_SCREENSHOT=docs/operator-page.png`` also saves the page (as the README
shows it) there.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from playwright.async_api import Page, async_playwright
from redis.asyncio import Redis

from relay.store.deadletters import DeadLetterStore
from relay.store.eventlog import EventLog
from tests.support.common import TENANT, envelope, signed, wait_for
from tests.support.deadletters import ADMIN_TOKEN, two_tenants
from tests.support.delivery import Received, Sink, sinks
from tests.support.tools import tool
from tests.support.upstream import running_relay, webhook_url

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
EVENT_ID = "chert:msg:browser-1"
RESENT_ID = "chert:msg:browser-2"


def admin_url(service: Any) -> str:
    host, port = service.roles["admin"].addresses[0][:2]
    return f"http://{host}:{port}"


async def test_a_dead_letter_is_replayed_from_the_page_in_a_browser(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    chromium = tool("chromium")
    accept = False

    def sink_answer(sink: Sink, got: Received) -> tuple[int, dict[str, str]]:
        return (200 if accept else 400), {}

    refusing = Sink(sink_answer)
    refusing.body = '{"error": "unknown field <chat_id>"}'
    async with sinks(refusing) as (sink,):
        config = two_tenants(redis_url, sink.url)
        async with running_relay(config, ("receiver", "worker", "admin")) as service:
            body, headers = signed(envelope(EVENT_ID))
            async with (
                aiohttp.ClientSession() as http,
                http.post(webhook_url(service), data=body, headers=headers) as r,
            ):
                assert r.status == 202
            store = DeadLetterStore(redis, config)
            await wait_for(lambda: store.get(TENANT, "crm", EVENT_ID), 20)
            await wait_for(lambda: store.get(TENANT, "all", EVENT_ID), 20)
            accept = True  # the sink is fixed: the replay will get through
            started = time.monotonic()
            await drive_browser(chromium, admin_url(service), tmp_path)
            # The browser replayed crm's dead letter only: the sink gets it again.
            await wait_for(lambda: len(sink.for_event(EVENT_ID)) == 3, 20)
            got = sink.for_event(EVENT_ID)[-1]
            assert json.loads(got.body)["event_id"] == EVENT_ID
            assert got.headers["X-Relay-Attempt"] == "1"  # fresh attempts
            assert await store.get(TENANT, "crm", EVENT_ID) is None
            assert await store.get(TENANT, "all", EVENT_ID) is not None
            print(f"browser part took {time.monotonic() - started:.1f}s")


@contextlib.asynccontextmanager
async def browser_page(chromium: str, tmp_path: Path) -> AsyncIterator[Page]:
    """A page in a fresh chromium profile; no script error may happen on it."""
    async with async_playwright() as p:
        browser = await p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 900},
        )
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            yield page
            assert errors == []
        finally:
            await browser.close()


async def log_in(page: Page, admin: str) -> None:
    await page.goto(f"{admin}/ui")
    assert page.url.endswith("/ui/login")
    await page.fill('input[name="token"]', ADMIN_TOKEN)
    await page.click('button:has-text("Log in")')
    await page.wait_for_url(f"{admin}/ui")


async def drive_browser(chromium: str, admin: str, tmp_path: Path) -> None:
    async with browser_page(chromium, tmp_path) as page:
        await log_in(page, admin)
        row = page.locator("tr.dead-letter", has_text="crm").filter(has_text=EVENT_ID)
        await row.wait_for()
        assert "HTTP 400" in await row.inner_text()
        screenshot = os.environ.get("CHERT_RELAY_SCREENSHOT")
        if screenshot:
            await page.screenshot(path=screenshot, full_page=True)
        await row.locator('button:has-text("Replay")').click()
        await page.wait_for_selector("text=Replay 1 dead letter(s)?")
        await page.click('button:has-text("Confirm: replay 1")')
        await page.wait_for_selector("text=Replayed 1 dead letter(s); 0 skipped.")
        await page.screenshot(path=str(tmp_path / "replayed.png"))


async def test_an_event_is_found_and_resent_from_the_page_in_a_browser(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    chromium = tool("chromium")
    async with sinks(Sink()) as (sink,):
        config = two_tenants(redis_url, sink.url)
        async with running_relay(config, ("receiver", "worker", "admin")) as service:
            body, headers = signed(envelope(RESENT_ID))
            async with (
                aiohttp.ClientSession() as http,
                http.post(webhook_url(service), data=body, headers=headers) as r,
            ):
                assert r.status == 202
            event_log = EventLog(redis, config)

            async def delivered(crm_attempts: int) -> bool:
                rec = await event_log.get(TENANT, RESENT_ID)
                return rec is not None and all(
                    s.state == "delivered"
                    and len(s.attempts) == (crm_attempts if s.sink == "crm" else 1)
                    for s in rec.sinks
                )

            await wait_for(lambda: delivered(1), 20)
            await drive_resend(chromium, admin_url(service), tmp_path)
            await wait_for(lambda: len(sink.for_event(RESENT_ID)) == 3, 20)  # crm, all, crm
            got = sink.for_event(RESENT_ID)[-1]
            assert got.headers["X-Relay-Source"] == "resend"
            assert got.headers["webhook-id"] == RESENT_ID
            assert json.loads(got.body)["event_id"] == RESENT_ID
            await wait_for(lambda: delivered(2), 20)  # the record shows the resend's attempt


async def drive_resend(chromium: str, admin: str, tmp_path: Path) -> None:
    async with browser_page(chromium, tmp_path) as page:
        await log_in(page, admin)
        await page.click('header nav a:has-text("Events")')
        await page.wait_for_url(f"{admin}/ui/events")
        await page.fill('main input[name="event_id"]', RESENT_ID)
        await page.click('main button:has-text("Search")')
        row = page.locator("tr.event", has_text=RESENT_ID)
        await row.wait_for()
        await row.locator("a", has_text=RESENT_ID).click()
        crm = page.locator("section#sink-crm")
        await crm.wait_for()
        assert "delivered" in await crm.inner_text()
        assert "HTTP 200" in await crm.inner_text()
        await crm.locator('button:has-text("Resend")').click()
        await page.locator(".result li", has_text="resent").wait_for()
        assert "crm: resent" in await page.locator(".result").inner_text()
        await page.screenshot(path=str(tmp_path / "resent.png"), full_page=True)
