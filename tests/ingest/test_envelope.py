"""Body normalization: both shapes become the envelope; unknown types pass through."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from relay.ingest.envelope import BadEventError, from_body, from_object
from relay.ingest.ingestor import Ingestor
from tests.support.common import TENANT, envelope, log_row, make_config, stored_event

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
event_ids = st.text(min_size=1, max_size=80).filter(str.isprintable)


@given(extra=st.dictionaries(st.text(max_size=10), json_values, max_size=5), event_id=event_ids)
def test_any_object_with_an_event_id_is_kept_byte_for_byte(
    extra: dict[str, object], event_id: str
) -> None:
    body = {**extra, "event_id": event_id}
    body.pop("payload", None)
    body.pop("partner_id", None)  # must be a string
    raw = json.dumps(body).encode()
    event = from_body(raw)
    assert event.event_id == event_id
    assert event.body == raw


@given(event_id=event_ids)
def test_log_rows_become_their_payload(event_id: str) -> None:
    row = log_row(event_id)
    event = from_object(row)
    assert event.event_id == event_id
    assert json.loads(event.body) == row["payload"]
    assert event.log_id == row["id"]
    assert event.created_at == row["created_at"]


def test_fields_are_read_from_the_envelope() -> None:
    event = from_object(envelope("chert:msg:1"))
    assert event.type == "message.received"
    assert event.partner_id == "acme-7a3f"
    assert event.timestamp == pytest.approx(1779586534.0)


def test_unknown_types_pass_through_and_the_type_header_fills_a_gap() -> None:
    event = from_body(b'{"event_id": "e1", "event": "brand.new", "x": 1}', header_type="other")
    assert (event.event_id, event.type) == ("e1", "brand.new")  # the body's type decides
    event = from_body(b'{"event_id": "e2", "x": 1}', header_type="lead_reply")
    assert event.type == "lead_reply"
    assert from_body(b'{"event_id": "e"}').type == "unknown"


def test_a_body_without_an_event_id_is_known_by_what_its_signature_covers() -> None:
    body = b'{"event": "lead_reply", "text": "hi"}'
    event = from_body(body)
    assert event.event_id == "sha256:" + hashlib.sha256(body).hexdigest()
    assert from_body(body).event_id == event.event_id  # the same bytes: the same event
    assert from_body(body + b" ").event_id != event.event_id


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{", "malformed_json"),
        (b"[]", "malformed_json"),
        (b"\xff", "malformed_json"),
        (b'{"event_id": 5}', "malformed_event_id"),
        (b'{"event_id": "a\\nb"}', "malformed_event_id"),
        (json.dumps({"event_id": "x" * 600}).encode(), "malformed_event_id"),
    ],
)
def test_bodies_that_can_never_be_events(raw: bytes, reason: str) -> None:
    with pytest.raises(BadEventError) as e:
        from_body(raw)
    assert e.value.reason == reason


async def test_a_row_with_lone_surrogates_is_still_ingested(redis: Redis) -> None:
    # json.loads (the events API's rows) accepts "\ud800", which UTF-8 cannot encode: such
    # a row must not stall the poller, which would fetch it again forever.
    row = json.loads(
        '{"id": "evt_1", "type": "message.received", "event_id": "s1", "delivery": {},'
        ' "created_at": "2026-11-27T10:00:00Z", "payload": {"event": "message.\\ud800",'
        ' "event_id": "s1", "data": {"text": "x\\udc00y é"}}}'
    )
    event = from_object(row)
    assert event.type == "message.\\ud800"
    assert json.loads(event.body) == row["payload"]  # the same JSON, escaped
    assert await Ingestor(redis, make_config()).ingest(TENANT, event, "poll")
    stored = await stored_event(redis, "s1")
    assert stored is not None
    assert stored.type == "message.\\ud800"


NOT_STRICT_JSON = [
    b'{"event_id": "a", "n": NaN}',
    b'{"event_id": "a", "n": [Infinity]}',
    b'{"event_id": "a", "n": -Infinity}',
    b'\xef\xbb\xbf{"event_id": "a"}',  # a UTF-8 byte order mark
    '{"event_id": "a"}'.encode("utf-16"),
    '{"event_id": "a"}'.encode("utf-16-le"),
    '{"event_id": "a"}'.encode("utf-32"),
    b'{"event_id": "a", "x": "\xed\xa0\x80"}',  # a surrogate encoded as bytes
    b'{"event_id": "a", "x": "\\ud800", "n": NaN}',  # the lone-surrogate path too
]


@pytest.mark.parametrize("body", NOT_STRICT_JSON)
def test_a_body_that_is_not_strict_json_is_malformed(body: bytes) -> None:
    with pytest.raises(BadEventError) as e:
        from_body(body)
    assert e.value.reason == "malformed_json"


def test_nan_and_infinity_inside_strings_are_only_text() -> None:
    assert from_body(b'{"event_id": "NaN", "text": "Infinity"}').event_id == "NaN"


@pytest.mark.parametrize(
    "body",
    [
        b'{"event_id": "a", "partner_id": "other-1", "partner_id": "acme-7a3f"}',
        b'{"event_id": "a", "event_id": "b"}',
        b'{"event_id": "a", "partner\\u005fid": "x", "partner_id": "acme-7a3f"}',
        b'{"event": "x", "event": "y", "event_id": "a"}',
        b'{"id": "evt_1", "delivery": {}, "payload": {"event_id": "a", "event_id": "b"}}',
    ],
)
def test_a_key_the_relay_reads_given_twice_is_refused(body: bytes) -> None:
    with pytest.raises(BadEventError) as e:
        from_body(body)
    assert e.value.reason == "duplicate_key"


def test_keys_the_relay_does_not_read_may_repeat_deeper_down() -> None:
    body = b'{"event_id": "a", "data": {"event_id": 1, "event_id": 2}}'
    assert from_body(body).body == body


@pytest.mark.parametrize("partner", ['["acme-7a3f"]', '{"id": "acme-7a3f"}', "7", "true"])
def test_a_partner_id_that_is_not_a_string_is_refused(partner: str) -> None:
    with pytest.raises(BadEventError) as e:
        from_body(b'{"event_id": "a", "partner_id": %s}' % partner.encode())
    assert e.value.reason == "malformed_partner_id"


@pytest.mark.parametrize("event_id", ["0", "false", '""', "[]", "{}"])
def test_an_event_id_that_is_not_a_non_empty_string_is_not_replaced_by_the_header(
    event_id: str,
) -> None:
    with pytest.raises(BadEventError) as e:
        from_body(b'{"event_id": %s}' % event_id.encode())
    assert e.value.reason == "malformed_event_id"


def test_nesting_past_pydantics_depth_limit_is_still_json() -> None:
    body = b'{"event_id": "a", "x": ' + b"[" * 300 + b"]" * 300 + b"}"
    assert from_body(body).body == body
