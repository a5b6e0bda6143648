"""Delivery throughput: the worker against a plain aiohttp client, same run, same sink.

- **baseline**: a plain Python aiohttp client (its own process) POSTs the same event
  bodies to the same sink (``bench/e2e.py``'s, its own process), each request signed
  with the Standard Webhooks scheme as the relay signs it, ``--concurrency`` at once
  (the worker's ``max_jobs``).
- **drain**: ``--events`` events are queued in a redis-server (AOF, ``appendfsync
  always``) for one sink (``concurrency`` = ``max_jobs``), then one ``chert-relay
  worker`` process starts; the rate is distinct events at the sink over the time from
  the worker's start to the last 2xx. With ``--sinks 3`` each event goes to three sinks
  (deliveries/s and events/s). During the drain the worker's RSS and Redis' memory are
  sampled: bytes per queued delivery, and whether the worker's memory stays flat.
- **steady**: events are ingested at ``--steady-rate`` while one worker delivers, for
  ``--steady-seconds``; the delivery rate must keep up (reported as a ratio to the
  ingest rate), and p50/p99 of ingest → sink 2xx are reported.

Prints each rate and its ratio to the baseline.

    python bench/drain.py [--events 20000] [--concurrency 200] [--sinks 1] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from e2e import get_json, wait_delivered  # noqa: E402
from receiver import stop, wait_port  # noqa: E402
from redis.asyncio import Redis  # noqa: E402

from relay.config_load import parse_config  # noqa: E402
from relay.ingest import envelope  # noqa: E402
from relay.ingest.ingestor import Ingestor  # noqa: E402
from relay.store.embedded import EmbeddedRedis, free_port  # noqa: E402

TENANT = "acme-7a3f"
SINK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def body(event_id: str) -> bytes:
    return json.dumps(
        {
            "event": "message.received",
            "event_id": event_id,
            "partner_id": TENANT,
            "timestamp": "2026-05-24T01:35:34.000Z",
            "api_version": "v1",
            "data": {
                "chat": {"id": "17f6e9ed", "is_group": False},
                "message": {
                    "id": event_id,
                    "direction": "inbound",
                    "parts": [{"type": "text", "value": "Sure, what time? " * 30}],
                },
            },
        }
    ).encode()


# --- the baseline client (its own process) ----------------------------------------------


def baseline_main(url: str, n: int, concurrency: int) -> None:
    import aiohttp

    key = base64.b64decode(SINK_SECRET.removeprefix("whsec_"))

    async def run() -> None:
        bodies = [(f"base:{i}", body(f"base:{i}")) for i in range(n)]
        queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        for item in bodies:
            queue.put_nowait(item)
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one() -> None:
                while not queue.empty():
                    event_id, data = queue.get_nowait()
                    now = int(time.time())
                    digest = hmac.digest(
                        key, b"%s.%d.%s" % (event_id.encode(), now, data), hashlib.sha256
                    )
                    headers = {
                        "Content-Type": "application/json",
                        "webhook-id": event_id,
                        "webhook-timestamp": str(now),
                        "webhook-signature": "v1," + base64.b64encode(digest).decode(),
                    }
                    async with session.post(url, data=data, headers=headers) as resp:
                        await resp.read()

            await asyncio.gather(*(one() for _ in range(concurrency)))

    asyncio.run(run())


def baseline(sink: str, n: int, concurrency: int) -> float:
    get_json(f"{sink}/reset", "POST")
    started = time.time()
    subprocess.run(
        [sys.executable, __file__, "--baseline", f"{sink}/hook", str(n), str(concurrency)],
        check=True,
    )
    stats = wait_delivered(sink, n)
    return float(stats["unique"] / (stats["last"] - started))


# --- the relay ----------------------------------------------------------------------------


def config(
    redis_url: str, sink: str, sinks: int, concurrency: int, poll_delay: float
) -> dict[str, Any]:
    return {
        "redis": {"url": redis_url},
        "admin": {"listen": "127.0.0.1:0", "worker_listen": "127.0.0.1:0"},
        "worker": {"max_jobs": concurrency, "poll_delay": poll_delay},
        "tenants": [
            {
                "slug": TENANT,
                "webhook_secrets": ["x" * 32],
                "poll": {"mode": "off"},
                "sinks": [
                    {
                        "name": f"s{i}",
                        "url": f"{sink}/hook/{i}",
                        "secret": SINK_SECRET,
                        "concurrency": concurrency,
                    }
                    for i in range(sinks)
                ],
            }
        ],
    }


def toml(data: dict[str, Any]) -> str:
    def value(v: object) -> str:
        return json.dumps(v) if not isinstance(v, list) else "[" + ", ".join(map(value, v)) + "]"

    lines = []
    for section, values in data.items():
        if section != "tenants":
            lines.append(f"[{section}]")
            lines += [f"{k} = {value(v)}" for k, v in values.items()]
    for t in data["tenants"]:
        lines.append("[[tenants]]")
        lines += [f"{k} = {value(v)}" for k, v in t.items() if k not in ("sinks", "poll")]
        lines.append('[tenants.poll]\nmode = "off"')
        for s in t["sinks"]:
            lines.append("[[tenants.sinks]]")
            lines += [f"{k} = {value(v)}" for k, v in s.items()]
    return "\n".join(lines) + "\n"


async def fill(data: dict[str, Any], n: int, run: str, at: float | None = None) -> int:
    """Queue ``n`` events (at ``at`` events/s, or as fast as possible); Redis bytes used."""
    cfg = parse_config(data, env={})
    client: Redis = Redis.from_url(data["redis"]["url"])
    before = int((await client.info("memory"))["used_memory"])
    ingestor = Ingestor(client, cfg)
    if at is None:
        for i in range(0, n, 1000):
            events = [envelope.from_body(body(f"{run}:{j}")) for j in range(i, min(n, i + 1000))]
            await asyncio.gather(*(ingestor.ingest(TENANT, e, "webhook") for e in events))
    else:
        start = time.monotonic()
        for j in range(n):
            await ingestor.ingest(TENANT, envelope.from_body(body(f"{run}:{j}")), "webhook")
            ahead = start + (j + 1) / at - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
    await ingestor.drain()
    used = int((await client.info("memory"))["used_memory"]) - before
    await client.aclose()
    return used


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def worker(path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "relay", "--log-level", "warning", "-c", str(path), "worker"],
        cwd=ROOT,
    )


def drain(work: Path, sink: str, args: argparse.Namespace) -> dict[str, float]:
    get_json(f"{sink}/reset", "POST")
    work.mkdir()
    redis = EmbeddedRedis(work / "redis", port=free_port())
    asyncio.run(redis.start())
    try:
        data = config(redis.url, sink, args.sinks, args.concurrency, args.poll_delay)
        path = work / "relay.toml"
        path.write_text(toml(data))
        used = asyncio.run(fill(data, args.events, work.name))
        started = time.time()
        proc = worker(path)
        rss = []
        try:
            expected = args.events * args.sinks
            while True:
                stats = get_json(f"{sink}/stats")
                rss.append(rss_kb(proc.pid))
                if stats["requests"] >= expected and stats["unique"] >= args.events:
                    break
                time.sleep(0.5)
        finally:
            stop(proc)
    finally:
        asyncio.run(redis.stop())
    span = stats["last"] - started
    return {
        "events_s": args.events / span,
        "deliveries_s": stats["requests"] / span,
        "bytes_per_delivery": used / (args.events * args.sinks),
        "rss_first_mb": rss[1] / 1024 if len(rss) > 1 else 0.0,
        "rss_max_mb": max(rss) / 1024,
        "rss_last_mb": rss[-1] / 1024,
    }


def steady(work: Path, sink: str, args: argparse.Namespace) -> dict[str, float]:
    get_json(f"{sink}/reset", "POST")
    work.mkdir()
    redis = EmbeddedRedis(work / "redis", port=free_port())
    asyncio.run(redis.start())
    n = int(args.steady_rate * args.steady_seconds)
    try:
        data = config(redis.url, sink, 1, args.concurrency, args.poll_delay)
        path = work / "relay.toml"
        path.write_text(toml(data))
        proc = worker(path)
        try:
            time.sleep(1.0)  # the worker's start-up, before the events
            started = time.time()
            asyncio.run(fill(data, n, work.name, at=args.steady_rate))
            stats = wait_delivered(sink, n)
        finally:
            stop(proc)
    finally:
        asyncio.run(redis.stop())
    return {"delivered_s": stats["unique"] / (stats["last"] - started)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--sinks", type=int, default=1)
    ap.add_argument("--poll-delay", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steady-rate", type=float, default=0.0, help="0: no steady-flow run")
    ap.add_argument("--steady-seconds", type=float, default=20.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sink_port = free_port()
        sink_proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "e2e.py"), "--sink", str(sink_port)]
        )
        sink = f"http://127.0.0.1:{sink_port}"
        try:
            wait_port(sink_port)
            for r in range(args.rounds):
                base = baseline(sink, args.events, args.concurrency)
                got = drain(work / f"drain{r}", sink, args)
                print(
                    f"round {r + 1}: baseline {base:.0f} requests/s; drain of {args.events} "
                    f"events to {args.sinks} sink(s): {got['deliveries_s']:.0f} deliveries/s "
                    f"({got['events_s']:.0f} events/s): ratio {got['deliveries_s'] / base:.2f}; "
                    f"Redis {got['bytes_per_delivery']:.0f} B per queued delivery; worker RSS "
                    f"{got['rss_first_mb']:.0f} MB at start, {got['rss_max_mb']:.0f} MB at most, "
                    f"{got['rss_last_mb']:.0f} MB at the end"
                )
                if args.steady_rate:
                    s = steady(work / f"steady{r}", sink, args)
                    print(
                        f"round {r + 1}: steady flow at {args.steady_rate:.0f} events/s: "
                        f"delivered {s['delivered_s']:.0f}/s (ratio to baseline "
                        f"{s['delivered_s'] / base:.2f}, to the offered rate "
                        f"{s['delivered_s'] / args.steady_rate:.2f})"
                    )
        finally:
            stop(sink_proc)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--baseline":
        baseline_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
