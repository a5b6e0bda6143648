"""What Chert might send that must not stall, crash or blind a tenant's poller.

A scriptable Chert (a real aiohttp server) answers each request as the test says.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis

from relay.ingest.envelope import from_object, parse_timestamp
from relay.ingest.ingestor import Ingestor
from relay.keys import Keys
from relay.metrics import Metrics
from relay.runtime import Runtime
from relay.upstream import chert_api
from relay.upstream.chert_api import isoformat
from relay.upstream.sse import SseParser
from relay.upstream.tenant_poller import TenantPoller
from tests.support.common import TENANT, log_row, wait_for
from tests.support.upstream import PREFIX, relay_config, serve_api

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Chert:
    def __init__(self) -> None:
        self.events: Handler | None = None
        self.stream: Handler | None = None
        self.requests: list[dict[str, str]] = []
        self.streams: list[float] = []  # when each stream request came (monotonic)
        self.base_url = ""

    async def handle_events(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(dict(request.query))
        assert self.events is not None
        return await self.events(request)

    async def handle_stream(self, request: web.Request) -> web.StreamResponse:
        self.streams.append(time.monotonic())
        self.requests.append(dict(request.query))
        assert self.stream is not None
        return await self.stream(request)


@contextlib.asynccontextmanager
async def chert() -> AsyncIterator[Chert]:
    fake = Chert()
    app = web.Application()
    app.router.add_get("/api/v1/events", fake.handle_events)
    app.router.add_get("/api/v1/events/stream", fake.handle_stream)
    app.router.add_get("/elsewhere", fake.handle_events)
    async with serve_api(app) as fake.base_url:
        yield fake


@contextlib.asynccontextmanager
async def poller_for(
    redis_url: str, redis: Redis, base_url: str, mode: str = "always"
) -> AsyncIterator[tuple[TenantPoller, Runtime]]:
    config = relay_config(redis_url, base_url, mode, api={"max_attempts": 2})
    tenant = config.tenant(TENANT)
    assert tenant is not None
    metrics = Metrics()
    rt = Runtime(config, redis, metrics, Ingestor(redis, config, metrics), Keys(PREFIX))
    async with aiohttp.ClientSession() as session:
        yield TenantPoller(rt, tenant, session), rt


def page(rows: list[dict[str, Any]], next_cursor: Any = None) -> web.Response:
    return web.json_response({"events": rows, "next_cursor": next_cursor, "count": len(rows)})


def row(event_id: str, created_at: str) -> dict[str, Any]:
    out = log_row(event_id)
    out["created_at"] = created_at
    return out


def sse(frames: bytes) -> Handler:
    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(frames)
        await resp.write_eof()
        return resp

    return stream


def sample(rt: Runtime, name: str, **labels: str) -> float:
    return rt.metrics.registry.get_sample_value(name, {"tenant": TENANT, **labels}) or 0.0


@contextlib.asynccontextmanager
async def sse_loop(poller: TenantPoller) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(poller.sse_loop())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.wait({task})


# --- dates -------------------------------------------------------------------------------


@pytest.mark.parametrize("created_at", ["9999-01-01T00:00:00Z", "9999-12-31T23:59:59-12:00"])
async def test_an_event_dated_far_ahead_does_not_carry_the_watermark_away(
    redis_url: str, redis: Redis, created_at: str
) -> None:
    served = [[row("ev-future", created_at), row("ev-a", isoformat(time.time() - 5))]]
    async with chert() as c:

        async def events(request: web.Request) -> web.Response:
            return page(served[-1])

        c.events = events
        async with poller_for(redis_url, redis, c.base_url) as (poller, rt):
            before = time.time()
            assert await poller.window_guarded() is not None
            wm = float(await redis.get(rt.keys.watermark(TENANT)))
            assert wm <= time.time()  # taken as dated now
            served.append([row("ev-b", isoformat(time.time()))])
            c.requests.clear()
            assert await poller.window_guarded() is not None  # and the next window runs
            since = parse_timestamp(c.requests[0]["since"])
            assert since is not None
            assert since <= time.time() - poller.tenant.poll.overlap + 1
            assert since >= before - poller.tenant.poll.overlap - 1


async def test_a_watermark_already_in_the_future_still_polls_recent_events(
    redis_url: str, redis: Redis
) -> None:
    async with chert() as c:
        c.events = lambda request: _page_now()
        async with poller_for(redis_url, redis, c.base_url) as (poller, rt):
            await redis.set(rt.keys.watermark(TENANT), repr(253402300799.0))  # 9999-12-31
            assert await poller.window_guarded() is not None
            since = parse_timestamp(c.requests[0]["since"])
            assert since is not None
            assert since <= time.time()


async def _page_now() -> web.Response:
    return page([])


@contextlib.contextmanager
def timezone(name: str) -> Iterator[None]:
    old = os.environ.get("TZ")
    os.environ["TZ"] = name
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


def test_a_date_without_an_offset_is_utc_whatever_the_host_zone() -> None:
    with timezone("America/Los_Angeles"):
        assert parse_timestamp("2026-04-29T18:15:25") == parse_timestamp("2026-04-29T18:15:25Z")


# --- pages and error answers -----------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "label"),
    [
        ({"status": 429, "code": "\u00b2", "message": "x", "retryable": True}, "0"),
        ({"status": 503, "code": "9" * 5000, "message": "x", "retryable": True}, "0"),
        ({"status": 503, "code": 12345678, "message": "x", "retryable": True}, "other"),
        ({"status": 429, "code": 1007, "retryable": True, "retry_after": 10**400}, "1007"),
    ],
)
async def test_odd_error_answers_fail_the_window_cleanly(
    redis_url: str, redis: Redis, error: dict[str, Any], label: str
) -> None:
    async with chert() as c:

        async def events(request: web.Request) -> web.Response:
            body = json.dumps({"success": False, "error": error})
            return web.Response(status=error["status"], text=body, content_type="application/json")

        c.events = events
        async with poller_for(redis_url, redis, c.base_url) as (poller, rt):
            poller.api.pause_remaining = lambda: 0.0  # type: ignore[method-assign]
            assert await poller.window_guarded() is None
            assert poller.last_outcome == "api_error"
            assert sample(rt, "chert_relay_chert_api_errors_total", code=label) >= 1


async def test_a_page_nested_too_deeply_fails_the_window_cleanly(
    redis_url: str, redis: Redis
) -> None:
    async with chert() as c:

        async def events(request: web.Request) -> web.Response:
            text = '{"events": ' + "[" * 50000 + "]" * 50000 + "}"
            return web.Response(text=text, content_type="application/json")

        c.events = events
        async with poller_for(redis_url, redis, c.base_url) as (poller, _):
            assert await poller.window_guarded() is None
            assert poller.last_outcome == "api_error"


async def test_a_window_that_pages_on_and_on_is_given_up(
    redis_url: str, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chert_api, "MAX_PAGES_PER_WINDOW", 20)
    async with chert() as c:

        async def events(request: web.Request) -> web.Response:
            n = int(request.query.get("cursor", "0"))
            return page([], str(n + 1))  # an empty page and always a fresh cursor

        c.events = events
        async with poller_for(redis_url, redis, c.base_url) as (poller, rt):
            assert await poller.window_guarded() is None
            assert poller.last_outcome == "broken_chain"
            assert len(c.requests) == 20
            assert await redis.get(rt.keys.watermark(TENANT)) is not None  # kept, not moved


async def test_a_redirect_is_not_followed(redis_url: str, redis: Redis) -> None:
    async with chert() as c:

        async def events(request: web.Request) -> web.Response:
            if request.path.endswith("/events"):
                raise web.HTTPFound("/elsewhere")
            return page([])

        c.events = events
        async with poller_for(redis_url, redis, c.base_url) as (poller, _):
            assert await poller.window_guarded() is None
            assert poller.last_outcome == "api_error"
            assert len(c.requests) == 1  # the signed request went nowhere else


def test_a_row_trimmed_of_its_dates_is_still_a_row() -> None:
    r = log_row("ev-1")
    del r["created_at"], r["delivery"]
    event = from_object(r)
    assert event.type == "message.received"
    assert json.loads(event.body) == r["payload"]  # the envelope, not the row


# --- the SSE stream --------------------------------------------------------------------


async def test_a_stream_that_ends_at_once_is_retried_with_backoff(
    redis_url: str, redis: Redis
) -> None:
    async with chert() as c:
        c.stream = sse(b"event: close\ndata: {}\n\n")
        async with poller_for(redis_url, redis, c.base_url, "sse") as (poller, rt):
            async with sse_loop(poller):
                await wait_for(lambda: _count(c.streams, 3), 20)
            # Each retry waits at least half of its backoff: 0.5 s * 2**failures, capped at
            # api.max_backoff (1 s here).
            assert c.streams[1] - c.streams[0] >= 0.5
            assert c.streams[2] - c.streams[1] >= 0.5
            assert sample(rt, "chert_relay_sse_reconnects_total", reason="short") >= 2


async def test_a_line_longer_than_aiohttp_reads_does_not_stop_the_stream(
    redis_url: str, redis: Redis
) -> None:
    big = log_row("ev-big")
    big["payload"]["data"]["message"]["parts"][0]["value"] = "x" * 600_000
    async with chert() as c:
        c.stream = sse(b"data: " + json.dumps(big).encode() + b"\n\n")
        async with poller_for(redis_url, redis, c.base_url, "sse") as (poller, rt):
            async with sse_loop(poller) as task:
                await wait_for(lambda: _count(c.streams, 2), 20)
                assert not task.done()  # failed, backed off, reconnected
            assert sample(rt, "chert_relay_sse_reconnects_total", reason="error") >= 1


async def test_a_frame_nested_too_deeply_is_skipped(redis_url: str, redis: Redis) -> None:
    ok = log_row("ev-ok")
    frames = b"data: " + b"[" * 50000 + b"]" * 50000 + b"\n\ndata: " + json.dumps(ok).encode()
    async with chert() as c:
        c.stream = sse(frames + b"\n\n")
        async with poller_for(redis_url, redis, c.base_url, "sse") as (poller, rt):
            seen = rt.keys.seen(TENANT, "ev-ok")
            async with sse_loop(poller) as task:
                await wait_for(lambda: redis.exists(seen), 20)
                assert not task.done()


def test_a_message_that_never_ends_is_not_kept_in_memory() -> None:
    parser = SseParser(max_message_chars=100)
    for _ in range(50):
        assert parser.feed_line("data: " + "x" * 10) is None
    assert parser.feed_line("") is None  # dropped whole, not cut
    assert parser.dropped == 1
    parser.feed_line("data: small")
    msg = parser.feed_line("")
    assert msg is not None
    assert msg.data == "small"


async def _count(items: list[float], n: int) -> bool:
    return len(items) >= n


async def test_a_cursor_given_as_a_number_is_followed(redis_url: str, redis: Redis) -> None:
    async with chert() as c:

        async def events(request: web.Request) -> web.Response:
            if "cursor" not in request.query:
                return page([row("ev-1", isoformat(time.time() - 5))], 12345)
            assert request.query["cursor"] == "12345"
            return page([row("ev-2", isoformat(time.time() - 4))])

        c.events = events
        async with poller_for(redis_url, redis, c.base_url) as (poller, _):
            result = await poller.window_guarded()
            assert result is not None
            assert result.new == 2


async def test_rows_that_are_not_events_are_counted(redis_url: str, redis: Redis) -> None:
    async with chert() as c:

        async def events(request: web.Request) -> web.Response:
            return page([row("x" * 600, isoformat(time.time() - 5)), row("ok", isoformat(0))])

        c.events = events
        async with poller_for(redis_url, redis, c.base_url) as (poller, rt):
            result = await poller.window_guarded()
            assert result is not None
            assert (result.seen, result.skipped, result.new) == (2, 1, 1)
            skipped = sample(rt, "chert_relay_poll_rows_skipped_total", source="poll")
            assert skipped == 1
