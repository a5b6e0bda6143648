"""Chert's event rows into the one ingest door, for the poller, the SSE stream and backfill.

A row becomes an event (:func:`relay.ingest.envelope.from_object`) or is skipped with
a warning: one that is not an event, or that names another partner. Its
``created_at`` (or, lacking one, the event's timestamp) moves the caller's watermark;
a date too far in the future is taken as now, so that it cannot carry the watermark
past every later event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from relay.ingest.envelope import BadEventError, Event, from_object, parse_timestamp
from relay.ingest.ingestor import Ingestor

log = logging.getLogger(__name__)

UNDELIVERED = frozenset({"failed", "pending"})
MAX_FUTURE_S = 300.0  # an event dated further ahead than this is taken as dated now


@dataclass
class RowsResult:
    """What ingesting some rows did."""

    seen: int = 0
    new: int = 0
    duplicates: int = 0
    skipped: int = 0  # rows that could not become an event, or named another tenant
    newest: float | None = None  # largest created_at (unix seconds)
    undelivered_new: int = 0  # new rows Chert marks failed/pending, older than stale_after
    statuses: set[str] = field(default_factory=set)

    def add(self, other: RowsResult) -> None:
        self.seen += other.seen
        self.new += other.new
        self.duplicates += other.duplicates
        self.skipped += other.skipped
        self.undelivered_new += other.undelivered_new
        self.statuses |= other.statuses
        if other.newest is not None and (self.newest is None or other.newest > self.newest):
            self.newest = other.newest


def _row_event(tenant: str, row: dict[str, Any]) -> Event | None:
    try:
        event = from_object(row)
    except BadEventError as e:
        log.warning("tenant %s: skipping an event row Chert returned: %s", tenant, e)
        return None
    if event.partner_id is not None and event.partner_id != tenant:
        log.warning(
            "tenant %s: skipping event %s: it names partner %r",
            tenant,
            event.event_id,
            event.partner_id,
        )
        return None
    return event


def _delivery_status(row: dict[str, Any]) -> str | None:
    delivery = row.get("delivery")
    status = delivery.get("status") if isinstance(delivery, dict) else None
    return status if isinstance(status, str) else None


async def ingest_rows(
    ingestor: Ingestor,
    tenant: str,
    rows: Iterable[dict[str, Any]],
    source: str,
    *,
    stale_before: float | None = None,
) -> RowsResult:
    """Ingest Chert log rows (concurrently: the ingestor batches them into one round trip).

    ``stale_before`` (unix seconds): count new rows Chert marks failed/pending that
    were created before it — evidence that webhooks are not getting through.
    Raises :class:`RedisUnavailableError` if Redis could not take them.
    """
    out = RowsResult()
    events: list[tuple[Event, dict[str, Any], float | None]] = []
    latest = time.time() + MAX_FUTURE_S
    for row in rows:
        out.seen += 1
        event = _row_event(tenant, row)
        if event is None:
            out.skipped += 1
            continue
        created = parse_timestamp(row.get("created_at"))
        if created is None:
            created = event.timestamp
        if created is not None and created > latest:
            # Taken at its word it would carry the watermark past every later event.
            log.warning(
                "tenant %s: event %s is dated %s, in the future; taken as now",
                tenant,
                event.event_id,
                row.get("created_at"),
            )
            created = time.time()
        if created is not None and (out.newest is None or created > out.newest):
            out.newest = created
        events.append((event, row, created))
    results = await asyncio.gather(*(ingestor.ingest(tenant, e, source) for e, _, _ in events))
    for (_, row, created), new in zip(events, results, strict=True):
        if not new:
            out.duplicates += 1
            continue
        out.new += 1
        status = _delivery_status(row)
        if (
            stale_before is not None
            and status in UNDELIVERED
            and created is not None
            and created < stale_before
        ):
            out.undelivered_new += 1
            out.statuses.add(status)
    return out
