"""Everything the relay knows about arq 0.28's storage format, in one place.

Ingest writes jobs straight into Redis from a Lua script (so that marking an event
seen and enqueueing its deliveries is one atomic step), which means it must write
exactly what ``ArqRedis.enqueue_job`` would: the job under ``arq:job:<id>`` with an
expiry, serialized as ``{"t", "f", "a", "k", "et"}``, and ``<id>`` in the queue's
sorted set scored by the time it is due (ms). A contract test runs a real arq
``Worker`` over jobs written this way, so a format change in arq fails CI.

Job data is JSON (never pickle); job arguments are ids only, never payloads or secrets.
"""

from __future__ import annotations

import json
from typing import Any

from arq.constants import job_key_prefix

DELIVER_FUNCTION = "deliver"
JOB_KEY_PREFIX: str = job_key_prefix


def queue_name(key_prefix: str) -> str:
    return f"{key_prefix}:queue"


def delivery_job_id(key_prefix: str, tenant: str, sink: str, event_id: str) -> str:
    """Deterministic: the same (event, sink) always maps to the same job."""
    return f"{key_prefix}:{tenant}:{sink}:{event_id}"


def serialize(obj: dict[str, Any]) -> bytes:
    """arq ``job_serializer``: JSON."""
    return json.dumps(obj, separators=(",", ":")).encode()


def deserialize(data: bytes) -> dict[str, Any]:
    """arq ``job_deserializer``: JSON."""
    out: dict[str, Any] = json.loads(data)
    return out
