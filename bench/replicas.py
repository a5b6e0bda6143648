"""Ingest with and without replica acknowledgement, same run.

A primary and one replica (both redis-server with AOF, ``appendfsync always``) on
loopback; ``chert-relay serve`` on the primary, once with ``min_replica_acks = 0`` (a
202 once the primary has fsynced the event) and once with ``min_replica_acks = 1`` (a
``WAIT 1`` after every ingest batch: a 202 once a replica has it too), alternating in
each round, fresh servers each time. wrk replays the same pre-signed webhooks as
``bench/receiver.py``. Prints requests/s, p50/p99 and the ratio of the two.

    python bench/replicas.py [--duration 10] [--connections 32,128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from receiver import WRK_SCRIPT, run_wrk, start_relay, stop, write_data  # noqa: E402
from redis.asyncio import Redis  # noqa: E402

from relay.store.embedded import EmbeddedRedis, free_port  # noqa: E402


async def pair(work: Path) -> tuple[EmbeddedRedis, EmbeddedRedis]:
    primary = EmbeddedRedis(work / "primary", port=free_port())
    await primary.start()
    replica = EmbeddedRedis(
        work / "replica", port=free_port(), extra=("--replicaof", "127.0.0.1", str(primary.port))
    )
    await replica.start()
    client: Redis = Redis.from_url(primary.url)
    try:
        for _ in range(600):  # the first sync waits for repl-diskless-sync-delay (5 s)
            info = await client.info("replication")
            if any(k.startswith("slave") and v.get("state") == "online" for k, v in info.items()):
                break
            await asyncio.sleep(0.05)
        else:
            raise SystemExit("the replica did not come online")
    finally:
        await client.aclose()
    return primary, replica


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", default="32,128")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=120_000)
    args = ap.parse_args()
    conns = [int(c) for c in args.connections.split(",")]
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        script, data = work / "bench.lua", work / "data.lua"
        script.write_text(WRK_SCRIPT)
        size = write_data(data, args.requests)
        print(f"{args.requests} pre-signed requests, body {size} bytes, {args.rounds} round(s)")
        results: dict[tuple[int, int], list[dict[str, float]]] = {}
        for r in range(args.rounds):
            for c in conns:
                for acks in (0, 1):
                    run = work / f"r{r}-c{c}-a{acks}"
                    run.mkdir()
                    primary, replica = asyncio.run(pair(run))
                    try:
                        redis = f'url = "{primary.url}"\nmin_replica_acks = {acks}'
                        proc, port = start_relay(run, redis)
                        try:
                            res = run_wrk(port, script, data, args.duration, c)
                        finally:
                            stop(proc)
                    finally:
                        asyncio.run(replica.stop())
                        asyncio.run(primary.stop())
                    results.setdefault((acks, c), []).append(res)
                    print(
                        f"  round {r + 1} c={c:<4d} min_replica_acks={acks}: "
                        f"{res['rps']:8.0f} req/s  p50 {res['p50_ms']:.2f} ms  "
                        f"p99 {res['p99_ms']:.2f} ms  non-2xx {res['non2xx']:.0f}"
                    )
        for c in conns:
            zero = max(results[0, c], key=lambda x: x["rps"])
            one = max(results[1, c], key=lambda x: x["rps"])
            ratios = [
                b["rps"] / a["rps"] for a, b in zip(results[0, c], results[1, c], strict=True)
            ]
            print(
                f"c={c}: without acks {zero['rps']:.0f} req/s (p99 {zero['p99_ms']:.2f} ms), "
                f"with 1 replica ack {one['rps']:.0f} req/s (p99 {one['p99_ms']:.2f} ms): "
                f"ratio {one['rps'] / zero['rps']:.2f} "
                f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})"
            )


if __name__ == "__main__":
    main()
