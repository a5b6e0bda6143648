"""Signature verification: both header formats, several secrets, tolerance, tampering."""

from __future__ import annotations

import base64
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from standardwebhooks.webhooks import Webhook

from relay.errors import SignatureError
from relay.signing import (
    _SIMPLE_HEADER,
    chert_signature,
    parse_signature_header,
    standard_webhooks_key,
    standard_webhooks_signature,
    verify_webhook,
    webhook_headers,
    webhook_key,
)

NOW = 1_790_000_000
secrets_st = st.lists(
    st.text(alphabet="0123456789abcdef", min_size=32, max_size=64), min_size=1, max_size=4
)


def verify(headers: dict[str, str], body: bytes, secrets: list[str], now: float = NOW) -> None:
    verify_webhook(
        CIMultiDict(headers), body, [s.encode() for s in secrets], tolerance=300, now=now
    )


def reason(headers: dict[str, str], body: bytes, secrets: list[str], now: float = NOW) -> str:
    with pytest.raises(SignatureError) as e:
        verify(headers, body, secrets, now)
    return e.value.reason


@settings(max_examples=200)
@given(
    body=st.binary(max_size=2048), secrets=secrets_st, pick=st.integers(0, 3), legacy=st.booleans()
)
def test_signed_with_any_configured_secret_verifies(
    body: bytes, secrets: list[str], pick: int, legacy: bool
) -> None:
    secret = secrets[pick % len(secrets)]
    verify(webhook_headers(secret, body, timestamp=NOW, legacy=legacy), body, secrets)


@settings(max_examples=200)
@given(
    body=st.binary(min_size=1, max_size=1024),
    secret=secrets_st.map(lambda s: s[0]),
    index=st.integers(min_value=0),
    flip=st.integers(1, 255),
)
def test_changing_any_body_byte_fails(body: bytes, secret: str, index: int, flip: int) -> None:
    headers = webhook_headers(secret, body, timestamp=NOW)
    i = index % len(body)
    tampered = body[:i] + bytes([body[i] ^ flip]) + body[i + 1 :]
    assert reason(headers, tampered, [secret]) == "mismatch"


@settings(max_examples=100)
@given(secret=secrets_st.map(lambda s: s[0]), delta=st.integers(1, 299))
def test_changing_the_timestamp_fails(secret: str, delta: int) -> None:
    body = b'{"event_id":"x"}'
    sig = chert_signature(secret, NOW, body)
    headers = {"X-Webhook-Signature": f"t={NOW + delta},v1={sig}"}
    assert reason(headers, body, [secret]) == "mismatch"


@settings(max_examples=200)
@given(
    secret=secrets_st.map(lambda s: s[0]),
    index=st.integers(0, 63),
    char=st.sampled_from("0123456789abcdef"),
    legacy=st.booleans(),
)
def test_changing_any_signature_character_fails(
    secret: str, index: int, char: str, legacy: bool
) -> None:
    body = b'{"event_id":"x"}'
    sig = chert_signature(secret, NOW, body)
    if sig[index] == char:
        return
    bad = sig[:index] + char + sig[index + 1 :]
    headers = (
        {"x-chert-signature": f"v1,{NOW},{bad}"}
        if legacy
        else {"X-Webhook-Signature": f"t={NOW},v1={bad}"}
    )
    assert reason(headers, body, [secret]) == "mismatch"


def test_several_v1_entries_any_match_passes() -> None:
    body = b"{}"
    good = chert_signature("new-secret-0000000000000000000000", NOW, body)
    old = chert_signature("old-secret-0000000000000000000000", NOW, body)
    headers = {"X-Webhook-Signature": f"t={NOW},v1={old},v1={good}"}
    verify(headers, body, ["new-secret-0000000000000000000000"])


def test_header_names_are_case_insensitive_and_legacy_header_accepted() -> None:
    body = b"{}"
    sig = chert_signature("s" * 32, NOW, body)
    verify({"x-webhook-signature": f"t={NOW},v1={sig}"}, body, ["s" * 32])
    verify({"X-Chert-Signature": f"v1,{NOW},{sig}"}, body, ["s" * 32])


@pytest.mark.parametrize(
    ("now", "expected"), [(NOW + 301, "stale"), (NOW - 301, "future"), (NOW + 300, None)]
)
def test_tolerance_both_directions(now: int, expected: str | None) -> None:
    headers = webhook_headers("k" * 32, b"{}", timestamp=NOW)
    if expected is None:
        verify(headers, b"{}", ["k" * 32], now=now)
    else:
        assert reason(headers, b"{}", ["k" * 32], now=now) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        "t=abc,v1=" + "0" * 64,
        f"t={NOW}",
        f"t={NOW},v1=zz" + "0" * 62,
        f"t={NOW},v1=abcd",
        "v1,notanumber," + "0" * 64,
        f"t={NOW},t={NOW},v1=" + "0" * 64,
        f"t={NOW}," + ",".join(["v1=" + "0" * 64] * 9),
    ],
)
def test_malformed_headers(value: str) -> None:
    headers = {"X-Webhook-Signature": value} if value else {}
    assert reason(headers, b"{}", ["k" * 32]) in ("malformed", "missing")


def test_error_messages_never_contain_the_secret_or_expected_digest() -> None:
    secret = "supersecretvalue0123456789abcdef"
    body = b"{}"
    expected = chert_signature(secret, NOW, body)
    with pytest.raises(SignatureError) as e:
        verify({"X-Webhook-Signature": f"t={NOW},v1={'0' * 64}"}, body, [secret])
    assert secret not in str(e.value)
    assert expected not in str(e.value)


def test_standard_webhooks_signature_verifies_with_the_public_library() -> None:
    secret = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
    body = b'{"event_id":"chert:msg:1"}'
    now = int(time.time())  # the library checks the timestamp against its own clock
    sig = standard_webhooks_signature(standard_webhooks_key(secret), "chert:msg:1", now, body)
    headers = {"webhook-id": "chert:msg:1", "webhook-timestamp": str(now), "webhook-signature": sig}
    assert Webhook(secret).verify(body, headers) == {"event_id": "chert:msg:1"}
    headers["webhook-id"] = "chert:msg:2"
    with pytest.raises(Exception, match="signature"):
        Webhook(secret).verify(body, headers)


@settings(max_examples=200)
@given(
    ts=st.integers(0, 10**11 - 1),
    digest=st.binary(min_size=32, max_size=32),
    upper=st.booleans(),
    zeros=st.integers(0, 1),
)
def test_the_common_header_shape_reads_as_the_general_parser_reads_it(
    ts: int, digest: bytes, upper: bool, zeros: int
) -> None:
    """The receiver reads ``t=<ts>,v1=<hex>`` by a shortcut; it must mean the same."""
    hexed = digest.hex().upper() if upper else digest.hex()
    value = f"t={'0' * zeros}{ts},v1={hexed}"
    simple = _SIMPLE_HEADER.fullmatch(value)
    assert simple is not None
    assert (int(simple[1]), [bytes.fromhex(simple[2])]) == parse_signature_header(value)


@pytest.mark.parametrize(
    "shape",
    [
        "t={ts},v1={sig}",
        "t={ts}, v1={sig}",
        " t={ts},v1={sig} ",
        "v1={sig},t={ts}",
        "t={ts},v1={bad},v1={sig}",
        "t={ts},v0=zz,v1={sig}",
        "v1,{ts},{sig}",
    ],
)
def test_every_header_shape_verifies_with_a_prepared_key(shape: str) -> None:
    secret, body = "k" * 32, b'{"event_id": "e1"}'
    sig = chert_signature(secret, NOW, body)
    value = shape.format(ts=NOW, sig=sig, bad="0" * 64)
    name = "x-chert-signature" if shape.startswith("v1,") else "X-Webhook-Signature"
    keys = [webhook_key(b"other-secret"), webhook_key(secret.encode())]
    verify_webhook(CIMultiDict({name: value}), body, keys, tolerance=300, now=NOW)
    with pytest.raises(SignatureError) as e:
        verify_webhook(CIMultiDict({name: value}), body + b" ", keys, tolerance=300, now=NOW)
    assert e.value.reason == "mismatch"
