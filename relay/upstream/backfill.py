"""``chert-relay backfill``: pull a time range from Chert's events API through ingest.

Every row Chert returns for ``--since`` (exclusive, as Chert's ``since`` is) up to
``--until`` (inclusive; default: now and onwards) goes through the one ingest door
with source ``backfill``, so what the relay already has is a duplicate and only what
it never saw is enqueued for the sinks. Progress goes to stderr (a tqdm counter on a
terminal, a plain line per second otherwise); the closing summary — rows seen, new,
duplicates — goes to stdout. The poller's watermark is not touched.

The range is complete only when Chert's cursor chain ends (``next_cursor: null``).
If it breaks (Chert gives a cursor again), what was read stays ingested, but the
command says so on stderr, marks the summary ``(incomplete)`` and exits 69, like
any other upstream failure: run it again, or narrow the range.

Redis is found the way the daemon finds it: ``[redis] url`` if set; otherwise the
embedded redis-server of a relay already running on this ``state_dir``, or a fresh
one started for the command (the events then wait there for the next ``run``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

import aiohttp

from relay import telemetry
from relay.config import Config, TenantConfig, config_path, load_config
from relay.errors import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    ChertApiError,
    UpstreamError,
)
from relay.ingest.envelope import parse_timestamp
from relay.ingest.ingestor import Ingestor
from relay.metrics import Metrics
from relay.progress import Meter
from relay.store.client import check_server
from relay.store.endpoint import open_client, require_relay_state
from relay.upstream.chert_api import ChertApi, ChertPagingError, isoformat
from relay.upstream.rows import RowsResult, ingest_rows

log = logging.getLogger(__name__)


@dataclass
class BackfillSummary:
    seen: int = 0  # rows Chert returned in the range
    new: int = 0  # enqueued for the sinks now
    duplicates: int = 0  # the relay already had them
    skipped: int = 0  # rows that could not become an event
    after_until: int = 0  # rows newer than --until (not ingested)
    pages: int = 0

    def add(self, result: RowsResult) -> None:
        self.seen += result.seen
        self.new += result.new
        self.duplicates += result.duplicates
        self.skipped += result.skipped

    def line(self) -> str:
        text = (
            f"{self.seen} rows seen, {self.new} new, {self.duplicates} duplicates, "
            f"{self.skipped} skipped"
        )
        if self.after_until:
            text += f", {self.after_until} after --until"
        return text


class Progress:
    """Backfill's progress on ``stream`` (:mod:`relay.progress`): a tqdm counter of rows
    on a terminal, a plain line a second otherwise."""

    def __init__(self, stream: TextIO, label: str, *, interval: float = 1.0) -> None:
        self._meter = Meter(stream, label, unit="rows", interval=interval)

    def update(self, summary: BackfillSummary) -> None:
        detail = f"page {summary.pages}, {summary.new} new, {summary.duplicates} duplicates"
        if summary.skipped:
            detail += f", {summary.skipped} skipped"
        self._meter.update(summary.seen, detail=detail)

    def finish(self, summary: BackfillSummary) -> None:
        self.update(summary)
        self._meter.close()


async def backfill(
    api: ChertApi,
    ingestor: Ingestor,
    *,
    since: float,
    until: float | None = None,
    page_size: int = 200,
    progress: Progress | None = None,
    summary: BackfillSummary | None = None,
) -> BackfillSummary:
    """Ingest every row created after ``since`` and up to ``until`` (unix seconds).

    Raises :class:`ChertPagingError` if Chert's cursor chain breaks (``summary``, if
    given, then holds what was read) and any other :class:`UpstreamError` as it comes.
    """
    out = summary if summary is not None else BackfillSummary()
    async for page in api.events(since=isoformat(since), page_size=page_size):
        rows = page.rows
        if until is not None:
            rows = [r for r in rows if (parse_timestamp(r.get("created_at")) or 0.0) <= until]
            out.after_until += len(page.rows) - len(rows)
        out.add(await ingest_rows(ingestor, api.slug, rows, "backfill"))
        out.pages += 1
        if progress is not None:
            progress.update(out)
    return out


def parse_when(value: str) -> float:
    """Unix seconds from ISO-8601 (``2026-05-01``, ``2026-05-01T12:00:00Z``…); naive is UTC."""
    try:
        dt = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO-8601 date or time") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


async def run_backfill(
    config: Config,
    tenant: TenantConfig,
    *,
    since: float,
    until: float | None,
    progress: Progress | None = None,
    summary: BackfillSummary | None = None,
) -> BackfillSummary:
    """Open Redis and a session to Chert, as the daemon would, and backfill one tenant."""
    summary = summary if summary is not None else BackfillSummary()
    async with AsyncExitStack() as stack:
        if config.telemetry.tracing:  # each event's ingest span, exported before exiting
            stack.push_async_callback(telemetry.start())
        require_relay_state(config)
        _, client = await open_client(config, stack, share_running=True)
        for warning in await check_server(client, require_aof=config.redis.require_aof):
            log.warning("%s", warning)
        metrics = Metrics()
        ingestor = Ingestor(client, config, metrics)
        session = aiohttp.ClientSession(headers={"User-Agent": "chert-relay"})
        stack.push_async_callback(session.close)
        api = ChertApi(tenant, session, metrics)
        try:
            await backfill(
                api,
                ingestor,
                since=since,
                until=until,
                page_size=tenant.poll.page_size,
                progress=progress,
                summary=summary,
            )
        finally:
            await ingestor.drain()
    return summary


def cmd_backfill(args: argparse.Namespace) -> int:
    try:
        since = parse_when(args.since)
        until = parse_when(args.until) if args.until else None
    except ValueError as e:
        print(f"chert-relay backfill: {e}", file=sys.stderr)
        return EXIT_USAGE
    if until is not None and until <= since:
        print("chert-relay backfill: --until must be later than --since", file=sys.stderr)
        return EXIT_USAGE
    config = load_config(config_path(getattr(args, "config", None)), admin_tokens=False)
    tenant = config.tenant(args.tenant)
    if tenant is None:
        print(
            f"chert-relay backfill: no tenant {args.tenant!r} in the configuration", file=sys.stderr
        )
        return EXIT_USAGE
    if tenant.api.signing_secret is None:
        print(
            f"chert-relay backfill: tenant {tenant.slug} has no api.signing_secret", file=sys.stderr
        )
        return EXIT_CONFIG
    label = f"backfill {tenant.slug}"
    progress = Progress(sys.stderr, label)
    summary = BackfillSummary()
    code = EXIT_OK
    try:
        asyncio.run(
            run_backfill(
                config, tenant, since=since, until=until, progress=progress, summary=summary
            )
        )
    except ChertApiError as e:
        print(
            f"\nchert-relay backfill: Chert answered {e.status} code {e.code} ({e.message}), "
            f"trace_id={e.trace_id or '-'}",
            file=sys.stderr,
        )
        code = EXIT_CONFIG if e.is_auth else EXIT_UNAVAILABLE
    except ChertPagingError as e:
        print(
            f"\nchert-relay backfill: {e}; rows on the pages not read were not backfilled",
            file=sys.stderr,
        )
        code = EXIT_UNAVAILABLE
    except UpstreamError as e:
        print(f"\nchert-relay backfill: {e}", file=sys.stderr)
        code = EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        print("\nchert-relay backfill: interrupted", file=sys.stderr)
        code = EXIT_FAILURE
    progress.finish(summary)
    done = "" if code == EXIT_OK else " (incomplete)"
    print(f"{label} {args.since} .. {args.until or 'now'}{done}: {summary.line()}")
    return code
