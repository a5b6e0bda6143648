"""A Redis failover under load, measured: events acknowledged, lost, and how long the relay
took to acknowledge webhooks again.

A primary, ``--replicas`` replicas (AOF, ``appendfsync always``) and three sentinels on
loopback (``down-after-milliseconds 1000``); ``chert-relay run`` finds the primary through
them, with ``min_replica_acks = 1``. A load generator sends webhooks at ``--rate`` as
Chert does (a non-2xx or a connection error is tried again, 3 attempts in all); after
``--before`` seconds the primary is SIGKILLed. With one replica, the killed node is
started again once the sentinels have promoted the replica (the new primary needs a
replica to acknowledge ingests). The run ends ``--after`` seconds after ingest works
again; then every acknowledged event must reach the sink.

    python bench/failover.py [--runs 5] [--replicas 2] [--rate 100]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from tests.support.common import TENANT, envelope, signed  # noqa: E402
from tests.support.delivery import Sink, sinks  # noqa: E402
from tests.support.process import RelayProcess  # noqa: E402
from tests.support.sentinel import deployment  # noqa: E402


async def until(check: object, timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()  # type: ignore[operator]
        if asyncio.iscoroutine(found):
            found = await found
        if found:
            return found
        await asyncio.sleep(0.05)
    raise SystemExit("timed out")


async def one_run(
    work: Path, replicas: int, rate: float, before: float, after: float
) -> dict[str, float]:
    async with deployment(work / "ha", replicas=replicas) as d, sinks(Sink()) as (sink,):
        path, port, admin = d.relay_config(work / "relay.toml", sink.url)
        relay = RelayProcess(path, "run").start()
        try:
            await relay.wait_ready(f"http://127.0.0.1:{admin}")
            url = f"http://127.0.0.1:{port}/webhooks/chert/{TENANT}"
            acked: dict[str, float] = {}
            sent: dict[
                str, float
            ] = {}  # first sent: "ready again" counts webhooks sent after the kill
            stop = asyncio.Event()

            async def send(session: aiohttp.ClientSession, event_id: str) -> None:
                sent[event_id] = time.monotonic()
                raw, headers = signed(envelope(event_id))
                for attempt in range(3):
                    try:
                        async with session.post(url, data=raw, headers=headers) as resp:
                            if 200 <= resp.status < 300:
                                acked[event_id] = time.monotonic()
                                return
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.5 * (attempt + 1))

            async def load(session: aiohttp.ClientSession) -> None:
                tasks: set[asyncio.Task[None]] = set()
                n = 0
                while not stop.is_set():
                    t = asyncio.create_task(send(session, f"fo:{n}"))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                    n += 1
                    await asyncio.sleep(1 / rate)
                await asyncio.gather(*tasks)

            async with aiohttp.ClientSession() as session:
                loader = asyncio.create_task(load(session))
                await asyncio.sleep(before)
                old = await d.primary_address()
                assert old is not None
                killed_at = time.monotonic()
                d.node(old).kill()

                async def promoted() -> str | None:
                    now = await d.primary_address()
                    return now if now not in (None, old) else None

                await until(promoted, 60)
                promoted_s = time.monotonic() - killed_at
                if replicas == 1:
                    await d.node(old).start()

                def after_kill() -> list[float]:
                    return [t for e, t in acked.items() if sent[e] > killed_at]

                await until(after_kill, 120)
                ready_s = min(after_kill()) - killed_at
                await asyncio.sleep(after)
                stop.set()
                await loader
            await until(lambda: set(acked) <= set(sink.ids()), 120)
            lost = len(set(acked) - set(sink.ids()))
            dupes = len(sink.ids()) - len(set(sink.ids()))
            return {
                "acked": len(acked),
                "lost": lost,
                "duplicates": dupes,
                "promoted_s": promoted_s,
                "ready_s": ready_s,
            }
        finally:
            relay.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--rate", type=float, default=100.0, help="webhooks per second")
    ap.add_argument("--before", type=float, default=5.0, help="seconds of load before the kill")
    ap.add_argument("--after", type=float, default=5.0, help="seconds of load once ready again")
    args = ap.parse_args()
    rows = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            row = asyncio.run(one_run(Path(tmp), args.replicas, args.rate, args.before, args.after))
        rows.append(row)
        print(
            f"run {i + 1}: {row['acked']:.0f} acked, {row['lost']:.0f} lost, "
            f"{row['duplicates']:.0f} duplicate deliveries, primary promoted after "
            f"{row['promoted_s']:.1f} s, webhooks acknowledged again after {row['ready_s']:.1f} s"
        )
    print(
        f"{args.runs} run(s), {args.replicas} replica(s), {args.rate:g} webhooks/s: "
        f"{sum(r['acked'] for r in rows):.0f} acked, {sum(r['lost'] for r in rows):.0f} lost; "
        f"acknowledged again after {min(r['ready_s'] for r in rows):.1f}-"
        f"{max(r['ready_s'] for r in rows):.1f} s"
    )


if __name__ == "__main__":
    main()
