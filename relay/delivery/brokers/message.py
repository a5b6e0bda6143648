"""What a broker sink publishes, and how a publisher says how it went.

A message carries the stored envelope, byte for byte, and the same metadata as an HTTP
delivery under the same names (``webhook-id`` = Chert's event id, ``webhook-timestamp``,
``webhook-signature`` when the sink has a secret, ``X-Chert-Event-Type``,
``X-Chert-Tenant``, ``X-Relay-Attempt``, ``X-Relay-Source``, the sink's own headers),
plus ``X-Chert-Chat-Id`` when the event belongs to a chat. While tracing is on
(:mod:`relay.telemetry`), the W3C ``traceparent`` (and ``tracestate``) of the attempt's
span go along as well — a NATS or AMQP header, a Redis stream field — so a consumer
continues the event's trace.

For ``ordering = "chat"`` the chat becomes the last token of the NATS subject or AMQP
routing key (:func:`chat_token`): a consumer can then split the work by chat (a
JetStream subject filter or partition mapping, a topic binding or RabbitMQ's
consistent-hash exchange) and keep each chat's order, which the relay keeps up to the
broker by publishing one event of a chat at a time.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from relay.delivery.sink_client import Answer, clip

CHAT_HEADER = "X-Chert-Chat-Id"
NO_CHAT = "_"  # the key token of an event without a chat (no chat id is "_")
_TOKEN_ESCAPES = {c: f"%{ord(c):02X}" for c in "%.*>#"}


@dataclass(frozen=True, slots=True)
class Message:
    """One event as a broker sink publishes it."""

    body: bytes
    headers: dict[str, str]  # the metadata, with the names of the HTTP headers
    event_id: str
    event_type: str
    chat: str | None


def chat_of(body: bytes) -> str | None:
    """``data.chat.id`` of a stored envelope, if it is a string (as ingest reads it)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    data = doc.get("data") if isinstance(doc, dict) else None
    chat = data.get("chat") if isinstance(data, dict) else None
    found = chat.get("id") if isinstance(chat, dict) else None
    return found if isinstance(found, str) and found else None


def chat_token(chat: str | None) -> str:
    """``chat`` as one token of a subject or routing key: ``. * > # %`` and white space
    percent-escaped (so that no chat id can add a token or a wildcard), ``_`` for none."""
    if chat is None:
        return NO_CHAT
    out = "".join(_TOKEN_ESCAPES.get(c) or (f"%{ord(c):02X}" if c.isspace() else c) for c in chat)
    return out[:200]


def keyed(prefix: str, chat: str | None) -> str:
    """``prefix.<chat token>`` (just the token when ``prefix`` is empty)."""
    token = chat_token(chat)
    return f"{prefix}.{token}" if prefix else token


class Clock:
    """The time one publish took, from the start of the attempt."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def ok(self, said: str) -> Answer:
        """The broker has the event (acknowledged, confirmed or stored)."""
        return Answer(None, "ack", "", None, self._took(), clip(said), verdict="ok")

    def retry(self, kind: str, error: str) -> Answer:
        """Not accepted, worth another attempt (``kind``: connection, timeout, nack)."""
        return Answer(None, kind, clip(error), None, self._took(), verdict="retry")

    def reject(self, error: str) -> Answer:
        """Refused in a way no retry can fix: the delivery becomes a dead letter."""
        return Answer(None, "refused", clip(error), None, self._took(), verdict="reject")

    def timeout(self, limit: float) -> Answer:
        took = self._took()
        return self.retry(
            "timeout", f"no answer within the {limit:g}s timeout (gave up after {took:.2f}s)"
        )

    def _took(self) -> float:
        return time.perf_counter() - self.started
