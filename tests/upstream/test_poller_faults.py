"""The poller facing a misbehaving Chert: a broken cursor chain, a stream that never answers.

The simulator is a correct Chert, so these faults come from tiny real servers of their
own (``tests.test_poller_support``): a window whose cursor chain breaks must fail and
keep the watermark — Chert returns newest first, so advancing would skip the older rows
on pages never read — and an SSE connect that never gets its response headers must be
given up and retried.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from relay.ingest.envelope import parse_timestamp
from relay.ingest.ingestor import Ingestor
from relay.keys import Keys
from relay.metrics import Metrics
from relay.runtime import Runtime
from relay.upstream.chert_api import isoformat
from relay.upstream.tenant_poller import TenantPoller
from tests.support.common import TENANT, log_row, wait_for
from tests.support.upstream import (
    PREFIX,
    messages,
    paged_chert,
    relay_config,
    running_relay,
    silent_server,
)


def row(event_id: str, created_at: float) -> dict[str, Any]:
    out = log_row(event_id)
    out["created_at"] = isoformat(created_at)
    return out


async def seen(redis: Redis, event_id: str) -> bool:
    return bool(await redis.exists(f"{PREFIX}:seen:{TENANT}:{event_id}"))


@pytest.mark.parametrize("broken", ["repeat", "cycle"])
async def test_a_broken_cursor_chain_keeps_the_watermark_and_a_whole_one_advances_it(
    redis_url: str, redis: Redis, caplog: pytest.LogCaptureFixture, broken: str
) -> None:
    caplog.set_level(logging.INFO)
    now = time.time()
    newest = [row("ev1", now - 10), row("ev2", now - 20)]  # newest first, as Chert pages
    older = [row("ev3", now - 600), row("ev4", now - 900)]
    oldest = [row("ev5", now - 1200)]
    async with paged_chert() as chert:
        config = relay_config(redis_url, chert.base_url, "always", api={"auth": "bearer"})
        tenant = config.tenant(TENANT)
        assert tenant is not None
        metrics = Metrics()
        rt = Runtime(config, redis, metrics, Ingestor(redis, config, metrics), Keys(PREFIX))
        start = now - 3600
        await redis.set(rt.keys.watermark(TENANT), repr(start))
        if broken == "repeat":  # page 2 names its own cursor again: page 3 is never read
            chert.pages = {None: (newest, "c1"), "c1": (older, "c1")}
        else:  # c1 → c2 → c1
            chert.pages = {None: (newest, "c1"), "c1": (older, "c2"), "c2": ([], "c1")}
        async with aiohttp.ClientSession() as session:
            poller = TenantPoller(rt, tenant, session)

            assert await poller.window_guarded() is None
            assert float(await redis.get(rt.keys.watermark(TENANT)) or b"0") == start
            assert poller.windows == 0
            warned = [t for t in messages(caplog, level=logging.WARNING) if "watermark kept" in t]
            assert len(warned) == 1
            assert "already given" in warned[0]
            since = isoformat(start - tenant.poll.overlap)
            assert {r["since"] for r in chert.requests} == {since}

            # Chert mends its chain: the window repeats from the same watermark, reads
            # the rows it never reached, and only now advances.
            chert.requests.clear()
            chert.pages = {None: (newest, "c1"), "c1": (older, "c2"), "c2": (oldest, None)}
            before = time.time()
            result = await poller.window_guarded()
            after = time.time()
            assert result is not None
            assert result.seen == 5
            assert {r["since"] for r in chert.requests} == {since}
            assert [r.get("cursor") for r in chert.requests] == [None, "c1", "c2"]
            want = parse_timestamp(newest[0]["created_at"])
            assert float(await redis.get(rt.keys.watermark(TENANT)) or b"0") == want
            assert poller.windows == 1
            age = metrics.registry.get_sample_value(
                "chert_relay_poll_watermark_age_seconds", {"tenant": TENANT}
            )
            assert age is not None
            assert before - want <= age <= after - want  # set as the window advanced

            def windows(outcome: str) -> float:
                return (
                    metrics.registry.get_sample_value(
                        "chert_relay_poll_windows_total", {"tenant": TENANT, "outcome": outcome}
                    )
                    or 0.0
                )

            assert (windows("broken_chain"), windows("ok")) == (1, 1)
    for r in newest + older + oldest:
        assert await seen(redis, r["event_id"]), r["event_id"]


async def test_an_sse_stream_that_never_answers_is_given_up_and_retried(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    stream = "/api/v1/events/stream"
    async with silent_server() as silent:
        config = relay_config(
            redis_url,
            silent.base_url,
            "sse",
            api={"timeout": 0.3, "max_attempts": 1, "max_backoff": 0.2},
        )
        async with running_relay(config):
            # Before the bound, the first connect waited for headers forever.
            await wait_for(lambda: silent.count(stream) >= 2, timeout=30)
            await wait_for(
                lambda: any("SSE stream failed" in t for t in messages(caplog)), timeout=30
            )
    failed = next(t for t in messages(caplog) if "SSE stream failed" in t)
    assert "no response within 0.3s" in failed
