"""Normalizing what Chert sends into the relay's canonical event: the envelope.

Two body shapes reach the relay (chert-contract.md §3): the envelope itself, and
the events-API "log row" that wraps it in ``payload``. Unknown event types pass
through untouched; only the fields the relay needs are read.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, NamedTuple

from pydantic import TypeAdapter, ValidationError
from typing_extensions import TypedDict

from relay.errors import RelayError

MAX_EVENT_ID_LENGTH = 512
MAX_CHAT_ID_LENGTH = 256


class BadEventError(RelayError):
    """A body that can never become an event. ``reason`` is a stable metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(detail)


class Event(NamedTuple):
    """An event as the relay handles it (a named tuple: built once per webhook, and a
    tuple is the cheapest immutable record to build)."""

    event_id: str
    type: str
    body: bytes  # the envelope as JSON, exactly as delivered to sinks
    partner_id: str | None = None
    timestamp: float | None = None  # Chert's event time, unix seconds
    log_id: str | None = None  # the events-API row id (evt_…), when known
    created_at: str | None = None  # the events-API row's created_at, when known
    chat_id: str | None = None  # data.chat.id: the conversation, for ordered sinks
    # The envelope as parsed, for the sinks' filters: whole, or at least the fields they
    # read; None when only the fields the relay reads were built (no filter asked).
    envelope: dict[str, Any] | None = None


def parse_timestamp(value: object) -> float | None:
    """Unix seconds from an ISO-8601 string (``Z`` or an offset); ``None`` if unusable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:  # no offset: UTC, as Chert writes it, not this host's zone
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (JSON parsed by ``json.loads`` may hold lone
    surrogates, which do not)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _is_log_row(obj: dict[str, Any]) -> bool:
    payload = obj.get("payload")
    if not isinstance(payload, dict):
        return False
    if "delivery" in obj or "created_at" in obj:
        return True
    # A row trimmed of both: still a row when the envelope is plainly inside it.
    return "event_id" in payload and "event" not in obj and "event_type" not in obj


def from_object(
    obj: object,
    raw: bytes | None = None,
    *,
    header_type: str | None = None,
    whole: bool = True,
) -> Event:
    """An :class:`Event` from a decoded body of either shape.

    ``raw`` is the original bytes of ``obj``; when the body is already an envelope it
    is kept byte for byte instead of being re-serialized. A body without an
    ``event_id`` gets one from what its signature covers — a digest of those bytes
    (:func:`body_id`) — never from the ``X-Webhook-Event-Id`` header, which the
    signature does not cover: a captured request sent again with fresh header ids is
    the same event, a duplicate. ``header_type`` (``X-Webhook-Event``) names the type
    only of a body that names none. ``whole``: ``obj`` holds every field the sinks'
    filters read (it is the whole body, or a :func:`head_reader`'s parse), and the
    event keeps its envelope for them.
    """
    signed = raw
    if not isinstance(obj, dict):
        raise BadEventError("malformed_json", "the body is not a JSON object")
    log_id: str | None = None
    created_at: str | None = None
    row_type: object = None
    row_event_id: object = None
    envelope = obj
    if _is_log_row(obj):
        envelope = obj["payload"]
        raw = None
        log_id = obj.get("id") if isinstance(obj.get("id"), str) else None
        created_at = obj.get("created_at") if isinstance(obj.get("created_at"), str) else None
        row_type, row_event_id = obj.get("type"), obj.get("event_id")

    event_id = envelope.get("event_id")
    if event_id is None:
        event_id = row_event_id or body_id(signed, obj)
    elif not isinstance(event_id, str) or not event_id:
        # Not a digest's then: a sink reading the body would see another id.
        raise BadEventError("malformed_event_id", "event_id is not a non-empty string")
    if not isinstance(event_id, str) or len(event_id) > MAX_EVENT_ID_LENGTH:
        raise BadEventError("malformed_event_id", "event_id is not a string of at most 512 chars")
    if not event_id.isprintable():
        raise BadEventError("malformed_event_id", "event_id contains control characters")

    etype = envelope.get("event") or envelope.get("event_type") or row_type or header_type
    if not isinstance(etype, str) or not etype:
        etype = "unknown"
    elif not etype.isascii() and not _utf8(etype):
        # a lone surrogate ("\ud800" in the JSON): kept visible
        etype = etype.encode("utf-8", "backslashreplace").decode()
    partner = envelope.get("partner_id")
    if partner is not None and not isinstance(partner, str):
        raise BadEventError("malformed_partner_id", "partner_id is not a string")
    if raw is None:
        try:
            try:
                raw = json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode()
            except UnicodeEncodeError:  # a lone surrogate: the same JSON, escaped
                raw = json.dumps(envelope, separators=(",", ":")).encode()
        except RecursionError:
            raise BadEventError("malformed_json", "the event is nested too deeply") from None
    return Event(  # in field order: positional is the cheap way to build a named tuple
        event_id,
        etype,
        raw,
        partner,
        parse_timestamp(envelope.get("timestamp")),
        log_id,
        created_at,
        chat_id(envelope),
        envelope if whole else None,
    )


def chat_id(envelope: dict[str, Any]) -> str | None:
    """``data.chat.id``, if it is a usable string (else the event is not ordered)."""
    data = envelope.get("data")
    chat = data.get("chat") if isinstance(data, dict) else None
    found = chat.get("id") if isinstance(chat, dict) else None
    if isinstance(found, str) and 0 < len(found) <= MAX_CHAT_ID_LENGTH and found.isprintable():
        return found
    return None


class _Chat(TypedDict, total=False):
    id: Any


class _Data(TypedDict, total=False):
    chat: _Chat


class _Head(TypedDict, total=False):
    """The few top-level fields the relay reads. Parsing into this checks the whole
    body is valid JSON but builds Python objects only for these fields — the bulk of
    an envelope (``data``) is never materialized on the webhook path."""

    event_id: Any
    event: Any
    event_type: Any
    partner_id: Any
    timestamp: Any
    payload: Any
    delivery: Any
    created_at: Any
    id: Any
    type: Any
    data: _Data  # only data.chat.id is read (an ordered sink's key)


_HEAD = TypeAdapter(_Head)
HeadReader = TypeAdapter[Any]

# _Head's fields as a tree: None is a field read whole, a dict one read in part.
_HEAD_TREE: dict[str, Any] = {
    **{k: None for k in _Head.__annotations__ if k != "data"},
    "data": {"chat": {"id": None}},
}
_names = itertools.count()


def _typed(tree: dict[str, Any]) -> Any:
    fields = {k: Any if sub is None else _typed(sub) for k, sub in tree.items()}
    return TypedDict(f"_Read{next(_names)}", fields, total=False)  # type: ignore[operator]


@functools.lru_cache(maxsize=256)
def head_reader(paths: frozenset[tuple[str, ...]]) -> HeadReader:
    """A parse of a body that builds what the relay reads and the fields at ``paths``
    (a sink filter's, :attr:`relay.config.filters.EventFilter.paths`) — and nothing else
    of the body, as ``_HEAD`` does: the rest of a large envelope is checked as JSON and
    never becomes Python objects. A body whose objects do not have the shapes the paths
    need (a string where a path goes on) fails it, and is parsed whole instead."""
    tree = json.loads(json.dumps(_HEAD_TREE))  # a deep copy
    for path in sorted(paths, key=len):
        node = tree
        for name in path[:-1]:
            child = node.setdefault(name, {})
            if child is None:  # read whole already
                break
            node = child
        else:
            node[path[-1]] = None
    return TypeAdapter(_typed(tree))


def reader_for(paths: Iterable[tuple[str, ...]]) -> HeadReader | None:
    """:func:`head_reader` for the union of some filters' paths; None for none."""
    found = frozenset(paths)
    return head_reader(found) if found else None


# Fields the relay reads from a body it forwards as is: were one given twice, the relay
# (which keeps the last) and a sink (which may keep the first) would disagree on it.
_READ_KEYS = ("event_id", "partner_id", "event", "event_type", "timestamp")
_QUOTED_KEYS = tuple(f'"{k}"'.encode() for k in _READ_KEYS)
_BOM = b"\xef\xbb\xbf"


def _needs_strict_parse(body: bytes) -> bool:
    """Whether the fast parse could miss something: ``NaN``/``Infinity`` (which it
    takes), a key read twice, or any ``\\u`` escape (which may spell such a key)."""
    return (
        b"NaN" in body
        or b"Infinity" in body
        or b"\\u" in body
        or any(body.count(k) > 1 for k in _QUOTED_KEYS)
    )


class _Object(dict[str, Any]):
    """A JSON object that knows which of the keys the relay reads it had twice."""

    twice: tuple[str, ...] = ()


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        keys = [k for k, _ in pairs]
        obj.twice = tuple(k for k in _READ_KEYS if keys.count(k) > 1)
    return obj


def _constant(name: str) -> Any:
    raise BadEventError("malformed_json", f"the body is not strict JSON: {name}")


def _strict_loads(body: bytes) -> object:
    """The body parsed as RFC 8259 asks: UTF-8 (``json.loads`` would guess UTF-16 or
    UTF-32, and pass surrogates encoded as bytes), no ``NaN``/``Infinity``, and none of
    the keys the relay reads given twice, at the top or in a log row's ``payload``."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise BadEventError("malformed_json", "the body is not UTF-8") from None
    try:
        head = json.loads(text, parse_constant=_constant, object_pairs_hook=_object)
    except (ValueError, RecursionError) as e:  # a BadEventError is not a ValueError
        raise BadEventError("malformed_json", f"the body is not valid JSON: {e}"[:200]) from None
    for obj in (head, head.get("payload") if isinstance(head, dict) else None):
        if isinstance(obj, _Object) and obj.twice:
            detail = f"the body gives {', '.join(obj.twice)} more than once"
            raise BadEventError("duplicate_key", detail)
    return head


def body_id(raw: bytes | None, obj: object) -> str:
    """The id of an event whose body has none: ``sha256:`` and the digest of the body's
    bytes as signed (or of its canonical JSON, for one decoded elsewhere)."""
    if raw is None:
        try:
            raw = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
        except RecursionError:
            raise BadEventError("malformed_json", "the event is nested too deeply") from None
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def from_body(
    body: bytes, *, header_type: str | None = None, reader: HeadReader | None = None
) -> Event:
    """An :class:`Event` from a raw webhook body: strict JSON, UTF-8 without a BOM.

    Only the fields the relay reads become Python objects — and, with ``reader`` (a
    :func:`head_reader`: a tenant whose sinks filter by fields), the fields its filters
    read, which the event keeps as its envelope for them.
    """
    if body.startswith(_BOM):
        raise BadEventError("malformed_json", "the body starts with a byte order mark")
    if _needs_strict_parse(body):
        return from_object(_strict_loads(body), body, header_type=header_type)
    try:
        head = (reader or _HEAD).validate_json(body)
    except ValidationError as e:
        err = e.errors(include_url=False, include_input=False)[0]
        if err["type"] in ("dict_type", "model_type") and not err["loc"]:
            raise BadEventError("malformed_json", "the body is not a JSON object") from None
        # pydantic refuses some of what JSON allows (nesting past its depth limit,
        # say): the standard library's parser has the last word.
        return from_object(_strict_loads(body), body, header_type=header_type)
    return from_object(head, body, header_type=header_type, whole=reader is not None)
