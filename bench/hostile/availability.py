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

    python -m bench.hostile.availability --attack gzip [--seconds 20] [--rate 10] [--crowd 16]

Compression amplification instead: ``--crowd`` connections each send, over and over, a
1.3 KB gzip body that inflates to 1 MiB (under a bad signature: the cost an attacker
buys is the work before the signature check), first to a tenant with the default
``accept_compressed = false``, then to one that accepts compressed bodies. Good
webhooks' latency (p50 and p99, each on a fresh connection) is measured with no
attack, then under each; exit 0 when both p50s stay within 3x of none.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.hostile.cases import World
from bench.hostile.scenarios import valid_accepted
from bench.hostile.target import ADMIN_TOKEN, OTHER, OTHER_SECRET, SECRET, TENANT, Limits, Target

GOAL = 0.95
GZIP_GOAL = 3.0  # good webhooks' p50 under the gzip attack, against none


def stalled_head(world: World) -> bytes:
    """A webhook's head and two bytes of its body."""
    raw, _ = world.valid()
    head, _, body = raw.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n" + body[:2]


def nearly_whole(world: World, size: int) -> bytes:
    """A signed webhook of ``size`` bytes, all but its last 10."""
    _, body = world.body(pad="x" * (size - 600))
    raw = world.signed(body)
    return raw[:-10]


async def crowd(address: tuple[str, int], payload: bytes, n: int, stop: asyncio.Event) -> int:
    """Hold up to ``n`` connections to ``address``, each sent ``payload`` and then
    nothing, reopened whenever one is closed, until ``stop``; how many were opened."""
    opened = 0
    stalled = payload

    async def hold() -> None:
        nonlocal opened
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(*address)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            opened += 1
            try:
                if stalled:
                    writer.write(stalled)
                    await writer.drain()
                stopped = asyncio.create_task(stop.wait())
                closed = asyncio.create_task(reader.read())
                await asyncio.wait({stopped, closed}, return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                closed.cancel()
            except OSError:
                pass
            writer.close()
            await asyncio.sleep(0.1)  # then it comes back

    await asyncio.gather(*(hold() for _ in range(n)))
    return opened


async def measure(
    target: Target,
    world: World,
    seconds: float,
    rate: float,
    n: int,
    address: tuple[str, int] | None = None,
    payload: bytes | None = None,
) -> dict[str, float]:
    stop = asyncio.Event()
    rss_start = target.rss_kib()
    address = address or target.receiver
    payload = stalled_head(world) if payload is None else payload
    holding = asyncio.create_task(crowd(address, payload, n, stop))
    await asyncio.sleep(3)  # the crowd takes its places (and stalls)
    log_before, rss_before = target.log_size(), target.rss_kib()
    peak = rss_before
    sent = accepted = 0
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        sent += 1
        accepted += await asyncio.to_thread(valid_accepted, target, world)
        peak = max(peak, target.rss_kib())
        await asyncio.sleep(max(0.0, started + sent / rate - time.monotonic()))
    stop.set()
    opened = await holding
    await asyncio.sleep(11)  # two receiver sweeps (5 s) after the crowd has gone
    return {
        "rss_kib_start": rss_start,
        "rss_kib_peak": peak,
        "sent": sent,
        "accepted": accepted,
        "share": accepted / sent if sent else 0.0,
        "crowd_opened": opened,
        "log_bytes": target.log_size() - log_before,
        "rss_kib_before": rss_before,
        "rss_kib_after": target.rss_kib(),
    }


def bomb(path: str, compressed: bool = True) -> bytes:
    """A request whose 1.3 KB gzip body inflates to 1 MiB (or, not ``compressed``, a
    plain body of the same size on the wire); its signature is wrong."""
    body = gzip.compress(b'{"pad": "' + b"0" * ((1 << 20) - 11) + b'"}', 9)
    coding = "Content-Encoding: gzip\r\n"
    if not compressed:
        body, coding = b'{"pad": "' + b"0" * (len(body) - 11) + b'"}', ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{coding}X-Webhook-Signature: t=1,v1={'0' * 64}\r\n\r\n"
    )
    return head.encode() + body


async def amplify(target: Target, path: str, n: int, stop: asyncio.Event, compressed: bool) -> int:
    """``n`` connections sending :func:`bomb` back to back until ``stop``; how many sent."""
    raw, sent = bomb(path, compressed), 0

    async def one() -> None:
        nonlocal sent
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(*target.receiver)
                writer.write(raw)
                await reader.read()  # the answer, then the relay closes
                writer.close()
                sent += 1
            except OSError:
                await asyncio.sleep(0.01)

    await asyncio.gather(*(one() for _ in range(n)))
    return sent


async def latencies(target: Target, world: World, seconds: float, rate: float) -> list[float]:
    out: list[float] = []
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        t0 = time.perf_counter()
        if await asyncio.to_thread(valid_accepted, target, world):
            out.append(time.perf_counter() - t0)
        await asyncio.sleep(max(0.0, started + len(out) / rate - time.monotonic()))
    return out


async def measure_gzip(
    target: Target, world: World, seconds: float, rate: float, n: int
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    accepting = f"/webhooks/chert/{OTHER}"
    runs = [
        ("none", "", False),
        ("plain", accepting, False),  # the same flood, uncompressed: what requests cost
        ("refused", world.path, True),
        ("accepting", accepting, True),
    ]
    for name, path, compressed in runs:
        stop = asyncio.Event()
        attack = asyncio.create_task(amplify(target, path, n if path else 0, stop, compressed))
        rss = target.rss_kib()
        got = await latencies(target, world, seconds, rate)
        stop.set()
        bombs = await attack
        q = statistics.quantiles(got, n=100) if len(got) > 1 else [0.0] * 99
        out[name] = {
            "p50_ms": statistics.median(got) * 1000 if got else float("inf"),
            "p99_ms": q[98] * 1000,
            "good": len(got),
            "bombs": bombs,
            "rss_mib_peak_seen": max(rss, target.rss_kib()) / 1024,
        }
    return out


@contextlib.contextmanager
def started(
    max_body: int = Limits.max_body, nofile: int | None = None
) -> Iterator[tuple[Target, World]]:
    """The relay on its shipped ``max_connections`` (1,000) and ``body_timeout`` (30 s),
    and the world the attacks are built in; stopped afterwards."""
    limits = Limits(
        body_timeout=30.0, keepalive_timeout=75.0, max_connections=1000, max_body=max_body
    )
    with tempfile.TemporaryDirectory(prefix="chert-availability-") as tmp:
        target = Target(Path(tmp), limits, nofile=nofile)
        target.start()
        try:
            yield target, World(
                TENANT, SECRET, OTHER, OTHER_SECRET, ADMIN_TOKEN, limits.max_body,
                limits.tolerance, random.Random(1),
            )  # fmt: skip
        finally:
            target.stop()


def main_gzip(args: argparse.Namespace) -> int:
    with started() as (target, world):
        got = asyncio.run(measure_gzip(target, world, args.seconds, args.rate, args.crowd))
    base, flood = got["none"]["p50_ms"], got["plain"]["p50_ms"]
    worst = 0.0
    for name, row in got.items():
        ratio = row["p50_ms"] / base
        if name in ("refused", "accepting"):
            worst = max(worst, row["p50_ms"] / flood)
        print(
            f"{name:>9}: good webhooks p50 {row['p50_ms']:.2f} ms (x{ratio:.2f} of none, "
            f"x{row['p50_ms'] / flood:.2f} of the plain flood), p99 {row['p99_ms']:.2f} ms, "
            f"{row['good']:.0f} answered; {row['bombs']:.0f} attack requests answered "
            f"on {args.crowd} connections"
        )
    return 0 if worst <= GZIP_GOAL else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=10.0, help="good webhooks a second")
    p.add_argument("--crowd", type=int, help="connections held (1000; 16 for gzip)")
    p.add_argument(
        "--attack",
        choices=["slow", "gzip", "bodies", "admin"],
        default="slow",
        help="slow: stalled heads; bodies: nearly complete 1 MiB bodies; admin: idle "
        "admin connections under an open-file limit of 1,024; gzip: see above",
    )
    args = p.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # this process holds the crowd
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    if args.attack == "gzip":
        args.crowd = args.crowd or 16
        return main_gzip(args)
    args.crowd = args.crowd or {"slow": 1000, "bodies": 900, "admin": 1500}[args.attack]
    max_body = 1 << 20 if args.attack == "bodies" else Limits.max_body
    with started(max_body, 1024 if args.attack == "admin" else None) as (target, world):
        address, payload, what = None, None, "stalled connections"
        if args.attack == "bodies":
            payload, what = nearly_whole(world, 1 << 20), "nearly complete 1 MiB bodies"
        elif args.attack == "admin":
            address, payload, what = target.admin, b"", "idle admin connections"
        got = asyncio.run(
            measure(target, world, args.seconds, args.rate, args.crowd, address, payload)
        )
    print(
        f"good webhooks: {got['accepted']:.0f} of {got['sent']:.0f} accepted "
        f"({got['share']:.1%}) while {args.crowd} {what} were held "
        f"({got['crowd_opened']:.0f} opened in all); relay log +{got['log_bytes']:.0f} B; "
        f"RSS {got['rss_kib_start'] / 1024:.1f} at start, {got['rss_kib_before'] / 1024:.1f} "
        f"with the crowd in place, {got['rss_kib_peak'] / 1024:.1f} at peak, "
        f"{got['rss_kib_after'] / 1024:.1f} MiB after it left"
    )
    return 0 if got["share"] >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
