"""arq 0.28's job record: everything the relay knows about it, in one place.

Ingest writes jobs straight into Redis from a Lua script (so that marking an event
seen and enqueueing its deliveries is one atomic step), and a dead letter's replay
writes one too, so both must write exactly what ``ArqRedis.enqueue_job`` would: the
job under ``arq:job:<id>`` (:meth:`relay.keys.Keys.job`) with an expiry, serialized as
``{"t", "f", "a", "k", "et"}``, and ``<id>`` in the queue's sorted set
(:attr:`relay.keys.Keys.queue`) scored by the time it is due (ms). A contract test runs
a real arq ``Worker`` over jobs written this way, so a format change in arq fails CI.

Job data is JSON (never pickle); job arguments are ids only, never payloads or secrets.
"""

from __future__ import annotations

import json
from typing import Any

DELIVER_FUNCTION = "deliver"  # the job function's name; ingest.lua gets it from the loader

# How long past its deadline a job (and its payload) stays in Redis: arq must never
# drop a job by expiry before the relay's own deadline turns it into a dead letter.
EXPIRY_MARGIN_S = 86400.0


def serialize(obj: dict[str, Any]) -> bytes:
    """arq ``job_serializer``: JSON."""
    return json.dumps(obj, separators=(",", ":")).encode()


def deserialize(data: bytes) -> dict[str, Any]:
    """arq ``job_deserializer``: JSON."""
    out: dict[str, Any] = json.loads(data)
    return out


def delivery_job(
    tenant: str, sink: str, event_id: str, enqueued_ms: int, chat: str | None = None
) -> bytes:
    """The record of one delivery job, as ``ingest.lua`` writes it; an ordered delivery's
    job carries its chat id as a fourth argument."""
    args = [tenant, sink, event_id] if chat is None else [tenant, sink, event_id, chat]
    return serialize({"t": None, "f": DELIVER_FUNCTION, "a": args, "k": {}, "et": enqueued_ms})
