"""Signatures: verifying Chert's webhooks, signing calls to Chert, signing for sinks.

Chert signs ``"<unix_seconds>." + raw_body`` with HMAC-SHA256, keyed by the secret's
text as UTF-8 bytes, and sends the hex digest in one of two header formats:

- ``X-Webhook-Signature: t=<ts>,v1=<hex>[,v1=<hex>…]`` (current; any ``v1`` may match)
- ``x-chert-signature: v1,<ts>,<hex>`` (legacy, and the format of API request signing)

Sinks receive Standard Webhooks signatures: ``v1,<base64 HMAC-SHA256 of
"id.timestamp.body">`` keyed by the base64-decoded part of a ``whsec_…`` secret.
Every comparison is constant-time on decoded bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

from relay.errors import SignatureError

CURRENT_HEADER = "X-Webhook-Signature"
LEGACY_HEADER = "x-chert-signature"
MAX_SIGNATURE_HEADER = 4096
_MAX_CANDIDATES = 8
# The one shape Chert sends: one timestamp, one signature. Anything else takes the
# general parser.
_SIMPLE_HEADER = re.compile(r"t=([0-9]{1,12}),v1=([0-9a-fA-F]{64})")


def chert_digest(secret: bytes, timestamp: int | str, body: bytes) -> bytes:
    """Raw HMAC-SHA256 of ``"<timestamp>." + body``."""
    return hmac.digest(secret, b"%s.%s" % (str(timestamp).encode(), body), hashlib.sha256)


class WebhookKey(Protocol):
    """An HMAC-SHA256 state with the key schedule done: copied for each message."""

    def copy(self) -> WebhookKey: ...
    def update(self, msg: bytes, /) -> None: ...
    def digest(self) -> bytes: ...


def webhook_key(secret: bytes) -> WebhookKey:
    """A secret prepared once for verifying many webhooks (HMAC key schedule done).

    Where the standard library's ``hmac.HMAC`` wraps OpenSSL's HMAC object, that object
    is used directly: the same state and the same three calls, without a Python
    wrapper around each of them on the receiver's path.
    """
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    inner = getattr(mac, "_hmac", None)
    return inner if inner is not None else mac


def chert_signature(secret: str, timestamp: int, body: bytes) -> str:
    """Lowercase hex signature as Chert computes it."""
    return chert_digest(secret.encode(), timestamp, body).hex()


def webhook_headers(
    secret: str, body: bytes, *, timestamp: int | None = None, legacy: bool = False
) -> dict[str, str]:
    """The signature header Chert would send with ``body`` (for ``sign`` and the simulator)."""
    ts = int(time.time()) if timestamp is None else timestamp
    sig = chert_signature(secret, ts, body)
    if legacy:
        return {LEGACY_HEADER: f"v1,{ts},{sig}"}
    return {CURRENT_HEADER: f"t={ts},v1={sig}"}


def api_request_headers(
    tenant: str, secret: str, body: bytes = b"", *, timestamp: int | None = None
) -> dict[str, str]:
    """Headers for an HMAC-authenticated call to Chert's API; sign afresh per request."""
    ts = int(time.time()) if timestamp is None else timestamp
    return {
        "x-chert-tenant": tenant,
        LEGACY_HEADER: f"v1,{ts},{chert_signature(secret, ts, body)}",
    }


def parse_signature_header(value: str) -> tuple[int, list[bytes]]:
    """``(timestamp, [digest…])`` from either header format; raises ``SignatureError``."""
    if len(value) > MAX_SIGNATURE_HEADER:
        raise SignatureError("malformed", "signature header is too long")
    parts = [p.strip() for p in value.split(",")]
    ts_text: str | None = None
    hexes: list[str] = []
    if parts and parts[0] == "v1" and len(parts) == 3:  # legacy: v1,<ts>,<hex>
        ts_text, hexes = parts[1], [parts[2]]
    else:  # current: t=<ts>,v1=<hex>[,v1=<hex>…]; other schemes are ignored
        for part in parts:
            key, sep, val = part.partition("=")
            if not sep:
                raise SignatureError("malformed", "signature header has a part without '='")
            if key == "t":
                if ts_text is not None:
                    raise SignatureError("malformed", "signature header has two timestamps")
                ts_text = val
            elif key == "v1":
                hexes.append(val)
    if ts_text is None:
        raise SignatureError("malformed", "signature header has no timestamp")
    if not hexes:
        raise SignatureError("malformed", "signature header has no v1 signature")
    if len(hexes) > _MAX_CANDIDATES:
        raise SignatureError("malformed", "signature header has too many signatures")
    if not ts_text.isascii() or not ts_text.isdigit() or len(ts_text) > 12:
        raise SignatureError("malformed", "signature timestamp is not unix seconds")
    digests: list[bytes] = []
    for h in hexes:
        if len(h) != 64:
            raise SignatureError("malformed", "signature is not 64 hex characters")
        try:
            digests.append(bytes.fromhex(h))
        except ValueError:
            raise SignatureError("malformed", "signature is not hex") from None
    return int(ts_text), digests


def verify_webhook(
    headers: Mapping[str, str],
    body: bytes,
    secrets: Sequence[bytes | WebhookKey],
    *,
    tolerance: float,
    now: float | None = None,
) -> float:
    """Verify a Chert webhook: on success, how old its signed timestamp is (seconds, by
    this machine's clock; negative: in the future); raise ``SignatureError`` otherwise.

    ``headers`` must look names up case-insensitively (aiohttp's ``CIMultiDict`` does).
    ``secrets`` are raw secrets or, faster, keys from :func:`webhook_key`.
    """
    value = headers.get(CURRENT_HEADER) or headers.get(LEGACY_HEADER)
    if not value:
        raise SignatureError("missing", "no X-Webhook-Signature or x-chert-signature header")
    simple = _SIMPLE_HEADER.fullmatch(value)
    if simple is not None:  # what Chert sends: parsed as parse_signature_header would
        timestamp, candidates = int(simple[1]), [bytes.fromhex(simple[2])]
    else:
        timestamp, candidates = parse_signature_header(value)
    skew = (time.time() if now is None else now) - timestamp
    if skew > tolerance:
        raise SignatureError("stale", f"signature timestamp is {int(skew)} s old", skew)
    if -skew > tolerance:
        raise SignatureError("future", f"signature timestamp is {int(-skew)} s in the future", skew)
    if not secrets:
        raise SignatureError("mismatch", "no webhook secret is configured for this tenant")
    ok = False
    prefix = b"%d." % timestamp
    for secret in secrets:
        mac = (webhook_key(secret) if isinstance(secret, bytes) else secret).copy()
        mac.update(prefix)
        mac.update(body)
        expected = mac.digest()
        for candidate in candidates:
            # No early exit: the work done does not depend on which secret matched.
            ok |= hmac.compare_digest(expected, candidate)
    if not ok:
        raise SignatureError("mismatch", "signature does not match any configured secret")
    return skew


# --- Standard Webhooks, for deliveries to sinks ----------------------------------------


def standard_webhooks_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret."""
    if not secret.startswith("whsec_"):
        raise ValueError("a Standard Webhooks secret starts with 'whsec_'")
    try:
        return base64.b64decode(secret[len("whsec_") :], validate=True)
    except binascii.Error:
        raise ValueError("a Standard Webhooks secret is 'whsec_' + base64") from None


def standard_webhooks_signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64>`` over ``"<id>.<timestamp>.<body>"``."""
    signed = b"%s.%d.%s" % (msg_id.encode(), timestamp, body)
    digest = hmac.digest(key, signed, hashlib.sha256)
    return "v1," + base64.b64encode(digest).decode()
