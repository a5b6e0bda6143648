"""``chert-relay events show|list|resend``: the event log from the command line.

Like ``dlq``, the commands talk to the relay's Redis directly, with the config file
alone (:mod:`relay.store.eventlog`):

- ``show EVENT_ID [--tenant T]``: the event's record — arrivals, and per sink its state
  and every attempt (time, duration, status or error). Without ``--tenant`` every
  configured tenant is looked in.
- ``list``: newest first; ``--tenant``, ``--sink``, ``--type`` (a glob), ``--chat``,
  ``--state`` (pending, delivered, dead_letter, dropped, not_routed, failed: any failed
  attempt), ``--since``/``--until`` (first arrival: unix s, ISO 8601 or an age),
  ``--grep TEXT`` (in the payload) and ``--field PATH=VALUE`` (``data.chat.id=…``);
  ``--limit`` rows, reading at most ``--scan`` records; ``--cursor`` continues a list.
- ``resend EVENT_ID [--tenant T] [--sink S]``: deliver it again to the sink, or to every
  sink it was routed to (same webhook-id, ``X-Relay-Source: resend``).

``--json`` prints the record (``show``: one object; ``list``: one a line).
Exit codes: 0 · 1 no such record, or a resend that sent nothing · 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime

from redis.asyncio import Redis

from relay.commands import Commands
from relay.config import Config
from relay.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, EventLogError
from relay.logs import printable
from relay.store.deadletters import parse_time
from relay.store.endpoint import open_command_client
from relay.store.eventlog import RESEND_SKIPPED, STATES, EventLog, EventRecord, Query


def add_parser(commands: Commands, load: Callable[[argparse.Namespace], Config]) -> None:
    """Add ``events`` and its actions to the ``chert-relay`` commands."""
    e = commands.add("events", help="show, list or resend events from the event log")
    actions = Commands(e, dest="events_action", metavar="ACTION")
    s = actions.add("show", help="one event: its arrivals, and every attempt to every sink")
    s.add_argument("event_id")
    s.add_argument("--tenant", help="tenant slug (default: look in every tenant)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s = actions.add("list", help="events, newest first")
    s.add_argument("--tenant", help="tenant slug (default: every configured tenant)")
    s.add_argument("--sink", help="sink name")
    s.add_argument("--type", dest="event_type", help="event type, or a glob: message.*")
    s.add_argument("--chat", help="chat id")
    s.add_argument("--state", choices=STATES, help="a delivery's state (failed: any failure)")
    s.add_argument("--since", help="first seen at or after (unix s, ISO 8601, or an age: 2h)")
    s.add_argument("--until", help="first seen before (same forms as --since)")
    s.add_argument("--grep", help="text in the payload (case-insensitive)")
    s.add_argument("--field", help="PATH=VALUE in the payload, e.g. data.chat.id=17f6e9ed")
    s.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    s.add_argument("--scan", type=int, default=10_000, help="read at most this many records")
    s.add_argument("--cursor", help="continue where a list stopped")
    s.add_argument("--json", action="store_true", help="print JSON, one event a line")
    s = actions.add("resend", help="deliver a recorded event again")
    s.add_argument("event_id")
    s.add_argument("--tenant", help="tenant slug (needed if the id is in several tenants)")
    s.add_argument("--sink", help="only this sink (default: every sink it was routed to)")
    e.set_defaults(func=lambda args: run(args, load(args)))


def run(args: argparse.Namespace, config: Config) -> int:
    try:
        return asyncio.run(_run(args, config))
    except (EventLogError, ValueError) as e:
        print(f"chert-relay events: {e}", file=sys.stderr)
        return EXIT_USAGE


async def _run(args: argparse.Namespace, config: Config) -> int:
    async with AsyncExitStack() as stack:
        return await _act(args, config, await open_command_client(config, stack))


def _tenants(config: Config, tenant: str | None) -> list[str]:
    if tenant is None:
        return [t.slug for t in config.tenants]
    if config.tenant(tenant) is None:
        raise EventLogError(f"unknown tenant {tenant!r}")
    return [tenant]


async def _act(args: argparse.Namespace, config: Config, client: Redis) -> int:
    log = EventLog(client, config)
    action = args.events_action
    tenants = _tenants(config, args.tenant)
    if action == "list":
        return await _list(log, tenants, args)
    found = await log.find(args.event_id, tenants)
    if not found:
        print(
            f"chert-relay events {action}: no record of {printable(args.event_id)} "
            "(never taken in, or past the event log's retention)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    if action == "show":
        if args.json:
            out = [r.to_json(payload=True) for r in found]
            print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
        else:
            print("\n\n".join("\n".join(describe(r)) for r in found))
        return EXIT_OK
    if len(found) > 1:
        raise EventLogError(
            f"{args.event_id!r} is in tenants {', '.join(r.tenant for r in found)}: "
            "say which with --tenant"
        )
    sent = 0
    for sink, verdict in await log.resend(found[0].tenant, args.event_id, args.sink):
        if verdict == "ok":
            sent += 1
            print(f"{found[0].tenant}/{sink}: resent")
        else:
            print(f"{found[0].tenant}/{sink}: not resent: {RESEND_SKIPPED.get(verdict, verdict)}")
    return EXIT_OK if sent else EXIT_FAILURE


async def _list(log: EventLog, tenants: list[str], args: argparse.Namespace) -> int:
    path = value = None
    if args.field is not None:
        path, eq, value = args.field.partition("=")
        if not eq or not path:
            raise EventLogError("--field takes PATH=VALUE, e.g. data.chat.id=17f6e9ed")
    if args.limit < 1 or args.scan < 1:
        raise EventLogError("--limit and --scan must be at least 1")
    page = await log.search(
        Query(
            tenants=tenants,
            sink=args.sink,
            type=args.event_type,
            chat=args.chat,
            state=args.state,
            since=None if args.since is None else parse_time(args.since),
            until=None if args.until is None else parse_time(args.until),
            text=args.grep,
            field_path=path,
            field_value=value,
            limit=args.limit,
            scan=args.scan,
            cursor=args.cursor,
        )
    )
    if args.json:
        for r in page.records:
            print(json.dumps(r.to_json()))
    elif page.records:
        print("\n".join(table(page.records)))
    more = f"; more: --cursor {page.cursor}" if page.cursor else ""
    print(
        f"{len(page.records)} event(s), {page.scanned} record(s) read{more}",
        file=sys.stderr,
    )
    return EXIT_OK


def when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


COLUMNS = ("first_seen", "tenant", "event_id", "type", "chat_id", "sinks")


def table(records: list[EventRecord]) -> list[str]:
    rows = [list(COLUMNS)]
    for r in records:
        sinks = " ".join(f"{s.sink}:{s.state}" for s in r.sinks)
        cells = [when(r.at_ms), r.tenant, r.event_id, r.type, r.chat_id or "-", sinks]
        rows.append([printable(c) for c in cells])
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    return [
        "  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]).rstrip()
        for r in rows
    ]


def describe(r: EventRecord) -> list[str]:
    """One record as text: the event, its arrivals, then each sink and its attempts."""
    out = [
        f"event:      {printable(r.event_id)}",
        f"tenant:     {r.tenant}",
        f"type:       {printable(r.type)}",
        f"chat:       {printable(r.chat_id or '-')}",
        f"first seen: {when(r.at_ms)}",
    ]
    for via in r.arrivals:
        times = "once" if via.count == 1 else f"{via.count} times"
        out.append(f"arrived:    by {via.source}, {times}, first at {when(via.first_ms)}")
    for s in r.sinks:
        state = s.state + (f" ({s.detail})" if s.detail else "")
        if s.due_ms is not None and s.state == "scheduled":
            state += f", next attempt at {when(s.due_ms)}"
        out.append(f"sink {s.sink}: {printable(state)}")
        if s.attempts_made > len(s.attempts):
            out.append(f"  … {s.attempts_made - len(s.attempts)} earlier attempt(s) not kept")
        for a in s.attempts:
            said = str(a.status) if a.status is not None else a.kind
            line = f"  #{a.n}  {when(a.at_ms)}  {said}  {a.ms} ms  via {a.source or '-'}"
            if a.stale:
                line += "  (its run had lost the delivery: the sink may have it twice)"
            out.append(printable(line))
            if a.error:
                out.append("      " + printable(a.error))
            elif a.excerpt:
                out.append("      answer: " + printable(a.excerpt))
    return out
