"""What a hostile case is, what it expects, and the oracle for correctly signed bodies.

A :class:`Case` is bytes to send on one connection and what must come back: for each
answer the server owes, the statuses that are right. ``legit`` lists the requests in
it that carry a correct signature over their exact body — the only events the relay
may store. The run checks every case against both (see :mod:`bench.hostile.run`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from bench.hostile.wire import signed_request

CLOSED = 0  # in an expected set: no answer, the connection closed, is right too
OK = frozenset({202})
ANY = frozenset(range(0, 600))


@dataclass(frozen=True)
class Legit:
    """A request signed correctly over its body: the relay may store this event."""

    tenant: str
    event_id: str
    stored: bytes  # the body the relay must store if it takes the event


@dataclass
class Case:
    family: str  # a row of the published table
    kind: str  # the generator: the key for differences and failures
    parts: list[bytes]
    expect: list[frozenset[int]]  # per answer owed: the right statuses
    legit: list[Legit] = field(default_factory=list)
    target: str = "receiver"  # or "admin"
    compare: bool = False  # also send it to aiohttp's own server
    pause: float = 0.0
    timeout: float = 5.0
    # admin: no valid token, so no API data may come back whatever the status
    unauthorized: bool = False


@dataclass
class World:
    """What the cases are built against: the relay's tenants, secrets and limits."""

    tenant: str
    secret: str
    other_tenant: str
    other_secret: str
    admin_token: str
    max_body: int
    tolerance: int
    rng: random.Random
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    _ids: Iterator[int] = field(default_factory=itertools.count)

    @property
    def path(self) -> str:
        return f"/webhooks/chert/{self.tenant}"

    def event_id(self) -> str:
        return f"h-{self.run_id}-{next(self._ids)}"

    def envelope(self, event_id: str | None = None, **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "event": "message.received",
            "event_id": event_id or self.event_id(),
            "timestamp": "2026-05-24T01:35:34.000Z",
            "api_version": "v1",
            "event_type": "message.received",
            "partner_id": self.tenant,
            "data": {
                "chat": {"id": "17f6e9ed-5b6a", "is_group": False},
                "message": {"direction": "inbound", "parts": [{"type": "text", "value": "hi"}]},
            },
        }
        body.update(extra)
        return body

    def body(self, event_id: str | None = None, **extra: Any) -> tuple[str, bytes]:
        env = self.envelope(event_id, **extra)
        return env["event_id"], json.dumps(env).encode()

    def signed(self, body: bytes, **kw: Any) -> bytes:
        return signed_request(self.secret, body, path=self.path, **kw)

    def valid(self) -> tuple[bytes, Legit]:
        """A valid webhook: the request and what it must store."""
        event_id, body = self.body()
        return self.signed(body), Legit(self.tenant, event_id, body)


def case(
    family: str,
    kind: str,
    raw: bytes | list[bytes],
    *expect: frozenset[int] | set[int] | int,
    legit: list[Legit] | None = None,
    **kw: Any,
) -> Case:
    sets = [frozenset({e}) if isinstance(e, int) else frozenset(e) for e in expect]
    parts = raw if isinstance(raw, list) else [raw]
    return Case(family, kind, parts, sets, legit or [], **kw)


Generator = Callable[[World], Case]


# --- the oracle for a correctly signed body ------------------------------------------------

READ_KEYS = ("event_id", "partner_id", "event", "event_type", "timestamp")


class _Twice(dict[str, Any]):
    twice = False


def _pairs(pairs: list[tuple[str, Any]]) -> _Twice:
    obj = _Twice(pairs)
    keys = [k for k, _ in pairs]
    obj.twice = any(keys.count(k) > 1 for k in READ_KEYS)
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(name)


def _split(obj: dict[str, Any]) -> tuple[dict[str, Any], Any, bool]:
    """(the envelope, the row's event_id, whether ``obj`` is a log row)."""
    payload = obj.get("payload")
    if isinstance(payload, dict) and (
        "delivery" in obj
        or "created_at" in obj
        or ("event_id" in payload and "event" not in obj and "event_type" not in obj)
    ):
        return payload, obj.get("event_id"), True
    return obj, None, False


def body_verdict(body: bytes, tenant: str) -> int:
    """The answer the receiver owes a body signed correctly, from the contract and the
    README (RFC 8259 JSON in UTF-8 without a BOM, an object, a printable event id of
    at most 512 characters, a string ``partner_id`` naming the tenant, no field the
    relay reads given twice) — written apart from the relay's own code."""
    if body.startswith(b"\xef\xbb\xbf"):
        return 400
    try:
        obj = json.loads(
            body.decode("utf-8"), parse_constant=_no_constant, object_pairs_hook=_pairs
        )
    except (ValueError, RecursionError):
        return 400
    if not isinstance(obj, _Twice) or obj.twice:
        return 400
    payload = obj.get("payload")
    if isinstance(payload, _Twice) and payload.twice:
        return 400
    env, row_id, _ = _split(obj)
    event_id = env.get("event_id")
    if event_id is None:  # never the unsigned header's: a digest of the signed bytes
        event_id = row_id or "sha256:" + hashlib.sha256(body).hexdigest()
    elif not isinstance(event_id, str) or not event_id:
        return 400
    if not event_id or not isinstance(event_id, str) or len(event_id) > 512:
        return 400
    if not event_id.isprintable():
        return 400
    partner = env.get("partner_id")
    if partner is not None and not isinstance(partner, str):
        return 400
    if partner is not None and partner != tenant:
        return 403
    return 202


def body_case(
    world: World, family: str, kind: str, body: bytes, *, header_event_id: str | None = None
) -> Case:
    """A correctly signed ``body`` with the status the oracle gives it."""
    extra = f"X-Webhook-Event-Id: {header_event_id}\r\n" if header_event_id else ""
    raw = world.signed(body, extra=extra)
    if len(body) > world.max_body:
        return case(family, kind, raw, 413)
    status = body_verdict(body, world.tenant)  # an X-Webhook-Event-Id changes nothing
    legit: list[Legit] = []
    if status == 202:
        env, row_id, row = _split(json.loads(body))
        event_id = str(
            env.get("event_id") or row_id or "sha256:" + hashlib.sha256(body).hexdigest()
        )
        stored = body
        if row:
            try:
                stored = json.dumps(env, separators=(",", ":"), ensure_ascii=False).encode()
            except UnicodeEncodeError:
                stored = json.dumps(env, separators=(",", ":")).encode()
        legit = [Legit(world.tenant, event_id, stored)]
    return case(family, kind, raw, status, legit=legit)
