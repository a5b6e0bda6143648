"""The stored event's format: what ingest writes is what delivery and dead letters read."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from relay.delivery.sink_client import header_value
from relay.ingest import envelope
from relay.ingest.ingestor import SOURCES, Ingestor
from relay.store import scripts, stored_event
from tests.support.common import TENANT, make_config
from tests.support.common import envelope as make_envelope
from tests.support.common import stored_event as read_stored

AT = scripts.library("stored_event") + "return event_at(redis.call('GET', KEYS[1]))"
RELEASE = (
    scripts.library("stored_event") + "event_release(KEYS[1]) return redis.call('GET', KEYS[1])"
)

types = st.text(min_size=1, max_size=40)  # spaces, newlines, any Unicode
timestamps = st.none() | st.floats(min_value=0, max_value=4e9, allow_nan=False)


@given(
    users=st.integers(0, stored_event.MAX_USERS),
    at_ms=st.integers(0, 10**13 - 1),
    source=st.sampled_from(sorted(SOURCES)),
    ts=timestamps,
    etype=types,
    body=st.binary(max_size=300),
)
def test_pack_and_parse_agree(
    users: int, at_ms: int, source: str, ts: float | None, etype: str, body: bytes
) -> None:
    parsed = stored_event.parse(stored_event.pack(users, at_ms, source, ts, etype, body))
    assert parsed == stored_event.StoredEvent(users, at_ms, source, ts, etype, body)


def test_parse_refuses_what_is_not_a_stored_event() -> None:
    for raw in (b"", b"{}", b"0001 2 webhook -\nbody"):
        try:
            stored_event.parse(raw)
        except ValueError:
            continue
        raise AssertionError(f"parsed {raw!r}")


async def test_scripts_read_the_ingest_time_python_packs(redis: Redis) -> None:
    for at_ms in (0, 5, 1764236400123, 10**13 - 1):
        etype = "odd type\nwith a newline, spaces and ünïcode"
        await redis.set("ev", stored_event.pack(2, at_ms, "poll", None, etype, b"{}"))
        assert await redis.eval(AT, 1, "ev") == at_ms


async def test_the_last_user_removes_it_and_the_expiry_stays(redis: Redis) -> None:
    await redis.set("ev", stored_event.pack(2, 1, "sse", None, "t", b"body"), px=60_000)
    left = await redis.eval(RELEASE, 1, "ev")
    assert stored_event.parse(left).users == 1
    assert stored_event.parse(left).body == b"body"
    assert 0 < await redis.pttl("ev") <= 60_000
    assert await redis.eval(RELEASE, 1, "ev") is None
    assert await redis.exists("ev") == 0
    assert await redis.eval(RELEASE, 1, "ev") is None  # no-op


async def test_ingest_stores_any_event_type_readably(redis: Redis) -> None:
    ing = Ingestor(redis, make_config())
    body = make_envelope("weird", "message received\nreally", timestamp="2026-11-27T10:00:00Z")
    event = envelope.from_object(body)
    assert await ing.ingest(TENANT, event, "sse")
    stored = await read_stored(redis, "weird")
    assert stored is not None
    assert stored.type == "message received\nreally"
    assert stored.body == event.body
    assert stored.source == "sse"
    assert stored.timestamp == event.timestamp
    assert stored.users == 1  # only the sink that takes every type


def test_an_odd_event_type_cannot_break_the_delivery_headers() -> None:
    assert header_value("message.received") == "message.received"
    assert header_value("a\r\nX-Injected: 1") == "a\\r\\nX-Injected: 1"
    long = header_value("t" * 60_000)  # the body has it whole; a header that long is refused
    assert (len(long), long[-3:]) == (256, "...")
    assert header_value("ünïcode ok") == "ünïcode ok"
