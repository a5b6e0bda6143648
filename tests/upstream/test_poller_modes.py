"""The poller's modes end to end: simulator as Chert, the real service, the real Redis.

Intervals, lapse times and stream lifetimes are shortened; every wait is bounded
(``wait_for``) and nothing sleeps to synchronize. Deliveries are checked on what
ingest enqueued for the sinks (one arq job per event and matching sink).
"""

from __future__ import annotations

import asyncio
import logging
import random

import pytest
from redis.asyncio import Redis

from relay.ingest.envelope import parse_timestamp
from relay.service import Service
from relay.upstream.poller import Poller
from tests.support.common import TENANT, stored_event, wait_for
from tests.support.upstream import (
    enqueued,
    expected_jobs,
    ingested,
    messages,
    metrics,
    relay_config,
    running_relay,
    sample,
    simulator,
    wait_enqueued,
    webhook_url,
)


def mode_gauge(service: Service, mode: str) -> float:
    return sample(metrics(service), "chert_relay_poll_mode", tenant=TENANT, mode=mode)


async def test_always_mode_delivers_everything_without_any_webhook(
    redis_url: str, redis: Redis
) -> None:
    async with simulator() as sim:
        config = relay_config(redis_url, sim.base_url, "always")
        async with running_relay(config) as service:
            await wait_for(lambda: mode_gauge(service, "always") == 1)
            rows = []
            for _ in range(4):  # several windows, with pages of 7
                rows += sim.emit(TENANT, count=6)
                rows += sim.emit(TENANT, type="reaction.added", count=2)
                await wait_enqueued(redis, rows)
            assert await enqueued(redis) == expected_jobs(rows)
            assert ingested(metrics(service)) == len(rows)
            assert not sim.webhook_attempts
            wm = float(await redis.get(f"chert-relay:poll:wm:{TENANT}"))
            newest = max(r["created_at"] for r in sim.log(TENANT))
            assert wm == pytest.approx(_unix(newest))


def _unix(iso: str) -> float:
    value = parse_timestamp(iso)
    assert value is not None
    return value


async def test_fallback_switches_to_fast_polling_when_webhooks_stop_and_back(
    redis_url: str, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with simulator() as sim:
        config = relay_config(redis_url, sim.base_url, "fallback", lapse_after=3.0)
        async with running_relay(config) as service:
            sim.tenants[TENANT].webhook_url = webhook_url(service)
            await wait_for(lambda: mode_gauge(service, "reconcile") == 1)
            # The window the poller runs on taking the lease is over: the next events
            # can only come by webhook until webhooks lapse.
            poller = service.roles["poller"]
            assert isinstance(poller, Poller)
            await wait_for(lambda: poller.tenants[TENANT].windows >= 1)
            m = metrics(service)
            # Webhooks flow: events arrive by webhook, the poller stays slow.
            first = sim.emit(TENANT, count=3)
            await wait_enqueued(redis, first)
            assert (
                sample(
                    m,
                    "chert_relay_events_ingested_total",
                    tenant=TENANT,
                    source="webhook",
                    outcome="new",
                )
                == 3
            )
            assert mode_gauge(service, "fast") == 0
            # Webhooks stop: later events still arrive, by polling, after the switch.
            sim.faults.webhooks_enabled = False
            later = sim.emit(TENANT, count=5)
            await wait_enqueued(redis, first + later, timeout=3.0 + 10)
            await wait_for(lambda: mode_gauge(service, "fast") == 1)
            assert mode_gauge(service, "reconcile") == 0
            assert any("webhooks have lapsed" in t for t in messages(caplog, level=logging.WARNING))
            # the poller counts an event once its ingest has answered: just after the
            # jobs show in Redis
            await wait_for(
                lambda: (
                    sample(
                        m,
                        "chert_relay_events_ingested_total",
                        tenant=TENANT,
                        source="poll",
                        outcome="new",
                    )
                    >= 5
                )
            )
            assert (
                sample(
                    m,
                    "chert_relay_events_ingested_total",
                    tenant=TENANT,
                    source="poll",
                    outcome="new",
                )
                == 5
            )
            # Webhooks resume: the next webhook ends fast polling.
            sim.faults.webhooks_enabled = True
            resumed = sim.emit(TENANT, count=1)
            await wait_for(lambda: mode_gauge(service, "reconcile") == 1, timeout=10)
            assert any("webhooks are arriving again" in t for t in messages(caplog))
            await wait_enqueued(redis, first + later + resumed)
            assert await enqueued(redis) == expected_jobs(first + later + resumed)
            # Slow again: over five fast intervals (well inside lapse_after), at most the
            # one call that was in flight.
            before = len(sim.api_requests)
            await asyncio.sleep(5 * 0.2)
            assert len(sim.api_requests) - before <= 1


async def test_sweep_evidence_of_undelivered_events_starts_fast_polling(
    redis_url: str, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with simulator() as sim:
        # Webhooks "work" (recent), but some events were never pushed: the sweep sees them.
        config = relay_config(
            redis_url,
            sim.base_url,
            "fallback",
            lapse_after=3600,
            reconcile_every=0.5,
            stale_after=0.0,
        )
        async with running_relay(config) as service:
            sim.tenants[TENANT].webhook_url = webhook_url(service)
            sim.faults.webhooks_enabled = False
            rows = sim.emit(TENANT, count=2)
            await wait_enqueued(redis, rows)
            await wait_for(lambda: mode_gauge(service, "fast") == 1)
            assert any("never saw" in t for t in messages(caplog, level=logging.WARNING))


async def test_dropped_duplicated_reordered_webhooks_every_event_exactly_once(
    redis_url: str, redis: Redis
) -> None:
    async with simulator(seed=7) as sim:
        config = relay_config(
            redis_url, sim.base_url, "fallback", lapse_after=3600, reconcile_every=0.5
        )
        async with running_relay(config) as service:
            sim.tenants[TENANT].webhook_url = webhook_url(service)
            sim.faults.drop_rate = 0.3
            sim.faults.duplicate_rate = 0.3
            sim.faults.reorder = True
            rnd = random.Random(3)
            rows = []
            for _ in range(6):
                rows += sim.emit(
                    TENANT,
                    type=rnd.choice(["message.received", "reaction.added", "lead_reply"]),
                    count=5,
                )
            await wait_enqueued(redis, rows, timeout=30)
            await sim.wait_idle(timeout=20)
            m = metrics(service)
            assert await enqueued(redis) == expected_jobs(rows)
            assert ingested(m) == len(rows)
            dropped = [a for a in sim.webhook_attempts if a.error == "dropped"]
            assert dropped, "the fault injection dropped nothing"
            assert (
                sample(
                    m,
                    "chert_relay_events_ingested_total",
                    tenant=TENANT,
                    source="poll",
                    outcome="new",
                )
                > 0
            )
            # Each event's stored record says how many jobs it made: once per sink.
            for row in rows:
                stored = await stored_event(redis, row["event_id"])
                assert stored is not None
                assert stored.users == (2 if row["type"] == "message.received" else 1)


async def test_sse_mode_across_lifetimes_and_a_forced_disconnect(
    redis_url: str, redis: Redis
) -> None:
    async with simulator(stream_lifetime=0.6, heartbeat_interval=0.2) as sim:
        config = relay_config(redis_url, sim.base_url, "sse", reconcile_every=3600)
        async with running_relay(config) as service:
            m = metrics(service)
            await wait_for(lambda: sim.open_streams == 1)
            # The catch-up window that starts with the stream is over: from here on,
            # events can only come by the stream.
            poller = service.roles["poller"]
            assert isinstance(poller, Poller)
            await wait_for(lambda: poller.tenants[TENANT].windows >= 1)
            rows = []
            for i in range(4):
                opened = sample(m, "chert_relay_sse_connections_total", tenant=TENANT)
                rows += sim.emit(TENANT, count=3)
                await wait_enqueued(redis, rows)
                if i == 1:
                    sim.disconnect_streams()  # cut without `event: close`
                # the stream ends and is reopened before the next batch
                await wait_for(
                    lambda o=opened: (
                        sample(m, "chert_relay_sse_connections_total", tenant=TENANT) > o
                    )
                )
            assert sample(m, "chert_relay_sse_reconnects_total", tenant=TENANT, reason="close") >= 2
            sim.disconnect_streams()
            rows += sim.emit(TENANT, count=2)
            await wait_enqueued(redis, rows)
            assert await enqueued(redis) == expected_jobs(rows)
            assert sample(
                m, "chert_relay_events_ingested_total", tenant=TENANT, source="sse", outcome="new"
            ) == len(rows)
            stream_calls = [r for r in sim.api_requests if r.path.endswith("/events/stream")]
            assert all(r.status == 200 for r in stream_calls)
            assert all("since" in r.query for r in stream_calls)


async def test_reload_switches_mode_without_restart(redis_url: str, redis: Redis) -> None:
    async with simulator() as sim:
        config = relay_config(redis_url, sim.base_url, "fallback", lapse_after=3600)
        async with running_relay(config) as service:
            await wait_for(lambda: mode_gauge(service, "reconcile") == 1)
            poller = service.roles["poller"]
            assert isinstance(poller, Poller)
            poller.reload(relay_config(redis_url, sim.base_url, "always"))
            await wait_for(lambda: mode_gauge(service, "always") == 1)
            rows = sim.emit(TENANT, count=3)
            await wait_enqueued(redis, rows)
            poller.reload(relay_config(redis_url, sim.base_url, "off"))
            await wait_for(lambda: TENANT not in poller.tenants)
            await wait_for(lambda: mode_gauge(service, "always") == 0)
