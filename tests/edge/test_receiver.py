"""The receiver: what Chert's webhooks get back, what gets queued, what gets counted."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from relay.edge.receiver import Receiver
from relay.ingest.ingestor import Ingestor
from relay.keys import Keys
from relay.metrics import Metrics
from relay.store.client import connect
from relay.store.embedded import EmbeddedRedis, free_port
from tests.support.common import (
    OTHER_SECRET,
    SINK_SECRET,
    TENANT,
    WEBHOOK_SECRET,
    ReceiverClient,
    ServeReceiver,
    envelope,
    log_row,
    make_config,
    signed,
    stored_event,
    wait_for,
)

SINKS = [
    {
        "name": "crm",
        "url": "http://127.0.0.1:9/crm",
        "events": ["message.received"],
        "secret": SINK_SECRET,
    },
    {"name": "all", "url": "http://127.0.0.1:9/all", "events": ["*"]},
    {"name": "reactions", "url": "http://127.0.0.1:9/r", "events": ["reaction.*"]},
]
URL = f"/webhooks/chert/{TENANT}"
QUEUE = Keys("chert-relay").queue


class Harness:
    def __init__(
        self, client: ReceiverClient, receiver: Receiver, ingestor: Ingestor, metrics: Metrics
    ) -> None:
        self.client = client
        self.receiver = receiver
        self.ingestor = ingestor  # the receiver's
        self.metrics = metrics

    async def post(self, body: bytes, headers: dict[str, str], url: str = URL) -> tuple[int, Any]:
        resp = await self.client.post(url, data=body, headers=headers)
        return resp.status, await resp.json()

    def count(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def rejected(self, reason: str, tenant: str = TENANT) -> float:
        return self.count("chert_relay_webhook_rejections_total", tenant=tenant, reason=reason)


async def make_harness(serve: ServeReceiver, redis_client: Redis, **cfg: Any) -> Harness:
    config = make_config(sinks=SINKS, **cfg)
    metrics = Metrics()
    ingestor = Ingestor(redis_client, config, metrics)
    receiver = Receiver(config, ingestor, metrics)
    return Harness(await serve(receiver.server()), receiver, ingestor, metrics)


@pytest.fixture
async def h(serve_receiver: ServeReceiver, redis: Redis) -> Harness:
    return await make_harness(serve_receiver, redis, server={"max_body_bytes": 4096})


async def queued(redis: Redis) -> list[str]:
    return sorted(x.decode() for x in await redis.zrange(QUEUE, 0, -1))


def job(sink: str, event_id: str) -> str:
    return Keys("chert-relay").job_id(TENANT, sink, event_id)


async def test_new_event_is_queued_once_per_matching_sink(h: Harness, redis: Redis) -> None:
    status, body = await h.post(*signed(envelope("chert:msg:A")))
    assert (status, body["status"]) == (202, "accepted")
    # "reactions" filters on reaction.* and gets nothing.
    assert await queued(redis) == [job("all", "chert:msg:A"), job("crm", "chert:msg:A")]
    assert h.count("chert_relay_webhooks_total", tenant=TENANT, outcome="accepted") == 1


async def test_reaction_goes_to_reactions_and_all(h: Harness, redis: Redis) -> None:
    status, _ = await h.post(*signed(envelope("r:1", event="reaction.added")))
    assert status == 202
    assert await queued(redis) == [job("all", "r:1"), job("reactions", "r:1")]


async def test_duplicates_resigned_and_as_log_row_are_200_and_queue_nothing(
    h: Harness, redis: Redis
) -> None:
    assert (await h.post(*signed(envelope("chert:msg:B"), legacy=True)))[0] == 202
    before = await queued(redis)
    status, body = await h.post(*signed(envelope("chert:msg:B"), timestamp=int(time.time()) - 5))
    assert (status, body["status"]) == (200, "duplicate")
    status, body = await h.post(*signed(log_row("chert:msg:B")))
    assert (status, body["status"]) == (200, "duplicate")
    assert await queued(redis) == before
    assert h.count("chert_relay_webhooks_total", tenant=TENANT, outcome="duplicate") == 2
    assert (
        h.count(
            "chert_relay_events_ingested_total",
            tenant=TENANT,
            source="webhook",
            outcome="duplicate",
        )
        == 2
    )


async def test_log_row_shape_is_accepted_and_normalized_to_the_envelope(
    h: Harness, redis: Redis
) -> None:
    assert (await h.post(*signed(log_row("chert:msg:row"))))[0] == 202
    stored = await stored_event(redis, "chert:msg:row")
    assert stored is not None
    assert "payload" not in json.loads(stored.body)
    assert json.loads(stored.body)["event_id"] == "chert:msg:row"


async def test_a_body_without_an_event_id_replayed_with_fresh_headers_is_one_event(
    h: Harness, redis: Redis
) -> None:
    # The unsigned X-Webhook-Event-Id and X-Webhook-Event do not make a captured request
    # new, nor route it elsewhere: its id is a digest of the signed bytes.
    body = envelope("ignored")
    del body["event_id"]
    raw, headers = signed(body)
    event_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    statuses = []
    for i in range(5):
        fresh = {**headers, "X-Webhook-Event-Id": f"chert:msg:fresh-{i}"}
        fresh["X-Webhook-Event"] = "reaction.added"
        statuses.append((await h.post(raw, fresh))[0])
    assert statuses == [202, 200, 200, 200, 200]
    assert await queued(redis) == sorted([job("crm", event_id), job("all", event_id)])


def _bad_signature() -> tuple[bytes, dict[str, str]]:
    raw, headers = signed(envelope("x1"))
    return raw, {**headers, "X-Webhook-Signature": headers["X-Webhook-Signature"][:-4] + "0000"}


BAD_INPUTS: list[tuple[str, Callable[[], tuple[bytes, dict[str, str]]], int, str]] = [
    ("wrong signature", _bad_signature, 401, "bad_signature"),
    ("wrong secret", lambda: signed(envelope("x2"), OTHER_SECRET), 401, "bad_signature"),
    (
        "stale",
        lambda: signed(envelope("x3"), timestamp=int(time.time()) - 400),
        401,
        "stale_timestamp",
    ),
    (
        "future",
        lambda: signed(envelope("x4"), timestamp=int(time.time()) + 400),
        401,
        "future_timestamp",
    ),
    (
        "no signature",
        lambda: (b"{}", {"Content-Type": "application/json"}),
        401,
        "missing_signature",
    ),
    (
        "malformed signature",
        lambda: (b"{}", {"X-Webhook-Signature": "t=1,v1=xyz"}),
        401,
        "malformed_signature",
    ),
    ("malformed json", lambda: signed(b'{"event_id": "x5",'), 400, "malformed_json"),
    ("not an object", lambda: signed(b'["x"]'), 400, "malformed_json"),
    (
        "other tenant's partner_id",
        lambda: signed(envelope("x6", partner_id="other-1")),
        403,
        "tenant_mismatch",
    ),
    ("oversized", lambda: signed(envelope("x7", pad="x" * 5000)), 413, "body_too_large"),
]


@pytest.mark.parametrize(
    ("make", "status", "reason"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS]
)
async def test_bad_input_gets_its_status_queues_nothing_and_is_counted(
    h: Harness,
    redis: Redis,
    make: Callable[[], tuple[bytes, dict[str, str]]],
    status: int,
    reason: str,
) -> None:
    got, body = await h.post(*make())
    assert got == status
    assert body["error"] == reason
    assert await queued(redis) == []
    assert await redis.keys("chert-relay:seen:*") == []
    assert h.rejected(reason) == 1
    assert h.count("chert_relay_webhooks_total", tenant=TENANT, outcome="rejected") == 1


async def test_unknown_tenant_is_404_and_never_becomes_a_label(h: Harness, redis: Redis) -> None:
    status, body = await h.post(*signed(envelope("u1")), url="/webhooks/chert/nobody-here")
    assert (status, body["error"]) == (404, "unknown_tenant")
    assert h.rejected("unknown_tenant", tenant="unknown") == 1
    assert b"nobody-here" not in h.metrics.render()
    assert await queued(redis) == []


@pytest.mark.parametrize(
    "path", ["/", "/webhooks/chert/", "/webhooks/chert/acme-7a3f/extra", "/webhooks/other/x"]
)
async def test_other_paths_are_404_and_queue_nothing(h: Harness, redis: Redis, path: str) -> None:
    status, body = await h.post(*signed(envelope("p1")), url=path)
    assert (status, body["error"]) == (404, "not_found")
    assert await queued(redis) == []


async def test_other_methods_on_the_webhook_path_are_405(h: Harness, redis: Redis) -> None:
    resp = await h.client.get(URL)
    assert resp.status == 405
    assert resp.headers["Allow"] == "POST"
    assert (await resp.json())["error"] == "method_not_allowed"
    assert await queued(redis) == []


async def test_one_tenants_secret_cannot_post_for_another(h: Harness, redis: Redis) -> None:
    # other-1's secret on acme's URL: signature fails.
    status, _ = await h.post(*signed(envelope("c1"), OTHER_SECRET))
    assert status == 401
    # other-1's URL and secret, but the body claims to be acme's: refused.
    status, body = await h.post(
        *signed(envelope("c2"), OTHER_SECRET), url="/webhooks/chert/other-1"
    )
    assert (status, body["error"]) == (403, "tenant_mismatch")
    assert await queued(redis) == []


async def test_rotation_overlap_any_configured_secret_passes(
    serve_receiver: ServeReceiver, redis: Redis
) -> None:
    new = "ab" * 32
    tenants = [
        {
            "slug": TENANT,
            "webhook_secrets": [new, OTHER_SECRET],
            "poll": {"mode": "off"},
            "sinks": SINKS,
        }
    ]
    h2 = await make_harness(serve_receiver, redis, tenants=tenants)
    assert (await h2.post(*signed(envelope("rot1"), new)))[0] == 202
    assert (await h2.post(*signed(envelope("rot2"), OTHER_SECRET)))[0] == 202


async def test_draining_answers_503_with_retry_after(h: Harness, redis: Redis) -> None:
    h.receiver.draining = True
    resp = await h.client.post(
        URL, data=signed(envelope("d1"))[0], headers=signed(envelope("d1"))[1]
    )
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "5"
    assert await queued(redis) == []


async def test_redis_down_is_503_then_the_same_request_succeeds(
    serve_receiver: ServeReceiver, make_redis_server: Callable[[], Any]
) -> None:
    server = await make_redis_server()
    client = connect(server.url, timeout=1.0)
    try:
        h2 = await make_harness(serve_receiver, client)
        raw, headers = signed(envelope("down:1"))
        await server.stop()
        resp = await h2.client.post(URL, data=raw, headers=headers)
        assert resp.status == 503
        assert "Retry-After" in resp.headers
        assert h2.rejected("redis_unavailable") == 1
        await server.start()  # same directory and port: AOF replays
        status, body = await h2.post(raw, headers)
        assert (status, body["status"]) == (202, "accepted")
        assert await client.zcard(QUEUE) == 2
    finally:
        await client.aclose()


async def _raw_exchange(h: Harness, head: bytes, body: bytes) -> tuple[bytes, bytes]:
    """Send ``head``; read what comes before the body is sent; send it; read the rest."""
    assert h.client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", h.client.port)
    try:
        writer.write(head)
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.write(body)
        rest = await asyncio.wait_for(reader.readuntil(b"}"), 10)
        return first, rest
    finally:
        writer.close()


async def test_expect_100_continue_is_answered_before_the_body(h: Harness, redis: Redis) -> None:
    raw, headers = signed(envelope("x100"))
    head = (
        f"POST {URL} HTTP/1.1\r\nHost: relay\r\nContent-Length: {len(raw)}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        + "Expect: 100-continue\r\n\r\n"
    ).encode()
    first, rest = await _raw_exchange(h, head, raw)
    assert first == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert rest.startswith(b"HTTP/1.1 202")
    assert await queued(redis) == [job("all", "x100"), job("crm", "x100")]


async def test_an_unknown_expectation_is_417(h: Harness, redis: Redis) -> None:
    resp = await h.client.post(URL, data=b"{}", headers={"Expect": "something-else"})
    assert resp.status == 417
    assert (await resp.json())["error"] == "bad_expect"
    assert h.rejected("bad_expect") == 1
    assert await queued(redis) == []


async def test_redis_killed_during_a_burst_loses_no_acknowledged_event(
    serve_receiver: ServeReceiver, tmp_path: Path
) -> None:
    """Every webhook answered 2xx is in Redis after a crash (SIGKILL, AOF with
    ``appendfsync always``); every other one was answered 503 and can be retried."""
    server = EmbeddedRedis(tmp_path / "redis", port=free_port(), appendfsync="always")
    await server.start()
    client = connect(server.url, timeout=1.0)
    try:
        h2 = await make_harness(serve_receiver, client, server={"ingest_timeout": 2.0})
        answers: dict[str, int] = {}

        async def send(i: int) -> None:
            event_id = f"crash:{i}"
            raw, headers = signed(envelope(event_id))
            try:
                resp = await h2.client.post(URL, data=raw, headers=headers)
                answers[event_id] = resp.status
            except aiohttp.ClientError:
                answers[event_id] = 0

        burst = [asyncio.ensure_future(send(i)) for i in range(400)]
        await wait_for(lambda: sum(s == 202 for s in answers.values()) >= 50, timeout=30)
        server.kill()  # mid-burst, as a crash
        await asyncio.gather(*burst)
        acked = [e for e, s in answers.items() if 200 <= s < 300]
        refused = [e for e, s in answers.items() if s == 503]
        assert acked  # the crash did land in the middle of the burst
        assert refused
        assert len(acked) + len(refused) == 400  # nothing else: no 4xx, no hang
        await server.start()  # same directory: the AOF replays
        keys = Keys("chert-relay")
        for event_id in acked:
            assert await client.exists(keys.seen(TENANT, event_id)), event_id
            stored = await stored_event(client, event_id)
            assert stored is not None, event_id
            assert stored.body, event_id
            for sink in ("all", "crm"):
                assert await client.zscore(QUEUE, job(sink, event_id)) is not None
    finally:
        await client.aclose()
        await server.stop()


async def test_a_failure_inside_the_relay_answers_500_and_counts(
    h: Harness, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # The ingestor no longer knows the tenant the receiver still serves: a bug, if it
    # ever happened. Chert retries a 5xx, so the answer must not be a 4xx.
    other = make_config().tenants[1].model_dump()
    h.ingestor.set_config(make_config(tenants=[other]))
    status, body = await h.post(*signed(envelope("chert:msg:bug")))
    assert (status, body["error"]) == (500, "internal_error")
    assert h.rejected("internal_error") == 1
    assert h.count("chert_relay_webhooks_total", tenant=TENANT, outcome="error") == 1
    assert h.count("chert_relay_webhook_ack_seconds_count") == 1
    assert "webhook handler failed: tenant=acme-7a3f" in caplog.text
    assert await queued(redis) == []


async def test_a_lone_surrogate_escape_in_the_text_is_accepted(h: Harness, redis: Redis) -> None:
    # JSON allows it and a sender truncating an emoji produces it; pydantic's parser
    # refuses it, and a 400 would never be retried.
    raw = (
        b'{"event":"message.received","event_id":"chert:msg:sur","partner_id":"'
        + TENANT.encode()
        + b'","data":{"message":{"parts":[{"type":"text","value":"hi \\ud83d"}]}}}'
    )
    status, body = await h.post(*signed(raw))
    assert (status, body["status"]) == (202, "accepted")
    stored = await stored_event(redis, "chert:msg:sur")
    assert stored is not None
    assert stored.body == raw  # byte for byte


def _raw_request(length: int | None = None) -> tuple[bytes, bytes]:
    """A signed webhook as raw HTTP (head, body); the head may announce another length."""
    body, headers = signed(envelope("raw:1"))
    head = (
        f"POST {URL} HTTP/1.1\r\nHost: relay\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        + "\r\n"
    ).encode()
    return head, body


async def _chunked_exchange(h: Harness, body: bytes, headers: dict[str, str]) -> bytes:
    """POST ``body`` with ``Transfer-Encoding: chunked`` (no length announced) in 1 KiB
    chunks; the answer's status line and JSON."""
    head = (
        f"POST {URL} HTTP/1.1\r\nHost: relay\r\nTransfer-Encoding: chunked\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        + "\r\n"
    ).encode()
    chunks = [body[i : i + 1024] for i in range(0, len(body), 1024)]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    assert h.client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", h.client.port)
    try:
        writer.write(head + framed)
        return await asyncio.wait_for(reader.readuntil(b"}"), 10)
    finally:
        writer.close()


async def test_a_chunked_body_is_accepted(h: Harness, redis: Redis) -> None:
    answer = await _chunked_exchange(h, *signed(envelope("ch1", pad="x" * 2000)))
    assert answer.startswith(b"HTTP/1.1 202"), answer
    assert await queued(redis) == [job("all", "ch1"), job("crm", "ch1")]


async def test_a_reload_lowers_the_body_limit_for_the_next_request(
    h: Harness, redis: Redis
) -> None:
    """SIGHUP's new max_body_bytes reaches the HTTP server too (a chunked body, with no
    length to refuse it by, is measured by the server)."""
    body, headers = signed(envelope("rl1", pad="x" * 1500))
    assert (await _chunked_exchange(h, body, headers)).startswith(b"HTTP/1.1 202")
    h.receiver.set_config(make_config(sinks=SINKS, server={"max_body_bytes": 1024}))
    body, headers = signed(envelope("rl2", pad="x" * 1500))
    answer = await _chunked_exchange(h, body, headers)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert await queued(redis) == [job("all", "rl1"), job("crm", "rl1")]


async def test_an_oversized_chunked_body_is_413_and_queues_nothing(
    h: Harness, redis: Redis
) -> None:
    """No Content-Length to refuse it by: the body itself is measured (limit 4096)."""
    answer = await _chunked_exchange(h, *signed(envelope("ch2", pad="x" * 5000)))
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert b"body_too_large" in answer
    assert h.rejected("body_too_large") == 1
    assert await queued(redis) == []


@pytest.mark.parametrize("in_pieces", [False, True], ids=["whole", "in-pieces"])
async def test_a_body_that_cannot_be_decoded_is_400_malformed_body(
    serve_receiver: ServeReceiver, redis: Redis, in_pieces: bool
) -> None:
    """A gzip body that does not inflate can never be read: a 400 (which Chert does not
    retry), not a 500 (which it would retry for ever). (A tenant that accepts compressed
    bodies: for the others any Content-Encoding is a 415 before decoding.)"""
    tenants = [
        {
            "slug": TENANT,
            "webhook_secrets": [WEBHOOK_SECRET],
            "accept_compressed": True,
            "poll": {"mode": "off"},
            "sinks": SINKS,
        }
    ]
    h = await make_harness(serve_receiver, redis, tenants=tenants)
    _, headers = signed(envelope("gz1"))
    body = b"\x1f\x8b\x08\x00garbage-garbage"
    head = (
        f"POST {URL} HTTP/1.1\r\nHost: relay\r\nContent-Length: {len(body)}\r\n"
        "Content-Encoding: gzip\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        + ("Expect: 100-continue\r\n" if in_pieces else "")
        + "\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", h.client.port)
    try:
        if in_pieces:  # the body follows the interim answer: the awaited read path
            writer.write(head)
            assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == (
                b"HTTP/1.1 100 Continue\r\n\r\n"
            )
            writer.write(body)
        else:
            writer.write(head + body)
        answer = await asyncio.wait_for(reader.readuntil(b"}"), 10)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert h.rejected("malformed_body") == 1
    assert h.rejected("internal_error") == 0
    assert await queued(redis) == []


async def test_a_body_that_never_arrives_gets_503_in_time(
    serve_receiver: ServeReceiver, redis: Redis
) -> None:
    h = await make_harness(serve_receiver, redis, server={"body_timeout": 0.2})
    head, body = _raw_request(length=2000)  # says 2000 bytes, sends 11
    assert h.client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", h.client.port)
    try:
        writer.write(head + body[:11])
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 30)
    finally:
        writer.close()
    assert line.startswith(b"HTTP/1.1 503"), line
    assert h.rejected("body_timeout") == 1
    assert await queued(redis) == []


async def test_a_sender_gone_mid_body_is_not_a_relay_failure(
    h: Harness, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    head, body = _raw_request()
    assert h.client.port is not None
    _, writer = await asyncio.open_connection("127.0.0.1", h.client.port)
    writer.write(head + body[: len(body) // 2])
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    await wait_for(lambda: _rejected(h, "client_disconnected"), 10)
    assert h.rejected("internal_error") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def _rejected(h: Harness, reason: str) -> bool:
    return h.rejected(reason) > 0


async def test_the_age_of_chert_timestamps_is_exported_accepted_or_refused(h: Harness) -> None:
    # How old Chert's signed timestamps are on arrival: a clock drifting toward
    # signature_tolerance shows before every webhook is refused, and after.
    def age() -> float:
        value = h.count("chert_relay_webhook_timestamp_age_seconds", tenant=TENANT)
        return value

    raw, headers = signed(envelope("age-1"), timestamp=int(time.time()) - 120)
    assert (await h.post(raw, headers))[0] == 202
    assert 119 <= age() <= 125
    raw, headers = signed(envelope("age-2"), timestamp=int(time.time()) + 400)
    assert (await h.post(raw, headers))[0] == 401
    assert -401 <= age() <= -395
