"""Requests that must be refused, found by the hostile-input suite (bench/hostile):
each is answered, counted, logged, and queues nothing."""

from __future__ import annotations

import asyncio
import logging

import pytest
from redis.asyncio import Redis

from relay.edge.http_server import STALL_S, HttpServer
from tests.edge.test_receiver import URL, Harness, make_harness, queued
from tests.support.common import ServeReceiver, envelope, make_config, signed, wait_for


@pytest.fixture
async def h(serve_receiver: ServeReceiver, redis: Redis) -> Harness:
    return await make_harness(serve_receiver, redis, server={"max_body_bytes": 4096})


async def _exchange(h: Harness, raw: bytes) -> tuple[bytes, bytes]:
    """Send ``raw``; the answer's head and everything after it until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", h.client.port)
    try:
        writer.write(raw)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        rest = await asyncio.wait_for(reader.read(), 10)
        return head, rest
    finally:
        writer.close()


PARSER_REFUSALS = [
    ("Content-Length: abc\r\n", "bad_content_length"),
    ("Content-Length: 2\r\nTransfer-Encoding: chunked\r\n", "bad_transfer_encoding"),
    ("Content-Length: 2\r\nContent-Length: 2\r\n", "bad_content_length"),
]


@pytest.mark.parametrize(("shape", "reason"), PARSER_REFUSALS)
async def test_a_request_the_parser_refuses_is_400_counted_and_logged(
    h: Harness, redis: Redis, caplog: pytest.LogCaptureFixture, shape: str, reason: str
) -> None:
    raw, headers = signed(envelope("smuggled"))
    head = f"POST {URL} HTTP/1.1\r\nHost: relay\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()
    )
    with caplog.at_level(logging.WARNING, logger="relay.edge.receiver"):
        answer, rest = await _exchange(h, (head + shape + "\r\n").encode() + b"{}" + raw)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"\r\nConnection: close\r\n" in answer
    assert f'"error": "{reason}"'.encode() in rest
    assert h.rejected(reason, tenant="unknown") == 1
    assert h.count("chert_relay_webhooks_total", tenant="unknown", outcome="rejected") == 1
    lines = [r.getMessage() for r in caplog.records if "webhook refused" in r.getMessage()]
    assert len(lines) == 1
    assert f"status=400 reason={reason}" in lines[0]
    assert headers["X-Webhook-Signature"].split("v1=")[1] not in lines[0]
    assert await queued(redis) == []


async def test_a_flood_of_parser_refusals_logs_one_line_and_counts_them_all(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    bad = f"POST {URL} HTTP/1.1\r\nHost: relay\r\nContent-Length: abc\r\n\r\n".encode()
    with caplog.at_level(logging.WARNING, logger="relay.edge.receiver"):
        for _ in range(20):
            answer, _ = await _exchange(h, bad)
            assert answer.startswith(b"HTTP/1.1 400 ")
    assert h.rejected("bad_content_length", tenant="unknown") == 20
    assert len([r for r in caplog.records if "webhook refused" in r.getMessage()]) == 1


SIGNED_BUT_REFUSED = [
    (b'{"event_id": "j1", "partner_id": "acme-7a3f", "n": NaN}', "malformed_json"),
    (b'{"event_id": "j2", "partner_id": "acme-7a3f", "n": Infinity}', "malformed_json"),
    (b'\xef\xbb\xbf{"event_id": "j3", "partner_id": "acme-7a3f"}', "malformed_json"),
    ('{"event_id": "j4", "partner_id": "acme-7a3f"}'.encode("utf-16"), "malformed_json"),
    (b'{"event_id": "j5", "partner_id": ["other-1"]}', "malformed_partner_id"),
    (b'{"event_id": "j6", "partner_id": {"slug": "other-1"}}', "malformed_partner_id"),
    (b'{"event_id": "j7", "partner_id": 7}', "malformed_partner_id"),
    (b'{"event_id": "j8", "partner_id": "other-1", "partner_id": "acme-7a3f"}', "duplicate_key"),
    (b'{"event_id": "j9", "event_id": "j10", "partner_id": "acme-7a3f"}', "duplicate_key"),
]


@pytest.mark.parametrize(("body", "reason"), SIGNED_BUT_REFUSED)
async def test_a_signed_body_that_is_not_strict_json_or_is_ambiguous_is_400(
    h: Harness, redis: Redis, body: bytes, reason: str
) -> None:
    status, answer = await h.post(*signed(body))
    assert (status, answer["error"]) == (400, reason)
    assert h.rejected(reason) == 1
    assert await queued(redis) == []
    assert await redis.keys("chert-relay:seen:*") == []


async def test_connection_settings_come_from_the_config_and_its_reloads(
    serve_receiver: ServeReceiver, redis: Redis
) -> None:
    h = await make_harness(
        serve_receiver, redis, server={"max_connections": 3, "keepalive_timeout": "20s"}
    )
    server = h.receiver.server()
    assert (server.state.max_connections, server.state.keepalive_timeout) == (3, 20.0)
    h.receiver.set_config(make_config(server={"max_connections": 5}))
    assert (server.state.max_connections, server.state.keepalive_timeout) == (5, 75.0)


async def test_at_max_connections_an_idle_or_stalled_one_makes_room_and_a_busy_one_503(
    serve_receiver: ServeReceiver, redis: Redis
) -> None:
    h = await make_harness(serve_receiver, redis, server={"max_connections": 1})
    server = h.receiver.server()
    port = h.client.port
    idle_reader, idle = await asyncio.open_connection("127.0.0.1", port)
    await wait_for(lambda: server.open_connections == 1, 10)
    assert h.count("chert_relay_receiver_connections") == 1
    # A webhook on a new connection: the idle one is closed to make room.
    raw, headers = signed(envelope("cap1"))
    head = f"POST {URL} HTTP/1.1\r\nHost: relay\r\nContent-Length: {len(raw)}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode() + b"\r\n" + raw)
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 202")
    assert await asyncio.wait_for(idle_reader.read(), 10) == b""
    idle.close()
    assert h.count("chert_relay_receiver_connection_limit_total", action="idle_closed") == 1
    # That one is now mid-request (a head half sent): nothing can make room for another.
    writer.write(b"POST " + URL.encode() + b" HTTP/1.1\r\nHost: relay\r\n")
    await wait_for(lambda: all(c.head_since for c in server.state.connections), 10)
    refused_reader, refused = await asyncio.open_connection("127.0.0.1", port)
    answer = await asyncio.wait_for(refused_reader.readuntil(b"\r\n\r\n"), 10)
    rest = await asyncio.wait_for(refused_reader.read(), 10)
    refused.close()
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert b"Retry-After: 5\r\n" in answer
    assert b"too_many_connections" in rest
    assert h.count("chert_relay_receiver_connection_limit_total", action="refused") == 1
    # Once its head has stalled for STALL_S, a webhook on a new connection takes its place.
    loop = asyncio.get_running_loop()
    await wait_for(lambda: _stalled_past(server, loop.time()), 10)
    raw, headers = signed(envelope("cap2"))
    head = f"POST {URL} HTTP/1.1\r\nHost: relay\r\nContent-Length: {len(raw)}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()
    )
    late_reader, late = await asyncio.open_connection("127.0.0.1", port)
    late.write(head.encode() + b"\r\n" + raw)
    assert (await asyncio.wait_for(late_reader.readline(), 10)).startswith(b"HTTP/1.1 202")
    await asyncio.wait_for(reader.read(), 10)  # the rest of its first answer, then EOF:
    assert reader.at_eof()  # the stalled one went
    late.close()
    writer.close()
    assert h.count("chert_relay_receiver_connection_limit_total", action="slow_closed") == 1
    assert len(await queued(redis)) == 4  # the two webhooks' jobs (two sinks each)


def _stalled_past(server: HttpServer, now: float) -> bool:
    return any(
        (since := c.stalled_since) is not None and now - since > STALL_S
        for c in server.state.connections
    )


@pytest.mark.parametrize("line", [f"POST {URL}", f"POST {URL} HTTP/2.0"])
async def test_a_request_line_that_is_not_http_1_is_505(
    h: Harness, redis: Redis, line: str
) -> None:
    """aiohttp's parser reads a request line without a version as HTTP/0.9 — and still
    reads its headers and body — and takes HTTP/2.0 in an HTTP/1 request."""
    raw, headers = signed(envelope("v09"))
    head = f"{line}\r\nHost: relay\r\nContent-Length: {len(raw)}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()
    )
    answer, rest = await _exchange(h, head.encode() + b"\r\n" + raw)
    assert answer.startswith(b"HTTP/1.1 505 ")
    assert b'"error": "bad_request_line"' in rest
    assert h.rejected("bad_request_line", tenant="unknown") == 1
    assert await queued(redis) == []


async def test_a_transfer_coding_other_than_chunked_is_501(h: Harness, redis: Redis) -> None:
    """aiohttp's parser takes "gzip, chunked" and reads the chunks undecoded."""
    raw, headers = signed(envelope("te1"))
    head = f"POST {URL} HTTP/1.1\r\nHost: relay\r\nTransfer-Encoding: gzip, chunked\r\n"
    head += "Connection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(raw), raw)
    answer, rest = await _exchange(h, head.encode() + b"\r\n" + chunked)
    assert answer.startswith(b"HTTP/1.1 501 ")
    assert b'"error": "bad_transfer_encoding"' in rest
    assert h.rejected("bad_transfer_encoding") == 1
    assert await queued(redis) == []


async def test_other_paths_and_methods_are_counted_and_logged_throttled(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="relay.edge.receiver"):
        for path in ("/", "/webhooks/chert/", "/wp-login.php", f"{URL}/x"):
            assert (await h.client.post(path, data=b"{}")).status == 404
        for path in (URL, "/webhooks/chert/nobody"):
            resp = await h.client.get(path)
            assert (resp.status, resp.headers["Allow"]) == (405, "POST")
    assert h.rejected("not_found", tenant="unknown") == 4
    assert h.rejected("method_not_allowed") == 1
    assert h.rejected("method_not_allowed", tenant="unknown") == 1
    lines = [r.getMessage() for r in caplog.records if "webhook refused" in r.getMessage()]
    assert len(lines) == 3  # one per (tenant, reason)


async def test_a_body_that_turns_bad_is_logged_without_its_bytes(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp's parser quotes the bytes it choked on; those are the sender's payload."""
    head = f"POST {URL} HTTP/1.1\r\nHost: relay\r\nTransfer-Encoding: chunked\r\n"
    head += "Expect: 100-continue\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", h.client.port)
    try:
        with caplog.at_level(logging.WARNING, logger="relay.edge.receiver"):
            writer.write(head.encode())
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)  # 100 Continue
            writer.write(b"5\r\nabcde\r\nzz-a-message-text-from-the-body\r\n")
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert h.rejected("malformed_body") == 1
    assert "message-text-from-the-body" not in caplog.text
    (line,) = [r.getMessage() for r in caplog.records if "webhook refused" in r.getMessage()]
    assert line.endswith("the body could not be read: Invalid character in chunk size")
