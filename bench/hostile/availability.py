"""Availability under a crowd of slow senders: does Chert still get in?

One client opens as many connections as ``server.max_connections`` allows and sends
each a webhook's head and two bytes of its body, then nothing; whenever the relay
closes one (``body_timeout``, or to make room) it opens another, so that it always
holds as many slots as it can. Meanwhile good webhooks arrive at ``--rate`` a second
on fresh connections, for ``--seconds``: the share answered 202 is the figure. The
relay runs on its shipped ``max_connections`` (1,000) and ``body_timeout`` (30 s).

    python -m bench.hostile.availability [--seconds 30] [--rate 10] [--crowd 1000]

Prints the good webhooks sent and accepted, the crowd's connections opened, and the
relay's log growth and RSS; exit 0 when at least 95 % were accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

from bench.hostile.cases import World
from bench.hostile.scenarios import valid_accepted
from bench.hostile.target import ADMIN_TOKEN, OTHER, OTHER_SECRET, SECRET, TENANT, Limits, Target

GOAL = 0.95


async def crowd(target: Target, world: World, n: int, stop: asyncio.Event) -> int:
    """Hold up to ``n`` stalled connections until ``stop``; how many were opened."""
    opened = 0
    raw, _ = world.valid()
    head, _, body = raw.partition(b"\r\n\r\n")
    stalled = head + b"\r\n\r\n" + body[:2]

    async def hold() -> None:
        nonlocal opened
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(*target.receiver)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            opened += 1
            writer.write(stalled)
            try:
                stopped = asyncio.create_task(stop.wait())
                closed = asyncio.create_task(reader.read())
                await asyncio.wait({stopped, closed}, return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                closed.cancel()
            except OSError:
                pass
            writer.close()

    await asyncio.gather(*(hold() for _ in range(n)))
    return opened


async def measure(
    target: Target, world: World, seconds: float, rate: float, n: int
) -> dict[str, float]:
    stop = asyncio.Event()
    holding = asyncio.create_task(crowd(target, world, n, stop))
    await asyncio.sleep(3)  # the crowd takes its places (and stalls)
    log_before, rss_before = target.log_size(), target.rss_kib()
    sent = accepted = 0
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        sent += 1
        accepted += await asyncio.to_thread(valid_accepted, target, world)
        await asyncio.sleep(max(0.0, started + sent / rate - time.monotonic()))
    stop.set()
    opened = await holding
    return {
        "sent": sent,
        "accepted": accepted,
        "share": accepted / sent if sent else 0.0,
        "crowd_opened": opened,
        "log_bytes": target.log_size() - log_before,
        "rss_kib_before": rss_before,
        "rss_kib_after": target.rss_kib(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=10.0, help="good webhooks a second")
    p.add_argument("--crowd", type=int, default=1000, help="stalled connections held")
    args = p.parse_args(argv)
    limits = Limits(body_timeout=30.0, keepalive_timeout=75.0, max_connections=1000)
    with tempfile.TemporaryDirectory(prefix="chert-availability-") as tmp:
        target = Target(Path(tmp), limits)
        target.start()
        try:
            world = World(
                TENANT, SECRET, OTHER, OTHER_SECRET, ADMIN_TOKEN, limits.max_body,
                limits.tolerance, random.Random(1),
            )  # fmt: skip
            got = asyncio.run(measure(target, world, args.seconds, args.rate, args.crowd))
        finally:
            target.stop()
    print(
        f"good webhooks: {got['accepted']:.0f} of {got['sent']:.0f} accepted "
        f"({got['share']:.1%}) while {args.crowd} stalled connections were held "
        f"({got['crowd_opened']:.0f} opened in all); relay log +{got['log_bytes']:.0f} B; "
        f"RSS {got['rss_kib_before'] / 1024:.1f} -> {got['rss_kib_after'] / 1024:.1f} MiB"
    )
    return 0 if got["share"] >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
