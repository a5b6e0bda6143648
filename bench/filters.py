"""Sink filters: what a filter costs ingest, same run, against no filter.

1. **Ingest**: ``bench/receiver.py``'s relay (``chert-relay serve``, embedded Redis with
   AOF and ``appendfsync always``, sinks ``crm`` and ``all``, no worker) under its wrk
   load, in three modes taking turns going first: ``none`` (no filter), ``pass`` (sink
   ``all`` has a filter of three conditions that every event passes: the webhook parse
   builds the fields the filter reads, and the filter runs; the jobs are the same) and
   ``out`` (a filter that keeps every event out of ``all``: one job fewer, and the event
   log records the sink as filtered). Webhooks/s answered 202, CPU per webhook of
   ``serve`` and of its redis-server, and each mode's ratio to ``none`` per round, and their median.
2. **In process**: the webhook body parsed as the receiver does without a filter (the
   fast parse of the few fields the relay reads) and with one (those and the filter's
   fields), and the filter's matcher on the parsed envelope: µs per event, best of
   several runs.
3. **Ingest in process**: ``Ingestor.ingest`` (128 at once, with metrics) of bodies parsed
   as the receiver parses them, against a private redis-server (``appendfsync always``)
   in the three modes, taking turns: the relay's own CPU per event — the steadier
   figure on a shared machine — and events/s.

    python bench/filters.py [--rounds 3] [--seconds 10] [--connections 32] [--only 1,2,3]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from drain import cpu_s  # noqa: E402
from receiver import (  # noqa: E402
    WRK_SCRIPT,
    envelope_parts,
    run_wrk,
    start_relay,
    stop,
    write_data,
)
from redis.asyncio import Redis  # noqa: E402
from scheduling import descendants, rotate, settle  # noqa: E402

from relay.config import parse_config  # noqa: E402
from relay.config.filters import compile_filter  # noqa: E402
from relay.ingest import envelope  # noqa: E402
from relay.ingest.ingestor import Ingestor  # noqa: E402
from relay.metrics import Metrics  # noqa: E402
from relay.store.embedded import EmbeddedRedis  # noqa: E402
from tests.support.common import config_dict  # noqa: E402

PASS = {
    "data": {
        "message": {"direction": "inbound", "sender_handle": {"service": {"$in": ["imessage"]}}},
        "chat": {"is_group": False},
    }
}
OUT = {"data": {"chat": {"is_group": True}}}
# TOML lines appended to receiver.py's configuration: they land in its last sink, "all".
MODES = {
    "none": "",
    "pass": 'filter = { data = { message = { direction = "inbound", sender_handle = '
    '{ service = { "$in" = ["imessage"] } } }, chat = { is_group = false } } }\n',
    "out": "filter = { data = { chat = { is_group = true } } }\n",
}


def ingest(work: Path, args: argparse.Namespace, r: int) -> dict[str, dict[str, float]]:
    script, data = work / "bench.lua", work / "data.lua"
    script.write_text(WRK_SCRIPT)
    write_data(data, args.requests)  # signed now: well within the signature tolerance
    out: dict[str, dict[str, float]] = {}
    for mode in rotate(list(MODES), r):
        settle()
        rdir = work / f"r{r}-{mode}"
        rdir.mkdir()
        proc, port = start_relay(rdir, extra=MODES[mode])
        try:
            kids = descendants(proc.pid)  # its redis-server
            before = cpu_s(proc.pid), sum(cpu_s(k) for k in kids)
            res = run_wrk(port, script, data, args.seconds, args.connections)
            n = res["rps"] * args.seconds
            res["serve_us"] = (cpu_s(proc.pid) - before[0]) * 1e6 / n
            res["redis_us"] = (sum(cpu_s(k) for k in kids) - before[1]) * 1e6 / n
        finally:
            stop(proc)
        shutil.rmtree(rdir, ignore_errors=True)
        out[mode] = res
        print(
            f"  {mode:4s}: {res['rps']:,.0f} webhooks/s, p99 {res['p99_ms']:.2f} ms, non-2xx "
            f"{res['non2xx']:.0f}; CPU per webhook: serve {res['serve_us']:.0f} µs, "
            f"redis-server {res['redis_us']:.0f} µs"
        )
    return out


def best_us(fn: Any, n: int, repeat: int = 7) -> float:
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t) / n * 1e6)
    return min(runs)


def in_process(n: int) -> None:
    prefix, suffix = envelope_parts()
    body = f"{prefix}chert:msg:bench-1{suffix}".encode()
    fast = best_us(lambda: envelope.from_body(body), n)
    passing, keeping_out = compile_filter(PASS), compile_filter(OUT)
    reader = envelope.reader_for(passing.paths)
    whole = best_us(lambda: envelope.from_body(body, reader=reader), n)
    doc = envelope.from_body(body, reader=reader).envelope
    assert passing(doc)
    assert not keeping_out(doc)
    match_pass = best_us(lambda: passing(doc), n)
    match_out = best_us(lambda: keeping_out(doc), n)
    print(
        f"  body {len(body)} bytes: fast parse {fast:.1f} µs, with the filter's fields "
        f"{whole:.1f} µs (+{whole - fast:.1f} µs, {whole / fast:.2f}x); matcher: 3 "
        f"conditions passing {match_pass:.2f} µs, 1 condition failing {match_out:.2f} µs"
    )


async def ingest_in_process(events: int, rounds: int) -> None:
    directory = Path(tempfile.mkdtemp(prefix="filters", dir="/tmp"))  # a short socket path
    server = EmbeddedRedis(directory / "redis")
    url = await server.start()
    client: Redis = Redis.from_url(url)
    prefix, suffix = envelope_parts()
    filters = {"none": None, "pass": PASS, "out": OUT}
    cpu: dict[str, list[float]] = {m: [] for m in filters}
    try:
        for r in range(rounds):
            for mode in rotate(list(filters), r):
                data = config_dict(redis_url=url)
                sinks = data["tenants"][0]["sinks"]
                sinks[0]["events"] = ["*"]
                if filters[mode] is not None:
                    sinks[1]["filter"] = filters[mode]
                ingestor = Ingestor(client, parse_config(data, env={}), Metrics())
                spec = filters[mode]
                reader = None if spec is None else envelope.reader_for(compile_filter(spec).paths)
                bodies = [f"{prefix}{mode}-{r}-{i}{suffix}".encode() for i in range(events + 2000)]
                sem = asyncio.Semaphore(128)

                async def one(
                    body: bytes,
                    ingestor: Ingestor = ingestor,
                    rd: envelope.HeadReader | None = reader,
                    sem: asyncio.Semaphore = sem,
                ) -> None:
                    async with sem:
                        await ingestor.ingest(
                            "acme-7a3f", envelope.from_body(body, reader=rd), "webhook"
                        )

                await asyncio.gather(*(one(b) for b in bodies[:2000]))  # warm up
                t_cpu, t_wall = time.process_time(), time.perf_counter()
                await asyncio.gather(*(one(b) for b in bodies[2000:]))
                t_cpu, t_wall = time.process_time() - t_cpu, time.perf_counter() - t_wall
                await ingestor.drain()
                cpu[mode].append(t_cpu * 1e6 / events)
                print(
                    f"  round {r + 1} {mode:4s}: {events / t_wall:,.0f} events/s, relay CPU "
                    f"{cpu[mode][-1]:.1f} µs per event (parse + ingest)"
                )
                await client.flushdb()
    finally:
        await client.aclose()
        await server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    for mode in ("pass", "out"):
        ratios = [a / b for a, b in zip(cpu[mode], cpu["none"], strict=True)]
        print(
            f"{mode}/none: relay CPU per event median {statistics.median(ratios):.2f} "
            f"(rounds {', '.join(f'{x:.2f}' for x in ratios)})"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--requests", type=int, default=150_000)
    ap.add_argument("--events", type=int, default=20_000, help="3: events per mode and round")
    ap.add_argument("--only", default="1,2,3")
    args = ap.parse_args()
    only = {int(x) for x in args.only.split(",")}
    if 2 in only:
        print("2. in process")
        in_process(20_000)
    if 3 in only:
        print("3. ingest in process")
        asyncio.run(ingest_in_process(args.events, args.rounds))
    if 1 not in only:
        return
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    ratios: dict[str, list[float]] = {"pass": [], "out": []}
    serve: dict[str, list[float]] = {"pass": [], "out": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            print(f"1. ingest, round {r + 1}")
            res = ingest(Path(tmp), args, r)
            for mode in ratios:
                ratios[mode].append(res[mode]["rps"] / res["none"]["rps"])
                serve[mode].append(res[mode]["serve_us"] / res["none"]["serve_us"])
    for mode in ratios:
        rounds = ", ".join(f"{x:.2f}" for x in ratios[mode])
        print(
            f"{mode}/none: throughput median {statistics.median(ratios[mode]):.2f} "
            f"(rounds {rounds}); serve CPU per webhook median {statistics.median(serve[mode]):.2f}"
        )


if __name__ == "__main__":
    main()
