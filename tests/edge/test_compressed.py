"""Compressed webhook bodies: refused before any decoding unless the tenant accepts them,
and then bounded by what was sent (so an attacker cannot buy a MiB of inflating and
hashing, before the signature check, with a few KB)."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from typing import Any

import pytest
from redis.asyncio import Redis

from relay.edge.decoding import MAX_INFLATE, MIN_INFLATE_LIMIT
from tests.edge.test_receiver import SINKS, URL, Harness, make_harness, queued
from tests.support.common import (
    TENANT,
    WEBHOOK_SECRET,
    ServeReceiver,
    envelope,
    signed,
    stored_event,
)

MAX_BODY = 1 << 20


async def harness(serve: ServeReceiver, redis: Redis, accept: bool) -> Harness:
    tenant: dict[str, Any] = {
        "slug": TENANT,
        "webhook_secrets": [WEBHOOK_SECRET],
        "poll": {"mode": "off"},
        "sinks": SINKS,
    }
    if accept:
        tenant["accept_compressed"] = True
    return await make_harness(serve, redis, tenants=[tenant], server={"max_body_bytes": MAX_BODY})


async def exchange(h: Harness, head: dict[str, str], body: bytes) -> bytes:
    """Send one request as raw bytes; the answer's head and body."""
    lines = "".join(f"{k}: {v}\r\n" for k, v in head.items())
    raw = f"POST {URL} HTTP/1.1\r\nHost: relay\r\n{lines}\r\n".encode() + body
    reader, writer = await asyncio.open_connection("127.0.0.1", h.client.port)
    try:
        writer.write(raw)
        return await asyncio.wait_for(reader.readuntil(b"}"), 10)
    finally:
        writer.close()


def gzipped(event: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    raw, headers = signed(event)  # the signature is over the JSON, as Chert signs it
    sent = gzip.compress(raw)
    return sent, {
        **headers,
        "Content-Encoding": "gzip",
        "Content-Length": str(len(sent)),
    }


@pytest.mark.parametrize("coding", ["gzip", "deflate", "x-unknown", "GZIP "])
async def test_a_compressed_body_is_415_before_decoding_by_default(
    serve_receiver: ServeReceiver, redis: Redis, coding: str
) -> None:
    h = await harness(serve_receiver, redis, accept=False)
    sent, headers = gzipped(envelope("gz-default"))
    answer = await exchange(h, {**headers, "Content-Encoding": coding}, sent)
    assert answer.startswith(b"HTTP/1.1 415"), answer
    assert b'"error": "unsupported_content_encoding"' in answer
    assert b"accept_compressed" in answer
    assert h.rejected("unsupported_content_encoding") == 1
    assert await queued(redis) == []


async def test_identity_is_not_compression(serve_receiver: ServeReceiver, redis: Redis) -> None:
    h = await harness(serve_receiver, redis, accept=False)
    raw, headers = signed(envelope("gz-identity"))
    status, body = await h.post(raw, {**headers, "Content-Encoding": "identity"})
    assert (status, body["status"]) == (202, "accepted")


async def test_an_accepting_tenant_takes_a_gzip_body_and_stores_the_json(
    serve_receiver: ServeReceiver, redis: Redis
) -> None:
    h = await harness(serve_receiver, redis, accept=True)
    event = envelope("gz-ok")
    sent, headers = gzipped(event)
    answer = await exchange(h, headers, sent)
    assert answer.startswith(b"HTTP/1.1 202"), answer
    stored = await stored_event(redis, "gz-ok")
    assert stored is not None
    assert json.loads(stored.body) == event


async def test_a_bomb_stops_at_its_ratio_not_at_max_body(
    serve_receiver: ServeReceiver, redis: Redis
) -> None:
    """2 MiB of JSON in about 2 KB: decoding stops once the body is past
    max(MIN_INFLATE_LIMIT, MAX_INFLATE times its compressed size), far below max_body."""
    h = await harness(serve_receiver, redis, accept=True)
    raw, headers = signed(envelope("gz-bomb", pad="0" * (2 << 20)))
    sent = gzip.compress(raw, 9)
    limit = max(MIN_INFLATE_LIMIT, MAX_INFLATE * len(sent))
    assert limit < MAX_BODY
    headers = {**headers, "Content-Encoding": "gzip", "Content-Length": str(len(sent))}
    answer = await exchange(h, headers, sent)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert f"body exceeds {limit} bytes decoded".encode() in answer
    assert h.rejected("body_too_large") == 1
    assert await queued(redis) == []


async def test_a_chunked_compressed_body_is_bounded_the_same_way(
    serve_receiver: ServeReceiver, redis: Redis
) -> None:
    h = await harness(serve_receiver, redis, accept=True)
    sent, headers = gzipped(envelope("gz-chunked"))
    del headers["Content-Length"]
    chunked = f"{len(sent):x}\r\n".encode() + sent + b"\r\n0\r\n\r\n"
    answer = await exchange(h, {**headers, "Transfer-Encoding": "chunked"}, chunked)
    assert answer.startswith(b"HTTP/1.1 202"), answer


async def test_a_gzip_body_of_several_members_is_taken(
    serve_receiver: ServeReceiver, redis: Redis
) -> None:
    h = await harness(serve_receiver, redis, accept=True)
    raw, headers = signed(envelope("gz-members"))
    sent = gzip.compress(raw[:40]) + gzip.compress(raw[40:])
    headers = {**headers, "Content-Encoding": "gzip", "Content-Length": str(len(sent))}
    answer = await exchange(h, headers, sent)
    assert answer.startswith(b"HTTP/1.1 202"), answer


@pytest.mark.parametrize("wrapped", [True, False], ids=["zlib", "raw"])
async def test_deflate_is_taken_zlib_wrapped_or_raw(
    serve_receiver: ServeReceiver, redis: Redis, wrapped: bool
) -> None:
    h = await harness(serve_receiver, redis, accept=True)
    raw, headers = signed(envelope(f"deflate-{wrapped}"))
    if wrapped:
        sent = zlib.compress(raw)
    else:
        c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        sent = c.compress(raw) + c.flush()
    headers = {**headers, "Content-Encoding": "deflate", "Content-Length": str(len(sent))}
    answer = await exchange(h, headers, sent)
    assert answer.startswith(b"HTTP/1.1 202"), answer


@pytest.mark.parametrize("how", ["truncated", "trailing", "zstd"])
async def test_a_body_that_is_not_what_its_coding_says_is_refused(
    serve_receiver: ServeReceiver, redis: Redis, how: str
) -> None:
    h = await harness(serve_receiver, redis, accept=True)
    sent, headers = gzipped(envelope(f"gz-{how}"))
    if how == "truncated":
        sent = sent[:-8]
    elif how == "trailing":
        sent += b"more"
    else:
        headers["Content-Encoding"] = "zstd"
    headers["Content-Length"] = str(len(sent))
    answer = await exchange(h, headers, sent)
    want = b"HTTP/1.1 415" if how == "zstd" else b"HTTP/1.1 400"
    assert answer.startswith(want), answer
    assert await queued(redis) == []
