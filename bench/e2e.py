"""End-to-end delivery: signed webhook in, sink 2xx out, everything on this machine.

Three measurements, each against a fresh relay (``chert-relay run``: receiver, admin and
worker in one process, on its embedded default — a private redis-server with AOF and
``appendfsync always``) delivering to one sink, a separate aiohttp process that answers
200 and records when each ``webhook-id`` arrived:

1. **sink direct** — wrk (1 thread, 32 connections) posts the pre-signed webhook
   requests straight to the sink: the ceiling of the sink and of the load generator.
2. **end to end** — the same wrk run against the relay's receiver. Reports the rate
   webhooks were accepted, and the end-to-end rate: distinct events delivered to the
   sink divided by the time from the first webhook to the last sink 2xx (the relay
   drains what it accepted).
3. **latency** — a Python load generator (a separate process, aiohttp) sends signed
   webhooks at a fixed, moderate rate; latency is sink arrival minus send time per
   event (same clock), as p50/p99.

    python bench/e2e.py [--duration 10] [--rate 200] [--latency-seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from receiver import (  # noqa: E402
    SECRET,
    TENANT,
    WRK_SCRIPT,
    envelope_parts,
    run_wrk,
    stop,
    wait_http,
    wait_port,
    write_data,
)
from sinkserver import sink_main  # noqa: E402

from relay.signing import webhook_headers  # noqa: E402
from relay.store.embedded import EmbeddedRedis, free_port  # noqa: E402

SINK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def get_json(url: str, method: str = "GET") -> Any:
    req = urllib.request.Request(url, method=method)  # noqa: S310 - loopback only
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
        return json.loads(resp.read())


# --- the fixed-rate load generator (its own process) -------------------------------------


def loadgen_main(url: str, rate: float, seconds: float, out: str) -> None:
    import aiohttp

    prefix, suffix = envelope_parts()
    tag = int(time.time())

    async def run() -> tuple[dict[str, float], dict[str, float], int]:
        sent: dict[str, float] = {}
        answered: dict[str, float] = {}
        failed = 0
        connector = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one(i: int) -> None:
                nonlocal failed
                event_id = f"chert:msg:lat-{tag}-{i:07d}"
                body = f"{prefix}{event_id}{suffix}".encode()
                # webhook-id: what the sink keys arrivals by, when posted to it directly
                headers = {"Content-Type": "application/json", "webhook-id": event_id}
                headers.update(webhook_headers(SECRET, body))
                sent[event_id] = time.time()
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    answered[event_id] = time.time()
                    if resp.status >= 300:
                        failed += 1

            tasks = []
            start = time.monotonic()
            total = int(rate * seconds)
            for i in range(total):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
        return sent, answered, failed

    sent, answered, failed = asyncio.run(run())
    Path(out).write_text(json.dumps({"sent": sent, "answered": answered, "failed": failed}))


def run_loadgen(url: str, rate: float, seconds: float, out: Path) -> dict[str, Any]:
    """:func:`loadgen_main` in its own process: ``sent`` and ``answered`` (event id ->
    unix seconds) and the count of non-2xx answers, ``failed``."""
    subprocess.run(
        [sys.executable, __file__, "--loadgen", url, str(rate), str(seconds), str(out)],
        check=True,
    )
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


# --- the relay ---------------------------------------------------------------------------


class Relay:
    """``chert-relay run`` (one process, embedded Redis), or with ``split`` a redis-server
    (AOF, ``appendfsync always``) plus ``chert-relay serve`` and ``chert-relay worker``."""

    def __init__(
        self,
        workdir: Path,
        sink_url: str,
        split: bool,
        poll_delay: float,
        *,
        shipped: bool = False,
        extra: str = "",
    ) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.redis: EmbeddedRedis | None = None
        redis_url = ""
        if split:
            self.redis = EmbeddedRedis(workdir / "redis", port=free_port())
            redis_url = asyncio.run(self.redis.start())
        self.port, self.admin = free_port(), free_port()
        self.worker_admin = self.admin
        cfg = write_config(
            workdir,
            sink_url,
            self.port,
            self.admin,
            redis_url,
            poll_delay,
            shipped=shipped,
            extra=extra,
        )
        argv = [sys.executable, "-m", "relay", "--log-level", "warning", "--config", str(cfg)]
        if not split:
            self.procs.append(subprocess.Popen([*argv, "run"], cwd=ROOT))
        else:
            self.procs.append(subprocess.Popen([*argv, "serve"], cwd=ROOT))
            self.worker_admin = free_port()
            worker = [*argv, "worker", "--admin-listen", f"127.0.0.1:{self.worker_admin}"]
            self.procs.append(subprocess.Popen(worker, cwd=ROOT))
        try:
            wait_http(f"http://127.0.0.1:{self.admin}/readyz")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for p in self.procs:
            stop(p)
        if self.redis is not None:
            asyncio.run(self.redis.stop())


def write_config(
    workdir: Path,
    sink_url: str,
    port: int,
    admin: int,
    redis_url: str,
    poll_delay: float,
    *,
    shipped: bool = False,
    extra: str = "",
) -> Path:
    """The relay's config; ``shipped``: no ``[worker]`` settings and no sink
    ``concurrency``, the defaults (``poll_delay`` unused) instead of this benchmark's.
    ``extra``: more TOML, appended (e.g. an ``[event_log]`` section)."""
    cfg = workdir / "relay.toml"
    redis = f'[redis]\nurl = "{redis_url}"' if redis_url else ""
    worker = "" if shipped else f"[worker]\nmax_jobs = 200\npoll_delay = {poll_delay}"
    concurrency = "" if shipped else "concurrency = 200"
    cfg.write_text(f"""
{redis}
[server]
listen = "127.0.0.1:{port}"
[admin]
listen = "127.0.0.1:{admin}"
[relay]
state_dir = "{workdir / "state"}"
{worker}
[[tenants]]
slug = "{TENANT}"
webhook_secrets = ["{SECRET}"]
poll = {{ mode = "off" }}
[[tenants.sinks]]
name = "sink"
url = "{sink_url}"
secret = "{SINK_SECRET}"
{concurrency}
{extra}
""")
    return cfg


def metric_lines(admin: int, prefix: str) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as r:
        return [line for line in r.read().decode().splitlines() if line.startswith(prefix)]


def ingested_new(admin: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("chert_relay_events_ingested_total{") and 'outcome="new"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def wait_delivered(sink: str, expected: int, timeout: float = 300.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        stats: dict[str, Any] = get_json(f"{sink}/stats")
        if stats["unique"] >= expected:
            return stats
        if time.monotonic() > deadline:
            raise SystemExit(f"only {stats['unique']} of {expected} delivered in {timeout}s")
        time.sleep(0.1)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def throughput(
    work: Path, sink: str, script: Path, data: Path, args: argparse.Namespace, split: bool
) -> None:
    get_json(f"{sink}/reset", "POST")
    work.mkdir()
    relay = Relay(work, f"{sink}/hook", split, args.poll_delay)
    try:
        started = time.time()
        res = run_wrk(relay.port, script, data, args.duration, args.connections)
        # wrk stops with requests in flight; the relay still takes those: wait until
        # the count of new events stops moving
        accepted, previous = ingested_new(relay.admin), -1
        while accepted != previous:
            time.sleep(0.5)
            accepted, previous = ingested_new(relay.admin), accepted
        stats = wait_delivered(sink, accepted)
        outcomes = metric_lines(relay.worker_admin, "chert_relay_deliveries_total{")
    finally:
        relay.stop()
    span = stats["last"] - started
    print(
        f"relay webhooks:   {res['rps']:8.0f} req/s  p50 {res['p50_ms']:.2f} ms"
        f"  p99 {res['p99_ms']:.2f} ms  non-2xx {res['non2xx']:.0f}"
    )
    print(
        f"relay end to end: {stats['unique'] / span:8.0f} events/s  ({stats['unique']} "
        f"distinct events, first webhook to last sink 2xx {span:.1f} s; "
        f"{stats['requests']} sink requests)"
    )
    print("  " + "; ".join(outcomes))


def latency_run(
    work: Path,
    sink: str,
    rate: float,
    seconds: float,
    split: bool,
    poll_delay: float,
    *,
    shipped: bool = False,
    extra: str = "",
) -> dict[str, Any]:
    """Webhooks at ``rate`` for ``seconds`` through a fresh relay to ``sink``: the
    milliseconds from each webhook's send (``sent``) and from its answer (``answered``) to
    its arrival at the sink, and how many were refused (``failed``). ``extra``: more TOML
    for the relay's config."""
    get_json(f"{sink}/reset", "POST")
    work.mkdir()
    relay = Relay(work, f"{sink}/hook", split, poll_delay, shipped=shipped, extra=extra)
    try:
        url = f"http://127.0.0.1:{relay.port}/webhooks/chert/{TENANT}"
        doc = run_loadgen(url, rate, seconds, work / "sent.json")
        wait_delivered(sink, len(doc["sent"]), timeout=60)
        arrivals: dict[str, float] = get_json(f"{sink}/dump")
    finally:
        relay.stop()
    return {
        key: [(arrivals[i] - t) * 1000 for i, t in doc[key].items() if i in arrivals]
        for key in ("sent", "answered")
    } | {"failed": doc["failed"]}


def latency(work: Path, sink: str, args: argparse.Namespace, split: bool) -> None:
    got = latency_run(work, sink, args.rate, args.latency_seconds, split, args.poll_delay)
    lat = got["sent"]
    print(
        f"latency at {args.rate:.0f} events/s for {args.latency_seconds:.0f} s "
        f"({len(lat)} events, {got['failed']} refused): p50 {pct(lat, 50):.1f} ms"
        f"  p99 {pct(lat, 99):.1f} ms  max {max(lat):.1f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=int, default=10, help="seconds of wrk per run")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--requests", type=int, default=60_000, help="distinct pre-signed webhooks")
    ap.add_argument("--rate", type=float, default=200.0, help="events/s for the latency run")
    ap.add_argument("--latency-seconds", type=float, default=20.0)
    ap.add_argument("--poll-delay", type=float, default=0.05, help="worker.poll_delay (s)")
    ap.add_argument("--latency-only", action="store_true", help="skip the throughput runs")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        script, data = work / "bench.lua", work / "data.lua"
        script.write_text(WRK_SCRIPT)
        size = write_data(data, args.requests)
        sink_port = free_port()
        sink_proc = subprocess.Popen([sys.executable, __file__, "--sink", str(sink_port)])
        wait_port(sink_port)
        sink = f"http://127.0.0.1:{sink_port}"
        try:
            print(f"body {size} bytes; wrk -t1 -c{args.connections} -d{args.duration}s")
            if not args.latency_only:
                direct = run_wrk(sink_port, script, data, args.duration, args.connections)
                print(
                    f"sink direct:      {direct['rps']:8.0f} req/s  "
                    f"p50 {direct['p50_ms']:.2f} ms  p99 {direct['p99_ms']:.2f} ms"
                )

            for split in (False, True):
                name = "serve + worker" if split else "run"
                print(f"-- relay as {'two processes: ' if split else ''}{name}")
                if not args.latency_only:
                    throughput(work / f"e2e-{name}", sink, script, data, args, split)
                latency(work / f"lat-{name}", sink, args, split)
        finally:
            stop(sink_proc)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--sink":
        sink_main(int(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--loadgen":
        loadgen_main(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
    else:
        main()
