"""The stored event: one Redis string per ``(tenant, event_id)``, shared by its deliveries.

Ingest writes it once (``ingest.lua``), each delivery reads it (``take.lua``), and a
dead letter keeps it until replayed or purged (:mod:`relay.store.deadletters`); the
scripts that read its ingest time or release it use ``lua/lib/stored_event.lua``. It is a
short ASCII header, the event type and then the envelope byte for byte::

    UUUU AAAAAAAAAAAAA SOURCE TS TYPELEN[ TRACE]\\n TYPE BODY

- ``UUUU``: its users, zero-padded to 4 digits: the deliveries (jobs and dead
  letters) that still need it. The last one to finish removes the event.
- ``AAAAAAAAAAAAA``: when it was ingested, Unix ms, zero-padded to 13 digits.
- ``SOURCE``: ``webhook``, ``poll``, ``sse``, ``backfill`` or ``replay``.
- ``TS``: Chert's timestamp (Unix seconds) or ``-`` when the event has none.
- ``TYPELEN``: the length in bytes of ``TYPE``, which follows the newline and is
  followed by the body.
- ``TRACE``, only while tracing is on (:mod:`relay.telemetry`): the W3C trace context
  of the span that took the event in — its ``traceparent``, then ``;`` and its
  ``tracestate`` if it has one — so that its deliveries, in any worker, join its trace.

The users and the ingest time have fixed widths, so scripts update them in place
(``SETRANGE``). One string with its expiry costs Redis one ``SET`` on the ingest path,
and about 500 bytes less memory per event than a hash of the same fields.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_USERS = 9999  # four digits; a tenant has at most 1,000 sinks, each at most 2 users
# (a job and a dead letter)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    users: int
    at_ms: int
    source: str
    timestamp: float | None
    type: str
    body: bytes
    trace: str = ""  # the W3C trace context it was taken in with ("": none)


def header(
    users: int, at_ms: int, source: bytes, timestamp: bytes, type_len: int, trace: bytes = b""
) -> bytes:
    """The header, up to and including the newline; ``timestamp`` is ``b"-"`` for none,
    ``trace`` empty for none."""
    if trace:
        return b"%04d %013d %s %s %d %s\n" % (users, at_ms, source, timestamp, type_len, trace)
    return b"%04d %013d %s %s %d\n" % (users, at_ms, source, timestamp, type_len)


def timestamp_field(timestamp: float | None) -> bytes:
    """The ``TS`` field: Chert's timestamp, or ``-``."""
    return b"-" if timestamp is None else repr(timestamp).encode()


def pack(
    users: int, at_ms: int, source: str, timestamp: float | None, etype: str, body: bytes
) -> bytes:
    """A whole stored event (the ingest path hands the wire its parts instead:
    :class:`~relay.store.wire.IngestItem`)."""
    t = etype.encode()
    return header(users, at_ms, source.encode(), timestamp_field(timestamp), len(t)) + t + body


def parse(raw: bytes | str) -> StoredEvent:
    """Read a stored event; ``ValueError`` if ``raw`` is not one."""
    if isinstance(raw, str):
        raw = raw.encode()
    head, sep, rest = raw.partition(b"\n")
    fields = head.split(b" ")
    if not sep or len(fields) not in (5, 6):
        raise ValueError("not a stored event")
    users, at_ms, source, ts, type_len = fields[:5]
    n = int(type_len)
    return StoredEvent(
        users=int(users),
        at_ms=int(at_ms),
        source=source.decode(),
        timestamp=None if ts == b"-" else float(ts),
        type=rest[:n].decode(),
        body=rest[n:],
        trace=fields[5].decode() if len(fields) == 6 else "",
    )
