"""Sinks as an operator sees and handles them, for the CLI (``chert-relay sinks``), the
admin API (``/api/sinks``) and the operator page: each sink's state, pausing and
resuming it (:mod:`relay.store.sinks`), and a test event sent to it.

A sink's state: whether it is paused (and since when), whether its URL is marked gone
(it answered 410: its deliveries dead-letter without a request), its breaker, and how
many of its deliveries wait in its waiting set and are in flight.

A test event is a synthetic event in Chert's envelope (type ``relay.test``, a fresh
``relay-test:<uuid>`` id) signed and sent to the sink exactly as a delivery is
(:class:`relay.delivery.outlet.Outlet`, ``X-Relay-Source: test``), but not
through the queue: nothing is stored, retried or dead-lettered, and a paused sink gets
it too — it is how an operator checks a sink before resuming it. The answer comes back
whole: the HTTP status (or the error), how long it took, and an excerpt of the body
with the sink's credentials blanked.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import aiohttp
from redis.asyncio import Redis

from relay.config import Config, SinkConfig
from relay.delivery import breaker, targets
from relay.delivery.outlet import Outlet
from relay.delivery.sink_client import Request
from relay.keys import Keys
from relay.store.sinks import PauseChange, SinkSwitch, paused_since

log = logging.getLogger(__name__)

TEST_EVENT_TYPE = "relay.test"
TEST_SOURCE = "test"


@dataclass(frozen=True, slots=True)
class SinkState:
    tenant: str
    sink: str
    paused_since: float | None  # unix seconds; None: not paused
    gone: bool  # its URL answered 410
    breaker: str  # closed | half_open | open
    waiting: int  # deliveries set aside in its waiting set
    in_flight: int
    kind: str = "http"  # http, redis-stream, nats or amqp

    @property
    def paused(self) -> bool:
        return self.paused_since is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "sink": self.sink,
            "kind": self.kind,
            "paused": self.paused,
            "paused_since": self.paused_since,
            "gone": self.gone,
            "breaker": self.breaker,
            "waiting": self.waiting,
            "in_flight": self.in_flight,
        }


async def sink_states(
    client: Redis, config: Config, pairs: list[tuple[str, str]]
) -> list[SinkState]:
    """The state of each configured ``(tenant, sink)`` of ``pairs``, in their order."""
    keys = Keys(config.redis.key_prefix)
    if not pairs:
        return []
    seconds, micros = cast(tuple[int, int], await client.time())  # Redis' clock
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    async with client.pipeline(transaction=False) as pipe:
        for tenant, sink in pairs:
            pipe.get(keys.paused(tenant, sink))
            pipe.get(keys.sink_gone(tenant, sink))
            pipe.zcard(keys.waiting(tenant, sink))
            pipe.zcount(keys.inflight(tenant, sink), now_ms, "+inf")
        found = await pipe.execute()
    states = await breaker.states(client, keys, pairs)
    out = []
    for i, (tenant, sink) in enumerate(pairs):
        paused, gone_url, waiting, flying = found[4 * i : 4 * i + 4]
        conf = _sink(config, tenant, sink)
        url = None if conf is None else str(conf.url)
        out.append(
            SinkState(
                tenant=tenant,
                sink=sink,
                paused_since=paused_since(paused),
                # the mark names the URL that answered 410: a sink given a new URL is not gone
                gone=gone_url is not None and gone_url.decode() == url,
                breaker=breaker.STATE_NAMES[states[(tenant, sink)]],
                waiting=int(waiting),
                in_flight=int(flying),
                kind="http" if conf is None else conf.kind,
            )
        )
    return out


def configured(config: Config, tenants: list[str] | None = None) -> list[tuple[str, str]]:
    """Every configured ``(tenant, sink)``, of ``tenants`` only if given."""
    return [
        (t.slug, s.name)
        for t in config.tenants
        if tenants is None or t.slug in tenants
        for s in t.sinks
    ]


def _sink(config: Config, tenant: str, sink: str) -> SinkConfig | None:
    t = config.tenant(tenant)
    return None if t is None else next((s for s in t.sinks if s.name == sink), None)


class UnknownSink(LookupError):
    """No such sink in the configuration."""

    def __init__(self, tenant: str, sink: str) -> None:
        super().__init__(f"no sink {sink!r} of tenant {tenant!r} in the configuration")


def find_sink(config: Config, tenant: str, sink: str) -> SinkConfig:
    found = _sink(config, tenant, sink)
    if found is None:
        raise UnknownSink(tenant, sink)
    return found


async def pause(client: Redis, config: Config, tenant: str, sink: str, who: str) -> PauseChange:
    """Pause a configured sink (idempotent); logged, naming ``who`` asked."""
    find_sink(config, tenant, sink)
    out = await SinkSwitch(client, Keys(config.redis.key_prefix)).pause(tenant, sink)
    if out.changed:
        log.info("sink %s/%s paused by %s: nothing is sent to it until resumed", tenant, sink, who)
    else:
        since = iso(out.since)
        log.info("sink %s/%s: pause by %s: already paused (since %s)", tenant, sink, who, since)
    return out


async def resume(client: Redis, config: Config, tenant: str, sink: str, who: str) -> PauseChange:
    """Resume a configured sink (idempotent); logged, naming ``who`` asked."""
    find_sink(config, tenant, sink)
    out = await SinkSwitch(client, Keys(config.redis.key_prefix)).resume(tenant, sink)
    if out.changed:
        log.info(
            "sink %s/%s resumed by %s after %.1fs paused: its waiting deliveries go now",
            tenant,
            sink,
            who,
            out.paused_for or 0.0,
        )
    else:
        log.info("sink %s/%s: resume by %s: it was not paused", tenant, sink, who)
    return out


def change_json(tenant: str, sink: str, action: str, out: PauseChange) -> dict[str, Any]:
    return {
        "tenant": tenant,
        "sink": sink,
        "action": action,
        "changed": out.changed,
        "paused": action == "pause",
        "paused_since": out.since if action == "pause" else None,
    }


@dataclass(frozen=True, slots=True)
class SinkTestReply:
    """How a test event went."""

    tenant: str
    sink: str
    event_id: str
    status: int | None  # None: no HTTP answer
    kind: str  # http | timeout | connection; a broker's: ack | nack | refused
    ms: float
    excerpt: str  # the answer's body (2xx) or the error, scrubbed and cut
    ok: bool  # delivered: a 2xx, or a broker's ack

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "sink": self.sink,
            "event_id": self.event_id,
            "ok": self.ok,
            "status": self.status,
            "kind": self.kind,
            "ms": round(self.ms, 1),
            "excerpt": self.excerpt,
        }


def build_test_event(tenant: str, sink: str) -> tuple[str, bytes]:
    """A fresh test event's id and body, in Chert's envelope."""
    event_id = f"relay-test:{uuid.uuid4()}"
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    body = {
        "event": TEST_EVENT_TYPE,
        "event_id": event_id,
        "timestamp": stamp,
        "api_version": "v1",
        "event_type": TEST_EVENT_TYPE,
        "partner_id": tenant,
        "data": {
            "test": True,
            "sink": sink,
            "note": "a test event sent by chert-relay to check this sink; not from Chert",
        },
    }
    return event_id, json.dumps(body, separators=(",", ":")).encode()


async def send_test_event(config: Config, tenant: str, sink: str, who: str) -> SinkTestReply:
    """Sign and POST a test event to the sink, as a delivery would be; logged."""
    conf = find_sink(config, tenant, sink)
    event_id, body = build_test_event(tenant, sink)
    async with aiohttp.ClientSession(
        connector=targets.connector(config), cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        outlet = Outlet(session)
        req = Request(tenant, event_id, TEST_EVENT_TYPE, 1, TEST_SOURCE)
        try:
            answer = await outlet.send(conf, req, body, conf.timeout)
        finally:
            await outlet.close()
    out = SinkTestReply(
        tenant,
        sink,
        event_id,
        answer.status,
        answer.kind,
        answer.seconds * 1000,
        answer.excerpt if answer.ok else answer.error,
        answer.ok,
    )
    log.info(
        "sink %s/%s: test event %s by %s: %s in %.0f ms",
        tenant,
        sink,
        event_id,
        who,
        answer.said,
        out.ms,
    )
    return out


def iso(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
