"""Scaling out on one Redis primary: 1 receiver + 1 worker against 2 + 2, same run.

One redis-server (AOF, ``appendfsync always``) on loopback; ``chert-relay serve``
processes (each on its own webhook port, from one configuration file) and ``chert-relay
worker`` processes (each with its own ``--admin-listen``); the sink of
``bench/e2e.py`` in its own process. wrk (one per receiver, the connections split
between them) replays pre-signed webhooks for ``--duration`` seconds; then the run waits
until every accepted event has reached the sink. Prints the webhooks accepted per second
and the end-to-end rate (distinct events delivered / first webhook to last sink 2xx)
for each shape, alternating the shapes in each round.

    python bench/scaleout.py [--duration 10] [--connections 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from e2e import get_json, ingested_new, wait_delivered, write_config  # noqa: E402
from receiver import (  # noqa: E402
    WRK_SCRIPT,
    run_wrk,
    stop,
    wait_http,
    wait_port,
    write_data,
)

from relay.store.embedded import EmbeddedRedis, free_port  # noqa: E402


def shape(
    work: Path,
    sink: str,
    script: Path,
    data: Path,
    receivers: int,
    workers: int,
    args: argparse.Namespace,
) -> tuple[float, float]:
    get_json(f"{sink}/reset", "POST")
    work.mkdir()
    redis = EmbeddedRedis(work / "redis", port=free_port())
    asyncio.run(redis.start())
    procs: list[subprocess.Popen[bytes]] = []
    try:
        admin = free_port()
        cfg = write_config(work, f"{sink}/hook", free_port(), admin, redis.url, 0.05)
        base = [sys.executable, "-m", "relay", "--log-level", "warning", "--config", str(cfg)]
        ports, admins = [], []
        for _ in range(receivers):
            port, radmin = free_port(), free_port()
            env = {**os.environ, "CHERT_RELAY__SERVER__LISTEN": f'"127.0.0.1:{port}"'}
            procs.append(
                subprocess.Popen(
                    [*base, "serve", "--admin-listen", f"127.0.0.1:{radmin}"], cwd=ROOT, env=env
                )
            )
            ports.append(port)
            admins.append(radmin)
        for _ in range(workers):
            procs.append(
                subprocess.Popen(
                    [*base, "worker", "--admin-listen", f"127.0.0.1:{free_port()}"], cwd=ROOT
                )
            )
        for port, radmin in zip(ports, admins, strict=True):
            wait_http(f"http://127.0.0.1:{radmin}/readyz")
            wait_port(port)
        started = time.time()
        results: list[dict[str, float]] = []
        per = max(1, args.connections // receivers)

        def one(port: int) -> None:
            results.append(run_wrk(port, script, data, args.duration, per))

        threads = [threading.Thread(target=one, args=(p,)) for p in ports]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        accepted, previous = sum(ingested_new(a) for a in admins), -1
        while accepted != previous:
            time.sleep(0.5)
            accepted, previous = sum(ingested_new(a) for a in admins), accepted
        stats = wait_delivered(sink, accepted)
    finally:
        for p in procs:
            stop(p)
        asyncio.run(redis.stop())
    rps = sum(r["rps"] for r in results)
    e2e = stats["unique"] / (stats["last"] - started)
    return rps, e2e


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32, help="wrk connections in all")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=60_000)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        script, data = work / "bench.lua", work / "data.lua"
        script.write_text(WRK_SCRIPT)
        write_data(data, args.requests)
        sink_port = free_port()
        sink_proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "e2e.py"), "--sink", str(sink_port)]
        )
        sink = f"http://127.0.0.1:{sink_port}"
        try:
            wait_port(sink_port)
            for r in range(args.rounds):
                for receivers, workers in ((1, 1), (2, 2)):
                    rps, e2e = shape(
                        work / f"r{r}-{receivers}x{workers}",
                        sink,
                        script,
                        data,
                        receivers,
                        workers,
                        args,
                    )
                    print(
                        f"round {r + 1}: {receivers} receiver(s) + {workers} worker(s): "
                        f"webhooks accepted {rps:8.0f}/s, end to end {e2e:8.0f} events/s"
                    )
        finally:
            stop(sink_proc)


if __name__ == "__main__":
    main()
