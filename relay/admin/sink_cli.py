"""``chert-relay sinks list|pause|resume|test``: the sinks from the command line.

``list`` (``--tenant`` to narrow it) prints each configured sink's state — paused and
since when, gone, its breaker, its waiting and in-flight deliveries — under a header
row naming the keys of ``--json`` (one object a line). ``pause`` and ``resume`` need
``--tenant`` and ``--sink`` and are idempotent (:mod:`relay.store.sinks`). These talk to
the relay's Redis directly, as ``chert-relay dlq`` does.

``test`` signs and POSTs a test event to the sink as a delivery would (no queue, no
Redis: the configuration alone), paused or not, and prints the answer: the HTTP status
or the error, the time it took and an excerpt of the body. Exit codes: 0 the sink
answered 2xx; 1 it answered anything else, or nothing (a timeout, a connection error);
2 no such tenant or sink (every action).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack

from redis.asyncio import Redis

from relay.admin import sinks
from relay.commands import Commands
from relay.config import Config
from relay.delivery.sink_client import described
from relay.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from relay.logs import printable
from relay.store.endpoint import open_command_client

COLUMNS = (
    "tenant", "sink", "kind", "paused", "paused_since", "gone", "breaker", "waiting", "in_flight",
)  # fmt: skip


def add_parser(commands: Commands, load: Callable[[argparse.Namespace], Config]) -> None:
    """Add ``sinks`` and its actions to the ``chert-relay`` commands."""
    d = commands.add("sinks", help="list sinks, pause or resume one, or send it a test event")
    actions = Commands(d, dest="sinks_action", metavar="ACTION")
    s = actions.add("list", help="every configured sink and its state")
    s.add_argument("--tenant", help="tenant slug (default: every configured tenant)")
    s.add_argument("--json", action="store_true", help="print JSON, one sink a line")
    for name, what in (
        ("pause", "send nothing to the sink until it is resumed; its deliveries wait"),
        ("resume", "let a paused sink's waiting deliveries go, in order"),
        ("test", "sign and POST a test event to the sink now, and show its answer"),
    ):
        s = actions.add(name, help=what)
        s.add_argument("--tenant", required=True, help="tenant slug")
        s.add_argument("--sink", required=True, help="sink name")
        s.add_argument("--json", action="store_true", help="print JSON")
    d.set_defaults(func=lambda args: run(args, load(args)))


def who() -> str:
    try:
        return f"the command line (user {getpass.getuser()})"
    except (KeyError, OSError):
        return "the command line"


def run(args: argparse.Namespace, config: Config) -> int:
    action = args.sinks_action
    try:
        if action == "test":
            return asyncio.run(_test(args, config))
        if action != "list":
            sinks.find_sink(config, args.tenant, args.sink)
        elif args.tenant is not None and config.tenant(args.tenant) is None:
            raise LookupError(f"no tenant {args.tenant!r} in the configuration")
        return asyncio.run(_with_redis(args, config))
    except LookupError as e:
        print(f"chert-relay sinks {action}: {e.args[0]}", file=sys.stderr)
        return EXIT_USAGE


async def _with_redis(args: argparse.Namespace, config: Config) -> int:
    async with AsyncExitStack() as stack:
        client = await open_command_client(config, stack)
        if args.sinks_action == "list":
            return await _list(client, config, args)
        return await _switch(client, config, args)


async def _list(client: Redis, config: Config, args: argparse.Namespace) -> int:
    tenants = None if args.tenant is None else [args.tenant]
    found = await sinks.sink_states(client, config, sinks.configured(config, tenants))
    if args.json:
        for s in found:
            print(json.dumps(s.to_json()))
        return EXIT_OK
    rows = [list(COLUMNS)]
    for s in found:
        rows.append(
            [
                s.tenant,
                s.sink,
                s.kind,
                "yes" if s.paused else "no",
                sinks.iso(s.paused_since),
                "yes" if s.gone else "no",
                s.breaker.replace("_", "-"),
                str(s.waiting),
                str(s.in_flight),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    for r in rows:
        print("  ".join(printable(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print(f"{len(found)} sink(s), {sum(s.paused for s in found)} paused", file=sys.stderr)
    return EXIT_OK


async def _switch(client: Redis, config: Config, args: argparse.Namespace) -> int:
    action, tenant, sink = args.sinks_action, args.tenant, args.sink
    if action == "pause":
        out = await sinks.pause(client, config, tenant, sink, who())
    else:
        out = await sinks.resume(client, config, tenant, sink, who())
    if args.json:
        print(json.dumps(sinks.change_json(tenant, sink, action, out)))
    elif action == "pause":
        when = sinks.iso(out.since)
        print(
            f"{tenant}/{sink}: paused since {when}: nothing is sent to it until "
            "`chert-relay sinks resume`"
            if out.changed
            else f"{tenant}/{sink}: already paused (since {when})"
        )
    elif out.changed:
        print(
            f"{tenant}/{sink}: resumed after {out.paused_for or 0.0:.1f}s paused: its "
            "waiting deliveries go now, in order"
        )
    else:
        print(f"{tenant}/{sink}: was not paused")
    return EXIT_OK


async def _test(args: argparse.Namespace, config: Config) -> int:
    out = await sinks.send_test_event(config, args.tenant, args.sink, who())
    if args.json:
        print(json.dumps(out.to_json()))
    else:
        said = described(out.status, out.kind)
        print(f"{out.tenant}/{out.sink}: {said} in {out.ms:.0f} ms")
        print(f"event:  {out.event_id}")
        print(f"answer: {printable(out.excerpt) or '(empty)'}")
    return EXIT_OK if out.ok else EXIT_FAILURE
