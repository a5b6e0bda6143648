"""The simulator's event log: every event is a row here before any delivery.

Rows are kept per tenant in creation order. ``created_at`` has millisecond
precision and is strictly increasing per tenant (a burst is spread one
millisecond apart), so a ``since`` window is exact. Listings run newest first;
the cursor names the last row returned (by its sequence number, not its
position), so paging stays stable while new events arrive at the head.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relay.simulator.models import DELIVERY_STATUSES, iso_ms, parse_iso_us

MAX_LIMIT = 200
DEFAULT_LIMIT = 50


class QueryError(ValueError):
    """A listing parameter is invalid (answered 400)."""


@dataclass
class LogEntry:
    """One row plus what the simulator needs to push it."""

    seq: int  # per-tenant, increasing
    ms: int  # created_at in unix milliseconds
    tenant: str
    row: dict[str, Any]  # the public log row; its "delivery" is updated in place
    body: bytes  # the envelope exactly as pushed

    @property
    def log_id(self) -> str:
        return str(self.row["id"])

    @property
    def event_id(self) -> str:
        return str(self.row["event_id"])

    def snapshot(self) -> dict[str, Any]:
        return copy.deepcopy(self.row)


@dataclass(frozen=True)
class Query:
    type: str | None = None
    status: str | None = None
    lead_id: str | None = None
    since_us: int | None = None
    before_seq: int | None = None  # from the cursor: rows older than this one
    limit: int = DEFAULT_LIMIT


@dataclass
class _TenantLog:
    entries: list[LogEntry] = field(default_factory=list)
    by_id: dict[str, LogEntry] = field(default_factory=dict)
    last_ms: int = 0
    next_seq: int = 1


class EventLog:
    """Rows per tenant; ``append`` notifies listeners (the SSE streams)."""

    def __init__(self, max_rows: int | None = None) -> None:
        self._tenants: dict[str, _TenantLog] = {}
        self._max_rows = max_rows
        self.listeners: list[Callable[[LogEntry], None]] = []

    def next_ms(self, tenant: str) -> int:
        """The next ``created_at`` for ``tenant``: now, or 1 ms after the last row."""
        log = self._tenants.setdefault(tenant, _TenantLog())
        return max(int(time.time() * 1000), log.last_ms + 1)

    def append(self, tenant: str, ms: int, row: dict[str, Any], body: bytes) -> LogEntry:
        log = self._tenants.setdefault(tenant, _TenantLog())
        if ms <= log.last_ms:
            raise ValueError("created_at must increase strictly per tenant")
        row["created_at"] = iso_ms(ms)
        entry = LogEntry(seq=log.next_seq, ms=ms, tenant=tenant, row=row, body=body)
        log.next_seq += 1
        log.last_ms = ms
        log.entries.append(entry)
        log.by_id[entry.log_id] = entry
        if self._max_rows is not None and len(log.entries) > self._max_rows:
            for old in log.entries[: len(log.entries) - self._max_rows]:
                log.by_id.pop(old.log_id, None)
            del log.entries[: len(log.entries) - self._max_rows]
        for listener in list(self.listeners):
            listener(entry)
        return entry

    def get(self, tenant: str, log_id: str) -> LogEntry | None:
        log = self._tenants.get(tenant)
        return None if log is None else log.by_id.get(log_id)

    def entries(self, tenant: str) -> list[LogEntry]:
        """The tenant's rows, oldest first."""
        log = self._tenants.get(tenant)
        return [] if log is None else list(log.entries)

    def after(self, tenant: str, since_us: int) -> list[LogEntry]:
        """Rows created strictly after ``since_us``, oldest first."""
        return [e for e in self.entries(tenant) if e.ms * 1000 > since_us]

    def page(self, tenant: str, query: Query) -> tuple[list[LogEntry], str | None]:
        """One page, newest first, and the cursor of the next page (``None`` at the end)."""
        log = self._tenants.get(tenant)
        entries = [] if log is None else log.entries
        end = len(entries)
        if query.before_seq is not None:  # rows are in seq order: start below the cursor
            end = bisect.bisect_left(entries, query.before_seq, key=lambda e: e.seq)
        page: list[LogEntry] = []
        more = False
        for i in range(end - 1, -1, -1):
            entry = entries[i]
            if query.since_us is not None and entry.ms * 1000 <= query.since_us:
                break  # newest first: everything further is older still
            if not _matches(entry, query):
                continue
            if len(page) == query.limit:
                more = True
                break
            page.append(entry)
        cursor = encode_cursor(query, page[-1].seq) if more and page else None
        return page, cursor


def _matches(entry: LogEntry, query: Query) -> bool:
    row = entry.row
    if query.type is not None and row["type"] != query.type:
        return False
    if query.status is not None and row["delivery"]["status"] != query.status:
        return False
    return query.lead_id is None or row["lead_id"] == query.lead_id


def encode_cursor(query: Query, last_seq: int) -> str:
    """An opaque cursor: the filters of the listing and the last row it returned."""
    state = {
        "s": last_seq,
        "t": query.type,
        "st": query.status,
        "l": query.lead_id,
        "since": query.since_us,
    }
    raw = json.dumps(state, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_query(params: dict[str, str]) -> Query:
    """A :class:`Query` from ``GET /events`` parameters; raises :class:`QueryError`.

    With a cursor, the filters it carries apply unless the request repeats them.
    """
    limit_text = params.get("limit")
    if limit_text is None or limit_text == "":
        limit = DEFAULT_LIMIT
    else:
        try:
            limit = int(limit_text)
        except ValueError:
            raise QueryError("limit must be a whole number from 1 to 200") from None
        if not 1 <= limit <= MAX_LIMIT:
            raise QueryError("limit must be a whole number from 1 to 200")
    state: dict[str, Any] = {}
    cursor = params.get("cursor")
    if cursor:
        try:
            state = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
            if not isinstance(state, dict) or not isinstance(state.get("s"), int):
                raise ValueError
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise QueryError("cursor is not a cursor this API returned") from None
    status = params.get("status") or state.get("st")
    if status is not None and status not in DELIVERY_STATUSES:
        raise QueryError(f"status must be one of {', '.join(DELIVERY_STATUSES)}")
    since_us: int | None = state.get("since")
    if params.get("since"):
        try:
            since_us = parse_iso_us(params["since"])
        except ValueError:
            raise QueryError("since must be an ISO-8601 time") from None
    return Query(
        type=params.get("type") or state.get("t"),
        status=status,
        lead_id=params.get("lead_id") or state.get("l"),
        since_us=since_us,
        before_seq=state.get("s"),
        limit=limit,
    )
