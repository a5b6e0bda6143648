"""CPU per group-committed script call: ingests and delivery finishes, in process.

The receiver and drain benchmarks measure whole processes, and on a shared machine their
rates move with the neighbours; this one isolates the Redis wire (batching, encoding,
the connection and its reply reader) and reports the relay's own CPU time per call,
the steadier figure. It runs ``--events`` ingests (``Ingestor.ingest``, 128 at once) and
as many finishes (``Steps.finish``, 200 at once: stale ones, which the script checks and
refuses, so no job is needed) against a private redis-server on a Unix socket with
``appendfsync always``. ``--tree`` runs another checkout's code (an A/B in one session,
alternating runs):

    git worktree add /tmp/old <commit>
    python bench/script_calls.py; python bench/script_calls.py --tree /tmp/old; ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--tree", default=str(Path(__file__).resolve().parent.parent))
ap.add_argument("--events", type=int, default=30_000)
ARGS = ap.parse_args()
sys.path.insert(0, ARGS.tree)
os.chdir(ARGS.tree)

from redis.asyncio import Redis  # noqa: E402

from relay.config import parse_config  # noqa: E402
from relay.delivery.steps import Finish, Ref, Steps  # noqa: E402
from relay.ingest.envelope import from_body  # noqa: E402
from relay.ingest.ingestor import Ingestor  # noqa: E402
from relay.keys import Keys  # noqa: E402
from relay.store.embedded import EmbeddedRedis  # noqa: E402
from tests.support.common import TENANT, config_dict, envelope  # noqa: E402

WARM_UP = 2000


async def timed(calls: list[Any], limit: int) -> tuple[float, float]:
    """Run the ``calls`` (coroutine functions), ``limit`` at once: (per second, CPU µs each)."""
    sem = asyncio.Semaphore(limit)

    async def one(call: Any) -> None:
        async with sem:
            await call()

    await asyncio.gather(*(one(c) for c in calls[:WARM_UP]))
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(c) for c in calls[WARM_UP:]))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    n = len(calls) - WARM_UP
    return n / wall, 1e6 * cpu / n


async def main() -> None:
    directory = Path(tempfile.mkdtemp(prefix="calls", dir="/tmp"))  # a short socket path
    server = EmbeddedRedis(directory / "redis")
    url = await server.start()
    client: Redis = Redis.from_url(url)
    try:
        config = parse_config(config_dict(redis_url=url))
        n = ARGS.events + WARM_UP
        ingestor = Ingestor(client, config)
        events = [from_body(json.dumps(envelope(f"ev-{i}")).encode()) for i in range(n)]
        ingests = [lambda e=e: ingestor.ingest(TENANT, e, "webhook") for e in events]
        rate, cpu = await timed(ingests, 128)
        print(f"ingest: {rate:,.0f} events/s, relay CPU {cpu:.1f} µs per event")
        await ingestor.drain()

        steps = Steps(client, Keys(config.redis.key_prefix), config.worker)
        ok = Finish("ok", status=200, effect="success")
        refs = [Ref(TENANT, "crm", f"x{i}", f"x:{TENANT}:crm:x{i}", None, "t.1") for i in range(n)]
        finishes = [lambda r=r: steps.finish(r, ok) for r in refs]
        rate, cpu = await timed(finishes, 200)
        print(f"finish: {rate:,.0f} finishes/s, worker CPU {cpu:.1f} µs per finish")
        await steps.drain()
    finally:
        await client.aclose()
        await server.stop()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
