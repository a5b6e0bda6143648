"""What setting a backlog aside costs Redis: AOF bytes, commands and script time per
delivery a worker's reads set aside in its sink's waiting line.

    python bench/setaside.py [--events 3000]

``--events`` events are queued for one sink with ``concurrency = 1`` whose one request
hangs; a worker starts, takes the first and sets every other aside (``take.lua`` with
``lib/claim.lua`` and ``lib/wait.lua``). The AOF is rewritten first, so that its growth
until the last is set aside is what the setting aside wrote — and, with
``appendfsync always``, what the fsyncs that every other client's writes wait behind
had to carry while a large backlog was being set aside. Redis' command statistics,
reset at the same moment, give the commands the scripts ran per delivery and the time
Redis spent in the scripts per delivery, and the time from the worker's start until
every delivery but the first is set aside is printed too. The first two figures are
counts, not times: they do not depend on the machine's load; the last two do, so
compare them only with a run of the other code in the same session. The sink's
``timeout`` is long enough that the one request never ends while this is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay.keys import Keys  # noqa: E402
from relay.store.backlog import waiting  # noqa: E402
from relay.store.embedded import EmbeddedRedis, free_port  # noqa: E402
from tests.support.common import TENANT, wait_for  # noqa: E402
from tests.support.delivery import (  # noqa: E402
    Received,
    Sink,
    config_with,
    ingest,
    runtime,
    sink_conf,
    sinks,
    worker,
)


async def _aof_bytes(client: Redis) -> int:
    return int((await client.info("persistence"))["aof_current_size"])


async def _rewritten(client: Redis) -> None:
    await client.execute_command("BGREWRITEAOF")

    async def done() -> bool:
        info = await client.info("persistence")
        return not int(info["aof_rewrite_in_progress"]) and not int(info["aof_rewrite_scheduled"])

    await wait_for(done, 60)


def _script_work(stats: dict[str, Any]) -> tuple[int, int]:
    """Commands run and microseconds spent in scripts (EVALSHA), from INFO commandstats."""
    scripts = sum(int(v["usec"]) for k, v in stats.items() if k.startswith("cmdstat_eval"))
    calls = sum(
        int(v["calls"])
        for k, v in stats.items()
        if not k.startswith(("cmdstat_eval", "cmdstat_script", "cmdstat_info", "cmdstat_config"))
    )
    return calls, scripts


async def measure(events: int) -> dict[str, float]:
    async def hang(_s: Sink, _r: Received) -> tuple[int, dict[str, str]]:
        await asyncio.sleep(120)
        return 200, {}

    with tempfile.TemporaryDirectory(prefix="setaside-") as tmp:
        redis = EmbeddedRedis(Path(tmp) / "redis", port=free_port())
        await redis.start()
        client = Redis.from_url(redis.url)
        try:
            async with sinks(Sink(hang)) as (s,):
                cfg = config_with(redis.url, [sink_conf("s", s.url, concurrency=1, timeout=100)])
                rt = runtime(client, cfg)
                await ingest(rt, [f"e{i:06d}" for i in range(events)])
                await _rewritten(client)
                before = await _aof_bytes(client)
                await client.config_resetstat()
                keys = Keys(cfg.redis.key_prefix)

                async def all_aside() -> bool:
                    return (await waiting(client, keys)).get((TENANT, "s"), 0) >= events - 1

                started = time.monotonic()
                async with worker(rt):
                    await wait_for(all_aside, 120)
                    took = time.monotonic() - started
                    after = await _aof_bytes(client)
                    calls, usec = _script_work(await client.info("commandstats"))
            n = events - 1
            return {
                "aof_bytes": (after - before) / n,
                "commands": calls / n,
                "script_us": usec / n,
                "seconds": took,
            }
        finally:
            await client.aclose()
            await redis.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=3000)
    args = ap.parse_args()
    per = asyncio.run(measure(args.events))
    print(
        f"per delivery set aside ({args.events:,} events): {per['aof_bytes']:.0f} AOF bytes, "
        f"{per['commands']:.1f} Redis commands, {per['script_us']:.1f} us in scripts; "
        f"all set aside {per['seconds']:.2f} s after the worker started"
    )


if __name__ == "__main__":
    main()
