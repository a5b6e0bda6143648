"""``chert-relay dlq list|show|replay|purge``: dead letters from the command line.

The commands talk to the relay's Redis directly: ``[redis] url``, or the embedded
server under ``relay.state_dir`` (the running relay's, or one started for the
command). Filters: ``--tenant``,
``--sink``, ``--class``, ``--type``, ``--since`` and ``--until`` (dead-letter time:
unix seconds, ISO 8601, or an age such as ``2h`` or ``7d``). ``replay`` and ``purge``
need at least one filter or ``--all``, and show what they would do with ``--dry-run``;
they show their progress on stderr (a bar on a terminal, plain lines otherwise) and end
with a count per tenant and sink (``--verbose``: every entry, as ``list`` prints it).

``list`` prints a header row naming its columns — the keys of ``--json`` — whether or
not stdout is a terminal: the plain form is for people (on a terminal, in a pager, pasted
into a ticket), and ``--json`` (one object a line, no header) for programs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import replace
from datetime import UTC, datetime

from redis.asyncio import Redis

from relay.commands import Commands
from relay.config import Config
from relay.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, DeadLetterError
from relay.logs import printable
from relay.progress import Meter
from relay.store.deadletters import (
    CLASSES,
    DeadLetter,
    DeadLetterStore,
    Filter,
    Outcome,
    parse_time,
)
from relay.store.endpoint import open_command_client


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenant", help="tenant slug (default: every configured tenant)")
    p.add_argument("--sink", help="sink name")
    p.add_argument("--class", dest="cls", choices=CLASSES, help="dead-letter class")
    p.add_argument("--type", dest="event_type", help="event type, e.g. message.received")
    p.add_argument("--since", help="dead-lettered at or after (unix s, ISO 8601, or an age: 2h)")
    p.add_argument("--until", help="dead-lettered before (same forms as --since)")
    p.add_argument("--json", action="store_true", help="print JSON")


def add_parser(commands: Commands, load: Callable[[argparse.Namespace], Config]) -> None:
    """Add ``dlq`` and its actions to the ``chert-relay`` commands."""
    d = commands.add("dlq", help="list, show, replay or purge dead letters")
    actions = Commands(d, dest="dlq_action", metavar="ACTION")
    s = actions.add("list", help="list dead letters (oldest first)")
    _filters(s)
    s.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
    s = actions.add("show", help="one dead letter, with the event it holds")
    s.add_argument("--tenant", required=True)
    s.add_argument("--sink", required=True)
    s.add_argument("event_id")
    s.add_argument("--json", action="store_true", help="print JSON")
    for name, what in (
        ("replay", "queue the matching dead letters again, with fresh attempts"),
        ("purge", "delete the matching dead letters for good"),
    ):
        s = actions.add(name, help=what)
        _filters(s)
        s.add_argument("--all", action="store_true", help="every dead letter (no filter needed)")
        s.add_argument("--dry-run", action="store_true", help="only show what would be done")
        s.add_argument(
            "-v", "--verbose", action="store_true", help="list every entry, not only the counts"
        )
    d.set_defaults(func=lambda args: run(args, load(args)))


def _filter(args: argparse.Namespace) -> Filter:
    return Filter(
        tenant=args.tenant,
        sink=args.sink,
        cls=args.cls,
        event_type=args.event_type,
        since=None if args.since is None else parse_time(args.since),
        until=None if args.until is None else parse_time(args.until),
        limit=getattr(args, "limit", None),
    )


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# The columns of the plain list, named as in --json.
COLUMNS = (
    "tenant",
    "sink",
    "event_id",
    "event_type",
    "class",
    "status",
    "attempts",
    "dead_lettered_at",
    "error",
)
SHOWN_SKIPS = 10  # skipped entries listed one by one without --verbose


def _cells(d: DeadLetter) -> list[str]:
    error = " ".join(d.error.split())  # one line, whatever the sink answered
    if d.holds_chat:
        error += f"  [holds chat {d.chat}]"
    status = "-" if d.status is None else str(d.status)
    cells = [d.tenant, d.sink, d.event_id, d.event_type, d.cls, status, str(d.attempts)]
    return [printable(c) for c in (*cells, _when(d.dead_lettered_at), error)]


def _table(entries: Iterable[DeadLetter]) -> list[str]:
    """A header row and one row per entry, in columns (the last, the error, unpadded)."""
    rows = [list(COLUMNS), *(_cells(d) for d in entries)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    return [
        "  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]).rstrip()
        for r in rows
    ]


def run(args: argparse.Namespace, config: Config) -> int:
    try:
        return asyncio.run(_run(args, config))
    except (DeadLetterError, ValueError) as e:
        print(f"chert-relay dlq: {e}", file=sys.stderr)
        return EXIT_USAGE


async def _run(args: argparse.Namespace, config: Config) -> int:
    async with AsyncExitStack() as stack:
        return await _act(args, config, await open_command_client(config, stack))


async def _act(args: argparse.Namespace, config: Config, client: Redis) -> int:
    store = DeadLetterStore(client, config)
    action = args.dlq_action
    if action == "show":
        return await _show(store, args)
    flt = _filter(args)
    if action == "list":
        return await _list(store, flt, args)
    if flt.is_empty() and not args.all:
        print(
            f"chert-relay dlq {action}: give a filter (--tenant, --sink, --class, --type, "
            "--since, --until) or --all",
            file=sys.stderr,
        )
        return EXIT_USAGE
    found = await store.find(flt)
    meter = Meter(sys.stderr, f"dlq {action}", unit="dead letters", total=len(found))
    if action == "replay":
        out = await store.replay_entries(found, dry_run=args.dry_run, progress=meter.update)
    else:
        out = await store.purge_entries(found, dry_run=args.dry_run, progress=meter.update)
    meter.close()
    _report(action, out, args)
    return EXIT_OK if not out.skipped else EXIT_FAILURE


async def _list(store: DeadLetterStore, flt: Filter, args: argparse.Namespace) -> int:
    """Print up to ``--limit`` entries; and, when more match, say so and how many."""
    limit = flt.limit
    shown: list[DeadLetter] = []  # at most --limit, for the columns' widths
    total = 0
    async for d in store.iter(replace(flt, limit=None)):
        total += 1
        if limit is None or len(shown) < limit:
            if args.json:
                print(json.dumps(d.to_json()))
            shown.append(d)
    if shown and not args.json:
        print("\n".join(_table(shown)))
    if len(shown) < total:
        shown_n = len(shown)
        print(
            f"{shown_n} of {total} dead letter(s) shown: {total - shown_n} more match "
            f"(--limit {limit}; raise it, or narrow the filters)",
            file=sys.stderr,
        )
    elif not args.json:
        print(f"{total} dead letter(s)", file=sys.stderr)
    return EXIT_OK


async def _show(store: DeadLetterStore, args: argparse.Namespace) -> int:
    d = await store.get(args.tenant, args.sink, args.event_id)
    if d is None:
        print(
            f"chert-relay dlq show: no dead letter for {args.event_id} to {args.tenant}/"
            f"{args.sink}",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    body = await store.payload(d.tenant, d.event_id)
    if args.json:
        out = d.to_json()
        out["event"] = None if body is None else json.loads(body)
        print(json.dumps(out, indent=2))
        return EXIT_OK
    for name, value in _fields(d):
        print(f"{name + ':':<18}{printable(value)}")
    print("event:", "(not stored)" if body is None else "")
    if body is not None:
        print(_indented(body))
    return EXIT_OK


def _fields(d: DeadLetter) -> list[tuple[str, str]]:
    """One dead letter as text: times in ISO 8601 (UTC), no Python values."""
    out = [
        ("tenant", d.tenant),
        ("sink", d.sink),
        ("event_id", d.event_id),
        ("event_type", d.event_type),
        ("class", d.cls),
        ("status", "- (no answer)" if d.status is None else str(d.status)),
        ("attempts", str(d.attempts)),
        ("first_attempt", _when(d.first_attempt)),
        ("last_attempt", _when(d.last_attempt)),
        ("dead_lettered_at", _when(d.dead_lettered_at)),
    ]
    if d.chat is not None:
        out.append(("chat", d.chat + ("  (holds its later events)" if d.holds_chat else "")))
    out.append(("error", d.error))
    return out


def _indented(body: bytes) -> str:
    """The stored event, pretty-printed when it is JSON (it always should be)."""
    try:
        text = json.dumps(json.loads(body), indent=2, ensure_ascii=False)
    except ValueError:
        text = body.decode(errors="replace")
    return "\n".join("  " + printable(line) for line in text.splitlines())


def _report(action: str, out: Outcome, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps({"action": action, "dry_run": args.dry_run, **out.to_json()}))
        return
    verb = {"replay": "replayed", "purge": "purged"}[action]
    if args.dry_run:
        verb = f"would be {verb}"
    if args.verbose and out.done:
        print("\n".join(_table(out.done)))
    else:  # a count per tenant and sink, not thousands of lines
        per_sink = Counter((d.tenant, d.sink) for d in out.done)
        for (tenant, sink), n in sorted(per_sink.items()):
            print(f"{tenant}/{sink}: {n} {verb}")
    skipped = out.skipped if args.verbose else out.skipped[:SHOWN_SKIPS]
    for d, reason in skipped:
        print(f"skipped {d.tenant}/{d.sink}/{d.event_id}: {reason}", file=sys.stderr)
    if len(skipped) < len(out.skipped):
        print(
            f"… {len(out.skipped) - len(skipped)} more skipped (--verbose lists them)",
            file=sys.stderr,
        )
    print(f"{len(out.done)} dead letter(s) {verb}, {len(out.skipped)} skipped", file=sys.stderr)
