"""What the event log costs (issue #24): the same measurements with it on and off.

Each section runs the event log on (the shipped default) and off (``[event_log]
enabled = false``), the order of the two swapped from round to round (these machines
are noisy: only same-run ratios count); the summary gives each round's figures and the
median of the rounds' on/off ratios.

1. **Ingest**: webhooks/s accepted (202) by ``chert-relay serve`` on its embedded Redis
   (AOF, ``appendfsync always``), two sinks, no worker: ``bench/receiver.py``'s relay
   and wrk load (1 thread, ``--connections``, distinct pre-signed webhooks, signed
   afresh each round), for ``--ingest-seconds``.
2. **Backlog drain**: ``--events`` events queued for one sink answering in ~1 ms
   (``bench/sinkserver.py``), drained by one ``chert-relay worker`` on the shipped
   settings (``bench/scheduling.py``'s section 1: sink ``concurrency`` 16); deliveries/s
   from the first 2xx to the last, and CPU per delivery of the worker and of Redis.
3. **Push latency**: webhooks at ``--rate`` through ``chert-relay run`` on the shipped
   config to the same sink (``bench/e2e.py``'s load generator), for
   ``--latency-seconds``: the time from each webhook's send to its arrival, p50/p99.
4. **Bytes per event**: ``--bytes-events`` events for one sink that answers each
   event's first attempt 503 (a short JSON body) and its second 200 (two attempts per
   event; the breaker set not to open), delivered to the end by one worker; then
   ``{prefix}:logbytes`` / N (what ``event_log.max_memory`` counts) and Redis'
   ``used_memory`` growth per event with the log on and off (the difference is what the
   log really costs Redis), and how many events, and days at 1, 10 and 100 events/s,
   the default cap holds.

    python bench/eventlog.py [--quick] [--rounds 3] [--only 1,2,3,4] [--json FILE]

``--quick``: a smoke run, small sizes and one round (under ~2 minutes). Every process it
starts is stopped on the way out, on Ctrl-C and on failure too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import drain as drain_py  # noqa: E402
from drain import cpu_s, drain, fill, toml, worker  # noqa: E402
from e2e import get_json, latency_run, pct  # noqa: E402
from receiver import WRK_SCRIPT, run_wrk, start_relay, stop, wait_port, write_data  # noqa: E402
from redis import Redis  # noqa: E402
from scheduling import (  # noqa: E402
    SHIPPED,
    control,
    descendants,
    drain_args,
    med,
    reap,
    rotate,
    settle,
)
from sinkserver import start_sink  # noqa: E402

from relay.config import EventLogConfig, parse_config  # noqa: E402
from relay.keys import Keys  # noqa: E402
from relay.store.embedded import EmbeddedRedis, free_port  # noqa: E402

MODES = ["on", "off"]
# "on" is the shipped default: no [event_log] section at all
SECTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "on": {},
    "off": {"event_log": {"enabled": False}},
}
TOML = {"on": "", "off": "[event_log]\nenabled = false\n"}
CAP = EventLogConfig().max_memory
RETENTION = EventLogConfig().retention
RATES = (1, 10, 100)
QUICK = {
    "ingest_seconds": 3,
    "requests": 60_000,
    "events": 1_000,
    "latency_seconds": 3.0,
    "bytes_events": 500,
    "rounds": 1,
}
FULL = {
    "ingest_seconds": 15,
    "requests": 200_000,
    "events": 10_000,
    "latency_seconds": 20.0,
    "bytes_events": 5_000,
    "rounds": 3,
}


# --- 1: ingest -------------------------------------------------------------------------------


def ingest(work: Path, args: argparse.Namespace, r: int) -> dict[str, Any]:
    script, data = work / "bench.lua", work / "data.lua"
    script.write_text(WRK_SCRIPT)
    write_data(data, args.requests)  # signed now: well within the signature tolerance
    out: dict[str, Any] = {}
    for mode in rotate(MODES, r):
        settle()
        rdir = work / f"r{r}-ingest-{mode}"
        rdir.mkdir()
        proc, port = start_relay(rdir, extra=TOML[mode])
        try:
            kids = descendants(proc.pid)  # its redis-server
            before = cpu_s(proc.pid), sum(cpu_s(k) for k in kids)
            res = run_wrk(port, script, data, args.ingest_seconds, args.connections)
            n = res["rps"] * args.ingest_seconds
            res["serve_us"] = (cpu_s(proc.pid) - before[0]) * 1e6 / n
            res["redis_us"] = (sum(cpu_s(k) for k in kids) - before[1]) * 1e6 / n
        finally:
            stop(proc)
        shutil.rmtree(rdir, ignore_errors=True)  # its AOF need never be written out
        out[mode] = res
        wrapped = res["rps"] * args.ingest_seconds > args.requests
        print(
            f"  log {mode:3s}: {res['rps']:,.0f} webhooks/s, p50 {res['p50_ms']:.2f} ms, p99 "
            f"{res['p99_ms']:.2f} ms, non-2xx {res['non2xx']:.0f}; CPU per webhook: serve "
            f"{res['serve_us']:.0f} µs, its redis-server {res['redis_us']:.0f} µs"
            + ("  (more requests than distinct webhooks: some were duplicates)" if wrapped else "")
        )
    out["ratio"] = out["on"]["rps"] / out["off"]["rps"]
    out["p99_ratio"] = out["on"]["p99_ms"] / out["off"]["p99_ms"]
    out["redis_ratio"] = out["on"]["redis_us"] / out["off"]["redis_us"]
    out["serve_ratio"] = out["on"]["serve_us"] / out["off"]["serve_us"]
    print(
        f"  on/off: throughput {out['ratio']:.2f}, wrk p99 {out['p99_ratio']:.2f}; CPU per "
        f"webhook: redis-server {out['redis_ratio']:.2f}, serve {out['serve_ratio']:.2f}"
    )
    return out


# --- 2: backlog drain ------------------------------------------------------------------------


def backlog(work: Path, sink: str, args: argparse.Namespace, r: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in rotate(MODES, r):
        settle()
        got = drain(
            work / f"r{r}-drain-{mode}",
            sink,
            drain_args(args.events, None),
            sections=SECTIONS[mode],
        )
        out[mode] = {
            "rate": got["deliveries_s"],
            "worker_ms": got["worker_ms"],
            "redis_ms": got["redis_ms"],
        }
        print(
            f"  log {mode:3s}: {got['deliveries_s']:,.0f} deliveries/s; CPU per delivery: worker "
            f"{got['worker_ms']:.3f} ms (its start-up included), redis-server "
            f"{got['redis_ms']:.3f} ms"
        )
    out["ratio"] = out["on"]["rate"] / out["off"]["rate"]
    out["redis_ratio"] = out["on"]["redis_ms"] / out["off"]["redis_ms"]
    print(
        f"  on/off: throughput {out['ratio']:.2f}, redis-server CPU per delivery "
        f"{out['redis_ratio']:.2f}"
    )
    return out


# --- 3: push latency -------------------------------------------------------------------------


def latency(work: Path, sink: str, args: argparse.Namespace, r: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in rotate(MODES, r):
        settle()
        got = latency_run(
            work / f"r{r}-lat-{mode}",
            sink,
            args.rate,
            args.latency_seconds,
            False,
            SHIPPED.poll_delay,
            shipped=True,
            extra=TOML[mode],
        )
        sent = got["sent"]
        out[mode] = {"p50": pct(sent, 50), "p99": pct(sent, 99), "n": len(sent)}
        out[mode]["refused"] = got["failed"]
        print(
            f"  log {mode:3s}: webhook sent -> sink p50 {pct(sent, 50):.1f} ms, p99 "
            f"{pct(sent, 99):.1f} ms ({len(sent):,} events, {got['failed']} refused)"
        )
    out["p50_ratio"] = out["on"]["p50"] / out["off"]["p50"]
    out["p99_ratio"] = out["on"]["p99"] / out["off"]["p99"]
    print(f"  on/off: p50 {out['p50_ratio']:.2f}, p99 {out['p99_ratio']:.2f}")
    return out


# --- 4: bytes per event ----------------------------------------------------------------------


def used_memory(client: Redis) -> int:
    return int(client.info("memory")["used_memory"])  # type: ignore[index]


def delivered_all(client: Redis, keys: Keys, proc: subprocess.Popen[bytes], n: int) -> None:
    """Wait until nothing is left in the queue (every delivery finished and recorded)."""
    deadline = time.monotonic() + max(120.0, n / 50)
    while client.zcard(keys.queue):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"bytes: {client.zcard(keys.queue)} deliveries still queued")
        time.sleep(0.2)
    time.sleep(0.5)  # the last finishes' group commit


def bytes_run(work: Path, sink: str, n: int, mode: str) -> dict[str, Any]:
    get_json(f"{sink}/reset", "POST")
    work.mkdir()
    redis = EmbeddedRedis(work / "redis", port=free_port())
    asyncio.run(redis.start())
    try:
        data = drain_py.config(redis.url, sink, 1, None, None, None)
        data["worker"] = {"breaker_failures": 10_000}  # two attempts each, not a wait
        data.update(SECTIONS[mode])
        keys = Keys(parse_config(data, env={}).redis.key_prefix)
        path = work / "relay.toml"
        path.write_text(toml(data))
        client: Redis = Redis.from_url(redis.url)
        try:
            before = used_memory(client)
            asyncio.run(fill(data, n, work.name))
            queued = used_memory(client)
            proc = worker(path)
            try:
                delivered_all(client, keys, proc, n)
            finally:
                stop(proc)
            stats = get_json(f"{sink}/stats")
            after = used_memory(client)
            logbytes = int(client.get(keys.event_log_bytes) or 0)
            records = int(client.zcard(keys.event_log_index))
            tries: dict[str, int] = {}
            if records:
                pipe = client.pipeline(transaction=False)
                for j in range(n):
                    pipe.hget(keys.event_log(drain_py.TENANT, f"{work.name}:{j}"), "n:s0")
                for v in pipe.execute():
                    tries[str(int(v or 0))] = tries.get(str(int(v or 0)), 0) + 1
        finally:
            client.close()
    finally:
        asyncio.run(redis.stop())
        shutil.rmtree(work / "redis", ignore_errors=True)
    if stats["unique"] < n or stats["requests"] != 2 * n:
        print(
            f"  warning: {stats['unique']} of {n} delivered in {stats['requests']} requests "
            f"(expected {2 * n})"
        )
    return {
        "n": n,
        "requests": stats["requests"],
        "queued_per_event": (queued - before) / n,
        "used_per_event": (after - before) / n,
        "logbytes_per_event": logbytes / n,
        "records": records,
        "attempts": tries,
    }


def per_event(work: Path, sink: str, args: argparse.Namespace, r: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    control(sink, fail_first=1)
    try:
        for mode in rotate(MODES, r):
            settle()
            got = bytes_run(work / f"r{r}-bytes-{mode}", sink, args.bytes_events, mode)
            out[mode] = got
            tries = ", ".join(f"{k}: {v:,}" for k, v in sorted(got["attempts"].items()))
            print(
                f"  log {mode:3s}: {got['n']:,} events, {got['requests']:,} requests; Redis "
                f"used_memory per event {got['queued_per_event']:,.0f} B queued, "
                f"{got['used_per_event']:,.0f} B once delivered; logbytes per event "
                f"{got['logbytes_per_event']:,.0f} B ({got['records']:,} records"
                + (f"; attempts recorded per event: {tries})" if tries else ")")
            )
    finally:
        control(sink, fail_first=0)
    on, off = out["on"], out["off"]
    out["log_per_event"] = on["logbytes_per_event"]
    out["real_per_event"] = on["used_per_event"] - off["used_per_event"]
    out["queued_extra"] = on["queued_per_event"] - off["queued_per_event"]
    print(
        f"  the log's cost per event: logbytes {out['log_per_event']:,.0f} B, used_memory "
        f"{out['real_per_event']:,.0f} B once delivered (on - off; "
        f"{out['queued_extra']:,.0f} B more while queued)"
    )
    return out


def held(per_event_bytes: float) -> str:
    events = CAP / per_event_bytes
    days = ", ".join(
        f"{rate}/s: {events / rate / 86400:,.2f} days ({events / rate / 3600:,.1f} h)"
        for rate in RATES
    )
    return f"{events:,.0f} events; {days}"


# --- main ------------------------------------------------------------------------------------


def spread(values: list[float], fmt: str = ".2f") -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return (
        f"{med(values):{fmt}} (rounds {', '.join(format(v, fmt) for v in values)}; "
        f"{min(values):{fmt}}-{max(values):{fmt}})"
    )


def summary(rounds: list[dict[str, Any]], args: argparse.Namespace) -> None:
    def col(section: str, *path: str) -> list[float]:
        out = []
        for r in rounds:
            v: Any = r[section]
            for p in path:
                v = v[p]
            out.append(float(v))
        return out

    have = rounds[0].keys()
    print("\n== summary: log on / log off (median of the rounds' ratios, each round's ratio)")
    if "ingest" in have:
        print(
            f"1. ingest (serve, wrk -c{args.connections}, {args.ingest_seconds} s): on "
            f"{spread(col('ingest', 'on', 'rps'), ',.0f')} webhooks/s, off "
            f"{spread(col('ingest', 'off', 'rps'), ',.0f')}/s\n"
            f"   on/off: {spread(col('ingest', 'ratio'))}   (goal >= 0.9); wrk p99 on/off "
            f"{spread(col('ingest', 'p99_ratio'))}\n"
            f"   CPU per webhook: redis-server on {spread(col('ingest', 'on', 'redis_us'), '.0f')}"
            f" µs, off {spread(col('ingest', 'off', 'redis_us'), '.0f')} µs, on/off "
            f"{spread(col('ingest', 'redis_ratio'))}; serve on/off "
            f"{spread(col('ingest', 'serve_ratio'))}"
        )
    if "drain" in have:
        print(
            f"2. backlog drain ({args.events:,} events, one worker, shipped defaults): on "
            f"{spread(col('drain', 'on', 'rate'), ',.0f')} deliveries/s, off "
            f"{spread(col('drain', 'off', 'rate'), ',.0f')}/s\n"
            f"   on/off: {spread(col('drain', 'ratio'))}   (goal >= 0.9); redis-server CPU per "
            f"delivery on/off {spread(col('drain', 'redis_ratio'))} (on "
            f"{spread(col('drain', 'on', 'redis_ms'), '.3f')} ms, off "
            f"{spread(col('drain', 'off', 'redis_ms'), '.3f')} ms); worker CPU per delivery on "
            f"{spread(col('drain', 'on', 'worker_ms'), '.3f')} ms, off "
            f"{spread(col('drain', 'off', 'worker_ms'), '.3f')} ms"
        )
    if "latency" in have:
        print(
            f"3. push latency ({args.rate:g} events/s for {args.latency_seconds:g} s, run, shipped"
            f" config), sent -> sink:\n"
            f"   on: p50 {spread(col('latency', 'on', 'p50'), '.1f')} ms, p99 "
            f"{spread(col('latency', 'on', 'p99'), '.1f')} ms; off: p50 "
            f"{spread(col('latency', 'off', 'p50'), '.1f')} ms, p99 "
            f"{spread(col('latency', 'off', 'p99'), '.1f')} ms\n"
            f"   on/off: p50 {spread(col('latency', 'p50_ratio'))}, p99 "
            f"{spread(col('latency', 'p99_ratio'))}   (goal p99 <= 1.10)"
        )
    if "bytes" in have:
        log = col("bytes", "log_per_event")
        real = col("bytes", "real_per_event")
        print(
            f"4. bytes per event (one sink, two attempts: 503 then 200; {args.bytes_events:,} "
            f"events):\n"
            f"   logbytes (what max_memory counts): {spread(log, ',.0f')} B; Redis used_memory,"
            f" on - off: {spread(real, ',.0f')} B (on "
            f"{spread(col('bytes', 'on', 'used_per_event'), ',.0f')}, off "
            f"{spread(col('bytes', 'off', 'used_per_event'), ',.0f')} B per event once "
            f"delivered)\n"
            f"   the default cap ({CAP / 1_048_576:g} MiB of logbytes) holds {held(med(log))}\n"
            f"   (Redis memory for it then: about {CAP * med(real) / med(log) / 1_048_576:,.0f}"
            f" MiB); retention ({RETENTION / 3600:g} h) binds first below "
            f"{CAP / med(log) / RETENTION:,.1f} events/s"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, one round")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--ingest-seconds", type=int, help="wrk run per mode (15)")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections")
    ap.add_argument("--requests", type=int, help="distinct pre-signed webhooks (200,000)")
    ap.add_argument("--events", type=int, help="backlog of the drains (10,000)")
    ap.add_argument("--sink-ms", type=float, default=1.0, help="the sink's answer time")
    ap.add_argument("--rate", type=float, default=200.0, help="push latency: events/s")
    ap.add_argument("--latency-seconds", type=float)
    ap.add_argument("--bytes-events", type=int, help="events of the bytes run (5,000)")
    ap.add_argument("--only", default="1,2,3,4", help="sections to run (1-4)")
    ap.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    args = ap.parse_args()
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    only = {int(s) for s in args.only.split(",")}
    if 1 in only and shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True
    ).stdout.strip()
    print(
        f"bench/eventlog.py {'--quick ' if args.quick else ''}at {commit or '?'}, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f}; event log defaults: retention {RETENTION / 3600:g} h, "
        f"max_memory {CAP / 1_048_576:g} MiB",
        flush=True,
    )
    rounds: list[dict[str, Any]] = []
    started = time.monotonic()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="logbench-") as tmp:
            work = Path(tmp)
            port = free_port()
            procs.append(start_sink(port, args.sink_ms))
            drain_py.SINK_PID.append(procs[0].pid)
            wait_port(port)
            sink = f"http://127.0.0.1:{port}"
            sections: list[tuple[int, str, str, Callable[[int], dict[str, Any]]]] = [
                (1, "ingest", "ingest", lambda r: ingest(work, args, r)),
                (2, "drain", "backlog drain", lambda r: backlog(work, sink, args, r)),
                (3, "latency", "push latency", lambda r: latency(work, sink, args, r)),
                (4, "bytes", "bytes per event", lambda r: per_event(work, sink, args, r)),
            ]
            for r in range(args.rounds):
                got: dict[str, Any] = {}
                for number, key, title, run in sections:
                    if number in only:
                        print(
                            f"round {r + 1}, {number}. {title} "
                            f"(load average {os.getloadavg()[0]:.2f})",
                            flush=True,
                        )
                        got[key] = run(r)
                rounds.append(got)
    except KeyboardInterrupt:
        print("interrupted: stopping what this run started", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        for p in procs:
            stop(p)
        reap()
    if rounds:
        summary(rounds, args)
    print(
        f"\n{time.monotonic() - started:.0f} s in all; load average at the end "
        f"{os.getloadavg()[0]:.2f}"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"commit": commit, "args": vars(args), "rounds": rounds}, indent=1, default=str
            )
        )


if __name__ == "__main__":
    main()
