"""Delivery throughput: the worker against a plain aiohttp client, same run, same sink.

- **baseline**: a plain Python aiohttp client (its own process) POSTs the same event
  bodies to the same sink (``bench/e2e.py``'s, its own process), each request signed
  with the Standard Webhooks scheme as the relay signs it, ``--concurrency`` at once
  (the worker's ``max_jobs``).
- **drain**: ``--events`` events are queued in a redis-server (AOF, ``appendfsync
  always``) for one sink (``concurrency`` = ``max_jobs``, unless ``--max-jobs``), then
  one ``chert-relay worker`` process starts; the rate is distinct events at the sink
  over the time from the worker's start to the last 2xx. With ``--sinks 3`` each event
  goes to three sinks (deliveries/s and events/s). During the drain the worker's RSS and
  Redis' memory are sampled: bytes per queued delivery, and whether the worker's memory
  stays flat.
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
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from e2e import get_json, pct, wait_delivered  # noqa: E402
from receiver import stop, wait_port  # noqa: E402
from redis.asyncio import Redis  # noqa: E402

from relay.config import parse_config  # noqa: E402
from relay.ingest import envelope  # noqa: E402
from relay.ingest.ingestor import Ingestor  # noqa: E402
from relay.store.embedded import EmbeddedRedis, free_port  # noqa: E402

TENANT = "acme-7a3f"
SINK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def body(event_id: str, tenant: str = TENANT, event: str = "message.received") -> bytes:
    return json.dumps(
        {
            "event": event,
            "event_id": event_id,
            "partner_id": tenant,
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


def baseline(sink: str, n: int, concurrency: int) -> dict[str, float]:
    """The plain client's rate, and CPU ms per request of the client and of the sink."""
    get_json(f"{sink}/reset", "POST")
    sink_cpu = cpu_s(SINK_PID[0])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(
        [sys.executable, __file__, "--baseline", f"{sink}/hook", str(n), str(concurrency)],
        check=True,
    )
    stats = wait_delivered(sink, n)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {
        "rate": float(stats["unique"] / (stats["last"] - stats["first"])),
        "client_ms": client * 1000 / n,
        "sink_ms": (cpu_s(SINK_PID[0]) - sink_cpu) * 1000 / n,
    }


# --- the relay ----------------------------------------------------------------------------


def config(
    redis_url: str,
    sink: str,
    sinks: int,
    concurrency: int | None,
    poll_delay: float | None,
    max_jobs: int | None,
) -> dict[str, Any]:
    """One tenant with ``sinks`` sinks of ``concurrency``, one worker setting
    ``max_jobs`` and ``poll_delay``. A ``None`` is left out: the shipped default."""
    worker = {"max_jobs": max_jobs, "poll_delay": poll_delay}
    worker = {k: v for k, v in worker.items() if v is not None}
    cap = {} if concurrency is None else {"concurrency": concurrency}
    return {
        "redis": {"url": redis_url},
        "admin": {"listen": "127.0.0.1:0", "worker_listen": f"127.0.0.1:{WORKER_ADMIN[0]}"},
        "worker": worker,
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
                        **cap,
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


async def fill(
    data: dict[str, Any],
    n: int,
    run: str,
    at: float | None = None,
    acked: dict[str, float] | None = None,
    event: Callable[[int], tuple[str, str, bytes]] | None = None,
) -> int:
    """Queue ``n`` events (at ``at`` events/s, or as fast as possible); Redis bytes used.
    Paced, each event's ingest (its 202, were it a webhook) is timed into ``acked``.
    ``event(j)``: the j-th event's tenant, id and body (by default ``TENANT``'s
    ``message.received`` with id ``{run}:{j}``)."""
    make = event or (lambda j: (TENANT, f"{run}:{j}", body(f"{run}:{j}")))
    cfg = parse_config(data, env={})
    client: Redis = Redis.from_url(data["redis"]["url"])
    before = int((await client.info("memory"))["used_memory"])
    ingestor = Ingestor(client, cfg)
    if at is None:
        for i in range(0, n, 1000):
            events = [make(j) for j in range(i, min(n, i + 1000))]
            await asyncio.gather(
                *(ingestor.ingest(t, envelope.from_body(b), "webhook") for t, _, b in events)
            )
    else:

        async def one(j: int) -> None:
            tenant, event_id, raw = make(j)
            await ingestor.ingest(tenant, envelope.from_body(raw), "webhook")
            if acked is not None:
                acked[event_id] = time.time()

        start = time.monotonic()
        pending: set[asyncio.Task[None]] = set()
        for j in range(n):
            task = asyncio.create_task(one(j))
            pending.add(task)
            task.add_done_callback(pending.discard)
            ahead = start + (j + 1) / at - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
        await asyncio.gather(*pending)
    await ingestor.drain()
    used = int((await client.info("memory"))["used_memory"]) - before
    await client.aclose()
    return used


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


SINK_PID: list[int] = []
WORKER_ADMIN = [free_port()]  # the worker's admin listener: its metrics, read at the end
PROFILE: list[str] = []  # --profile FILE: py-spy records the worker, raw stacks to FILE


def worker(path: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "relay", "--log-level", "warning", "-c", str(path), "worker"]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    if PROFILE:
        found = Path(sys.executable).with_name("py-spy")
        spy = [str(found) if found.exists() else "py-spy", "record", "--format", "raw"]
        spy += ["--idle", "--nonblocking"]
        subprocess.Popen([*spy, "-o", PROFILE[0], "--pid", str(proc.pid)])
    return proc


def drain(
    work: Path,
    sink: str,
    args: argparse.Namespace,
    timeout: float = 900.0,
    sections: dict[str, dict[str, Any]] | None = None,
) -> dict[str, float]:
    """``sections``: more config sections (e.g. ``{"event_log": {"enabled": False}}``)."""
    get_json(f"{sink}/reset", "POST")
    work.mkdir()
    redis = EmbeddedRedis(work / "redis", port=free_port())
    asyncio.run(redis.start())
    try:
        data = config(redis.url, sink, args.sinks, args.concurrency, args.poll_delay, args.max_jobs)
        data.update(sections or {})
        path = work / "relay.toml"
        path.write_text(toml(data))
        used = asyncio.run(fill(data, args.events, work.name))
        assert redis.process is not None
        cpu = {"redis": cpu_s(redis.process.pid), "sink": cpu_s(SINK_PID[0])}
        proc = worker(path)
        rss = []
        try:
            expected = args.events * args.sinks
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    got = get_json(f"{sink}/stats")["unique"]
                    raise SystemExit(f"drain: {got} of {args.events} delivered, worker stopped")
                stats = get_json(f"{sink}/stats")
                rss.append(rss_kb(proc.pid))
                if stats["requests"] >= expected and stats["unique"] >= args.events:
                    cpu["worker"] = cpu_s(proc.pid)  # its start-up included
                    deferred = deferrals()
                    cpu["redis"] = cpu_s(redis.process.pid) - cpu["redis"]
                    cpu["sink"] = cpu_s(SINK_PID[0]) - cpu["sink"]
                    break
                time.sleep(0.5)
        finally:
            stop(proc)
    finally:
        asyncio.run(redis.stop())
    span = stats["last"] - stats["first"]  # the first 2xx to the last: start-up not counted
    return {
        "events_s": args.events / span,
        "deliveries_s": stats["requests"] / span,
        "bytes_per_delivery": used / (args.events * args.sinks),
        "rss_first_mb": rss[1] / 1024 if len(rss) > 1 else 0.0,
        "rss_max_mb": max(rss) / 1024,
        "rss_last_mb": rss[-1] / 1024,
        **{f"{k}_ms": v * 1000 / stats["requests"] for k, v in cpu.items()},
        **{f"deferred_{k}": v for k, v in deferred.items()},
    }


def deferrals() -> dict[str, float]:
    """The worker's deliveries put off (put back in the queue for later), by reason, and
    its waits for a sink (set aside once per wait) as ``wait_<reason>`` (from its
    /metrics)."""
    import urllib.request

    url = f"http://127.0.0.1:{WORKER_ADMIN[0]}/metrics"
    out: dict[str, float] = {}
    kinds = {
        "chert_relay_delivery_deferrals_total{": "",
        "chert_relay_delivery_waits_total{": "wait_",
    }
    with urllib.request.urlopen(url, timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            for start, tag in kinds.items():
                if line.startswith(start):
                    reason = tag + line.split('reason="')[1].split('"')[0]
                    out[reason] = out.get(reason, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def steady(work: Path, sink: str, args: argparse.Namespace, rate: float) -> dict[str, float]:
    """Events ingested at ``rate`` while one worker delivers: its rate, and each event's
    time from its ingest to the sink's 2xx."""
    get_json(f"{sink}/reset", "POST")
    work.mkdir()
    redis = EmbeddedRedis(work / "redis", port=free_port())
    asyncio.run(redis.start())
    n = int(rate * args.steady_seconds)
    acked: dict[str, float] = {}
    try:
        data = config(redis.url, sink, 1, args.concurrency, args.poll_delay, args.max_jobs)
        path = work / "relay.toml"
        path.write_text(toml(data))
        proc = worker(path)
        try:
            wait_port(WORKER_ADMIN[0])  # started: its admin listener is up
            asyncio.run(fill(data, n, work.name, at=rate, acked=acked))
            stats = wait_delivered(sink, n)
            arrived: dict[str, float] = get_json(f"{sink}/dump")
        finally:
            stop(proc)
    finally:
        asyncio.run(redis.stop())
    lat = [(arrived[k] - t) * 1000 for k, t in acked.items() if k in arrived]
    return {
        "delivered_s": stats["unique"] / (stats["last"] - stats["first"]),
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--max-jobs", type=int, help="worker.max_jobs (default: --concurrency)")
    ap.add_argument("--sinks", type=int, default=1)
    ap.add_argument("--poll-delay", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--steady", action="store_true", help="also steady flow, offered at the baseline's rate"
    )
    ap.add_argument("--steady-seconds", type=float, default=20.0)
    ap.add_argument("--profile", metavar="FILE", help="record the worker with py-spy")
    args = ap.parse_args()
    if args.max_jobs is None:
        args.max_jobs = args.concurrency
    if args.profile:
        PROFILE.append(args.profile)
    ratios: dict[str, list[float]] = {"drain": [], "cpu": [], "steady": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sink_port = free_port()
        sink_proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "e2e.py"), "--sink", str(sink_port)]
        )
        SINK_PID.append(sink_proc.pid)
        sink = f"http://127.0.0.1:{sink_port}"
        try:
            wait_port(sink_port)
            for r in range(args.rounds):
                b = baseline(sink, args.events, args.concurrency)
                base = b["rate"]
                got = drain(work / f"drain{r}", sink, args)
                ratios["drain"].append(got["deliveries_s"] / base)
                ratios["cpu"].append(got["worker_ms"] / b["client_ms"])
                deferred = [f"{k[9:]} {v:.0f}" for k, v in got.items() if k[:9] == "deferred_"]
                print(
                    f"round {r + 1}: baseline {base:.0f} requests/s; drain of {args.events} "
                    f"events to {args.sinks} sink(s): {got['deliveries_s']:.0f} deliveries/s "
                    f"({got['events_s']:.0f} events/s): ratio {got['deliveries_s'] / base:.2f}; "
                    f"Redis {got['bytes_per_delivery']:.0f} B per queued delivery; worker RSS "
                    f"{got['rss_first_mb']:.0f} MB at start, {got['rss_max_mb']:.0f} MB at most, "
                    f"{got['rss_last_mb']:.0f} MB at the end\n"
                    f"round {r + 1}: CPU ms per request: baseline client {b['client_ms']:.3f}, "
                    f"sink {b['sink_ms']:.3f}; per delivery: worker {got['worker_ms']:.3f}, "
                    f"redis-server {got['redis_ms']:.3f}, sink {got['sink_ms']:.3f}; "
                    f"put off: {', '.join(deferred) or 'none'}"
                )
                if args.steady:
                    s = steady(work / f"steady{r}", sink, args, base)
                    ratios["steady"].append(s["delivered_s"] / base)
                    print(
                        f"round {r + 1}: steady flow offered at {base:.0f} events/s for "
                        f"{args.steady_seconds:.0f}s: delivered {s['delivered_s']:.0f}/s, ratio "
                        f"{s['delivered_s'] / base:.2f}; ingest to sink 2xx p50 "
                        f"{s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms"
                    )
        finally:
            stop(sink_proc)
    print(
        "median: drain ratio "
        f"{statistics.median(ratios['drain']):.2f}; worker CPU per delivery / baseline client "
        f"CPU per request {statistics.median(ratios['cpu']):.2f}"
        + (f"; steady ratio {statistics.median(ratios['steady']):.2f}" if ratios["steady"] else "")
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--baseline":
        baseline_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
