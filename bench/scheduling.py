"""Delivery scheduling on the shipped defaults (issue #23's "Done when"), from one run.

Every figure comes with a baseline measured in the same run, and the order of the
measurements inside a section rotates from round to round (these machines are noisy:
only same-run ratios count). The worker and its sinks run on the SHIPPED settings —
no ``[worker]`` section, no sink ``concurrency`` (16), ``max_jobs`` (200), ``poll_delay``
(500 ms), the breaker's — unless a section says what it changes. Redis is
a redis-server with AOF and ``appendfsync always``, as in ``bench/drain.py``.

1. **Backlog drain**: ``--events`` events queued for one sink answering in ~1 ms
   (``bench/sinkserver.py``, ``--sink-ms``), drained by one ``chert-relay worker``
   (``bench/drain.py``'s drain) with the sink's shipped ``concurrency`` (16), and again
   with ``concurrency = 200``; the baseline is ``bench/drain.py``'s plain aiohttp client
   signing and POSTing the same bodies, ``max_jobs`` (200) at once. Deliveries/s (first
   2xx to last), ratios, and ``chert_relay_delivery_deferrals_total{reason="busy"}`` per
   1,000 deliveries from the worker's ``/metrics``.
2. **Slow sink**: the same drain against the sink answering in 20 ms, at concurrency 16,
   against the cap's limit (16 / 20 ms = 800/s) and the plain client at 16 at once
   against the same sink (what 16 requests in flight really give).
3. **Fairness**: 20 tenants x 5 sinks (one path each on one sink process answering in
   ~1 ms); every event type goes to one sink, so ``--fair-rate`` events/s are as many
   deliveries/s, spread evenly over the 99 sinks other than ``t00/s0``, for
   ``--fair-seconds``, each event timed from its ingest (its 202, were it a webhook) to
   its arrival. Run A: nothing else queued. Run B: ``--backlog`` events for ``t00/s0``
   (its own sink process, ~5 ms answers) queued before the worker starts, draining
   meanwhile. Run C: the same backlog, drained by a second relay of its own (its own
   redis-server and worker, the same sink process) on the same machine, while the
   first relay carries only the steady events: what the drain's load costs the others
   when they share nothing of the relay but the machine (its cores and its disk). Run D:
   the same, but the second relay shares the first's redis-server (under a key prefix
   of its own): C against D tells the share of the shared Redis from that of the
   shared worker. The other sinks' p50/p99 in each run, per sink and together, B/A,
   C/A, B/C and D/C.
4. **Push latency**: webhooks at ``--rate`` (200/s) through ``chert-relay run`` (and
   ``serve`` + ``worker``) on the shipped config to the ~1 ms sink, from the webhook's
   send and from its answer to the sink's arrival (``bench/e2e.py``'s load generator);
   the baseline is the same load generator POSTing straight to the same sink.
5. **Recovery**: ``--recovery-events`` queued for a sink answering 503; the worker
   starts, the breaker opens (shipped breaker settings), the sink stays down
   ``--down-seconds`` more and then answers 200 again: "sink back -> first 2xx" and
   "sink back -> backlog drained", against the time the same backlog takes to drain
   from a healthy sink at concurrency 16 in this run (section 1's rate).

    python bench/scheduling.py [--quick] [--rounds 2] [--events 3000] [--fair-rate 200]
        [--fair-seconds 30] [--backlog 50000] [--json FILE]

``--quick``: a smoke run, small sizes and one round (under ~2 minutes). Every process it
starts is stopped on the way out, on Ctrl-C and on failure too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import drain as drain_py  # noqa: E402
from drain import (  # noqa: E402
    SINK_SECRET,
    WORKER_ADMIN,
    baseline,
    body,
    deferrals,
    drain,
    fill,
    toml,
    worker,
)
from e2e import get_json, latency_run, pct, run_loadgen, wait_delivered  # noqa: E402
from receiver import stop, wait_port  # noqa: E402
from sinkserver import start_sink  # noqa: E402

from relay.config import SinkConfig, WorkerConfig  # noqa: E402
from relay.store.embedded import EmbeddedRedis, free_port  # noqa: E402

SHIPPED = WorkerConfig()
SHIPPED_CAP: int = SinkConfig.model_fields["concurrency"].default
QUICK = {
    "events": 500,
    "fair_seconds": 5.0,
    "backlog": 5_000,
    "latency_seconds": 3.0,
    "recovery_events": 300,
    "down_seconds": 2.0,
    "rounds": 1,
}
FULL = {
    "events": 3_000,
    "fair_seconds": 30.0,
    "backlog": 50_000,
    "latency_seconds": 20.0,
    "recovery_events": 1_000,
    "down_seconds": 10.0,
    "rounds": 2,
}
TENANTS, SINKS_PER_TENANT = 20, 5
WINDOW_S = 2.0  # fairness: the p99 of each window of this many seconds of ingest, too


def rotate(items: Sequence[str], r: int) -> list[str]:
    """``items`` starting at the ``r``-th: each round measures in another order."""
    k = r % len(items)
    return [*items[k:], *items[:k]]


def settle() -> None:
    """Write out what the last run left in the page cache before a measurement, so that
    its writeback does not stall this run's fsyncs (``appendfsync always``). Cheap
    insurance: a run A right after a run B (its Redis wrote ~75 MB of AOF in 10 s) once
    measured p99 0.7 s where 55 ms is usual; with this, and B's files deleted, it did
    not again (the cause was not pinned down: this machine is shared)."""
    os.sync()


def control(sink: str, **settings: float) -> None:
    """Set the sink's answer: ``status`` and ``delay_ms``."""
    query = "&".join(f"{k}={v}" for k, v in settings.items())
    get_json(f"{sink}/control?{query}", "POST")


def drain_args(events: int, concurrency: int | None) -> argparse.Namespace:
    """``bench/drain.py``'s drain of ``events`` for one sink, on the shipped worker;
    ``concurrency`` None: the sink's shipped cap."""
    return argparse.Namespace(
        events=events, sinks=1, concurrency=concurrency, poll_delay=None, max_jobs=None
    )


def busy_per_1000(got: dict[str, float], events: int) -> float:
    """Busy deferrals per 1,000 deliveries of a drain (one delivery per event): a delivery
    put back in the queue to be read again because its sink was at its cap."""
    return got.get("deferred_busy", 0.0) * 1000 / events


def waits_per_1000(got: dict[str, float], events: int) -> float:
    """Busy waits per 1,000 deliveries: a delivery set aside until its sink had a free
    slot (once per wait; at most 1,000)."""
    return got.get("deferred_wait_busy", 0.0) * 1000 / events


# --- 1 and 2: backlog drains -----------------------------------------------------------------


def backlog_drain(work: Path, sink: str, args: argparse.Namespace, r: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in rotate(["c16", "c200", "plain"], r):
        settle()
        if name == "plain":
            b = baseline(sink, args.events, SHIPPED.max_jobs)
            out["plain"] = {"rate": b["rate"], "cpu_ms": b["client_ms"]}
            print(f"  plain client ({SHIPPED.max_jobs} at once): {b['rate']:,.0f} requests/s")
            continue
        cap = None if name == "c16" else 200
        got = drain(work / f"r{r}-drain-{name}", sink, drain_args(args.events, cap))
        out[name] = {
            "rate": got["deliveries_s"],
            "busy_per_1000": busy_per_1000(got, args.events),
            "waits_per_1000": waits_per_1000(got, args.events),
            "cpu_ms": got["worker_ms"],
            "redis_ms": got["redis_ms"],
        }
        label = f"concurrency {SHIPPED_CAP} (shipped)" if cap is None else "concurrency 200"
        print(
            f"  drain, {label}: {got['deliveries_s']:,.0f} deliveries/s, busy deferrals "
            f"{out[name]['busy_per_1000']:,.0f} per 1,000 deliveries (busy waits, once each: "
            f"{out[name]['waits_per_1000']:,.0f}); CPU per delivery: worker "
            f"{got['worker_ms']:.3f} ms (its start-up included), redis-server "
            f"{got['redis_ms']:.3f} ms"
        )
    out["c16_c200"] = out["c16"]["rate"] / out["c200"]["rate"]
    out["c16_plain"] = out["c16"]["rate"] / out["plain"]["rate"]
    out["c200_plain"] = out["c200"]["rate"] / out["plain"]["rate"]
    print(
        f"  ratios: {SHIPPED_CAP}/200 {out['c16_c200']:.2f}, {SHIPPED_CAP}/plain "
        f"{out['c16_plain']:.2f}, 200/plain {out['c200_plain']:.2f}"
    )
    return out


def slow_sink(work: Path, sink: str, args: argparse.Namespace, r: int) -> dict[str, Any]:
    out: dict[str, Any] = {"limit": SHIPPED_CAP / (args.slow_ms / 1000)}
    control(sink, delay_ms=args.slow_ms)
    try:
        for name in rotate(["relay", "plain"], r):
            settle()
            if name == "plain":
                b = baseline(sink, args.events, SHIPPED_CAP)
                out["plain"] = b["rate"]
                print(f"  plain client ({SHIPPED_CAP} at once): {b['rate']:,.0f} requests/s")
            else:
                got = drain(work / f"r{r}-slow", sink, drain_args(args.events, None))
                out["rate"] = got["deliveries_s"]
                out["busy_per_1000"] = busy_per_1000(got, args.events)
                print(
                    f"  drain, concurrency {SHIPPED_CAP}, sink answering in {args.slow_ms:g} ms:"
                    f" {got['deliveries_s']:,.0f} deliveries/s, busy deferrals "
                    f"{out['busy_per_1000']:,.0f} per 1,000 deliveries"
                )
    finally:
        with contextlib.suppress(OSError):  # the sink may be gone (Ctrl-C)
            control(sink, delay_ms=args.sink_ms)
    out["of_limit"] = out["rate"] / out["limit"]
    out["of_plain"] = out["rate"] / out["plain"]
    print(
        f"  ratios: to the cap's limit ({out['limit']:,.0f}/s) {out['of_limit']:.2f}, to the "
        f"plain client at {SHIPPED_CAP} {out['of_plain']:.2f}"
    )
    return out


# --- 3: fairness -----------------------------------------------------------------------------


def tenant(t: int) -> str:
    return f"fair-t{t:02d}"


def fair_config(work: Path, redis_url: str, fast: str, slow: str) -> dict[str, Any]:
    """20 tenants x 5 sinks on the shipped settings; sink k of tenant t takes only events of
    type ``bench.s{k}``, at ``/t{t}/s{k}`` (``t00/s0`` on the slow sink process). The
    secrets are in files (literals would be warned about 120 times at each start)."""
    (work / "webhook.secret").write_text("x" * 32)
    (work / "sink.secret").write_text(SINK_SECRET)
    return {
        "redis": {"url": redis_url},
        "admin": {"listen": "127.0.0.1:0", "worker_listen": f"127.0.0.1:{WORKER_ADMIN[0]}"},
        "tenants": [
            {
                "slug": tenant(t),
                "webhook_secrets": [f"file:{work / 'webhook.secret'}"],
                "poll": {"mode": "off"},
                "sinks": [
                    {
                        "name": f"s{k}",
                        "url": f"{slow if (t, k) == (0, 0) else fast}/t{t:02d}/s{k}",
                        "events": [f"bench.s{k}"],
                        "secret": f"file:{work / 'sink.secret'}",
                    }
                    for k in range(SINKS_PER_TENANT)
                ],
            }
            for t in range(TENANTS)
        ],
    }


OTHERS = [(t, k) for t in range(TENANTS) for k in range(SINKS_PER_TENANT) if (t, k) != (0, 0)]


def steady_event(run: str) -> Callable[[int], tuple[str, str, bytes]]:
    """The j-th steady event: round-robin over the sinks other than ``t00/s0``."""

    def make(j: int) -> tuple[str, str, bytes]:
        t, k = OTHERS[j % len(OTHERS)]
        event_id = f"{run}:{j}"
        return tenant(t), event_id, body(event_id, tenant(t), f"bench.s{k}")

    return make


def backlog_event(run: str) -> Callable[[int], tuple[str, str, bytes]]:
    def make(j: int) -> tuple[str, str, bytes]:
        event_id = f"{run}-backlog:{j}"
        return tenant(0), event_id, body(event_id, tenant(0), "bench.s0")

    return make


def wait_count(sink: str, key: str, expected: int, timeout: float) -> dict[str, Any]:
    """The sink's stats once ``key`` reaches ``expected``, or when ``timeout`` is up."""
    deadline = time.monotonic() + timeout
    while True:
        stats: dict[str, Any] = get_json(f"{sink}/stats")
        if stats[key] >= expected or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def fair_run(
    work: Path, fast: str, slow: str, args: argparse.Namespace, backlog: int, apart: str = ""
) -> dict[str, Any]:
    """One fairness run; ``apart``: the backlog goes to a second relay with a worker of its
    own and its own redis-server (``"redis"``, run C) or the first's (``"worker"``, run D)."""
    for s in (fast, slow):
        get_json(f"{s}/reset", "POST")
    work.mkdir()
    redis = EmbeddedRedis(work / "redis", port=free_port())
    asyncio.run(redis.start())
    n = int(args.fair_rate * args.fair_seconds)
    acked: dict[str, float] = {}
    try:
        data = fair_config(work, redis.url, fast, slow)
        path = work / "relay.toml"
        path.write_text(toml(data))
        with contextlib.ExitStack() as apart_relay:
            if backlog and apart:
                shared = redis.url if apart == "worker" else None
                apart_relay.enter_context(
                    backlog_relay(work / "apart", fast, slow, backlog, shared)
                )
            elif backlog:
                asyncio.run(fill(data, backlog, work.name, event=backlog_event(work.name)))
            proc = worker(path)
            try:
                wait_port(WORKER_ADMIN[0])
                asyncio.run(
                    fill(
                        data,
                        n,
                        work.name,
                        at=args.fair_rate,
                        acked=acked,
                        event=steady_event(work.name),
                    )
                )
                slow_during = get_json(f"{slow}/stats")
                timeout = max(60.0, args.fair_seconds * 4)
                stats = wait_count(fast, "deliveries", n, timeout=timeout)
                arrived: dict[str, dict[str, float]] = get_json(f"{fast}/dump?by=path")
                deferred = deferrals()
            finally:
                stop(proc)
    finally:
        asyncio.run(redis.stop())
        shutil.rmtree(work / "redis", ignore_errors=True)  # its AOF need never be written out
    per_sink: dict[str, list[float]] = {}
    for p, ids in arrived.items():
        per_sink[p.strip("/")] = [(at - acked[i]) * 1000 for i, at in ids.items() if i in acked]
    every = [ms for lat in per_sink.values() for ms in lat]
    # p99 per window of ingest time: whether the slow ones bunch (a backlog set aside at the
    # start) or spread (a drain sharing the machine)
    start = min(acked.values(), default=0.0)
    windows: dict[int, list[float]] = {}
    for ids in arrived.values():
        for i, at in ids.items():
            if i in acked:
                w = int((acked[i] - start) // WINDOW_S)
                windows.setdefault(w, []).append((at - acked[i]) * 1000)
    out: dict[str, Any] = {
        "delivered": stats["deliveries"],
        "expected": n,
        "p50": pct(every, 50) if every else float("nan"),
        "p99": pct(every, 99) if every else float("nan"),
        "max": max(every, default=float("nan")),
        "sinks": {
            s: {"p50": pct(v, 50), "p99": pct(v, 99), "n": len(v)} for s, v in per_sink.items() if v
        },
        "deferred": deferred,
        "windows": [pct(windows[w], 99) for w in sorted(windows)],
    }
    if backlog:
        span = slow_during["last"] - slow_during["first"]
        out["backlog_done"] = slow_during["unique"]
        out["backlog_rate"] = slow_during["unique"] / span if span > 0 else 0.0
    return out


@contextlib.contextmanager
def backlog_relay(
    work: Path, fast: str, slow: str, backlog: int, redis_url: str | None
) -> Iterator[None]:
    """Runs C and D's second relay: a worker of its own, tenant ``t00`` only, with the
    backlog queued for ``t00/s0`` before the worker starts; on a redis-server of its own,
    or on ``redis_url`` under a key prefix of its own. Stopped on the way out."""
    work.mkdir()
    redis = EmbeddedRedis(work / "redis", port=free_port())
    if redis_url is None:
        asyncio.run(redis.start())
    try:
        data = fair_config(work, redis_url or redis.url, fast, slow)
        data["redis"]["key_prefix"] = "bench-apart"
        data["tenants"] = data["tenants"][:1]
        data["admin"] = {"listen": "127.0.0.1:0", "worker_listen": f"127.0.0.1:{free_port()}"}
        path = work / "relay.toml"
        path.write_text(toml(data))
        asyncio.run(fill(data, backlog, work.parent.name, event=backlog_event(work.parent.name)))
        proc = worker(path)
        try:
            yield
        finally:
            stop(proc)
    finally:
        if redis_url is None:
            asyncio.run(redis.stop())
            shutil.rmtree(work / "redis", ignore_errors=True)


def fairness(work: Path, fast: str, slow: str, args: argparse.Namespace, r: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in rotate(["A", "B", "C", "D"], r):
        settle()
        backlog = args.backlog if name != "A" else 0
        apart = {"C": "redis", "D": "worker"}.get(name, "")
        got = fair_run(work / f"r{r}-fair-{name}", fast, slow, args, backlog, apart=apart)
        out[name] = got
        p99s = [s["p99"] for s in got["sinks"].values()]
        what = f"a {backlog:,}-delivery backlog for t00/s0" if backlog else "no backlog"
        if name == "C":
            what += ", drained by a second relay of its own"
        elif name == "D":
            what += ", drained by a second relay's worker on the same redis-server"
        print(
            f"  run {name} ({what}): the other {len(got['sinks'])} sinks, {got['delivered']:,} of"
            f" {got['expected']:,} delivered: p50 {got['p50']:.1f} ms, p99 {got['p99']:.1f} ms,"
            f" max {got['max']:.0f} ms;"
            f" per-sink p99 median {statistics.median(p99s):.1f} ms, worst {max(p99s):.1f} ms"
            + (
                f"; t00/s0 drained {got['backlog_done']:,} of its backlog meanwhile "
                f"({got['backlog_rate']:,.0f}/s); busy deferrals "
                f"{got['deferred'].get('busy', 0):,.0f}"
                if backlog
                else ""
            )
        )
        print(
            f"    p99 by {WINDOW_S:g} s of ingest: "
            + " ".join(f"{v:.0f}" for v in got["windows"])
            + " ms"
        )
    a, b = out["A"], out["B"]
    out["p99_ratio"] = b["p99"] / a["p99"]
    out["p99_ratio_c"] = b["p99"] / out["C"]["p99"]
    out["c_ratio"] = out["C"]["p99"] / a["p99"]
    out["d_ratio_c"] = out["D"]["p99"] / out["C"]["p99"]
    ratios = {s: b["sinks"][s]["p99"] / v["p99"] for s, v in a["sinks"].items() if s in b["sinks"]}
    out["sink_ratios"] = ratios
    worst = max(ratios, key=ratios.__getitem__)
    out["worst_sink"], out["worst_ratio"] = worst, ratios[worst]
    out["over_2x"] = sum(1 for v in ratios.values() if v > 2)
    print(
        f"  B/A p99: together {out['p99_ratio']:.2f}; per sink median "
        f"{statistics.median(ratios.values()):.2f}, worst {worst} {ratios[worst]:.2f}; "
        f"{out['over_2x']} of {len(ratios)} sinks over 2x"
    )
    print(
        f"  C/A p99 {out['c_ratio']:.2f} (the machine's share: the drain in a relay of its "
        f"own); B/C p99 {out['p99_ratio_c']:.2f} (the share of sharing the relay); D/C p99 "
        f"{out['d_ratio_c']:.2f} (the share of sharing its redis-server alone)"
    )
    if args.per_sink:
        for s in sorted(a["sinks"]):
            if s in b["sinks"]:
                print(
                    f"    {s}: A p50 {a['sinks'][s]['p50']:.1f} p99 {a['sinks'][s]['p99']:.1f} ms;"
                    f" B p50 {b['sinks'][s]['p50']:.1f} p99 {b['sinks'][s]['p99']:.1f} ms;"
                    f" B/A p99 {ratios[s]:.2f}"
                )
    return out


# --- 4: push latency -------------------------------------------------------------------------


def push_latency(work: Path, sink: str, args: argparse.Namespace, r: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in rotate(["direct", *args.shapes], r):
        settle()
        if name == "direct":
            get_json(f"{sink}/reset", "POST")
            doc = run_loadgen(
                f"{sink}/direct", args.rate, args.latency_seconds, work / f"r{r}-direct.json"
            )
            wait_delivered(sink, len(doc["sent"]), timeout=60)
            arrived: dict[str, float] = get_json(f"{sink}/dump")
            lat = [(arrived[i] - t) * 1000 for i, t in doc["sent"].items() if i in arrived]
            out["direct"] = {"p50": pct(lat, 50), "p99": pct(lat, 99), "n": len(lat)}
            print(
                f"  direct POST to the sink: p50 {pct(lat, 50):.1f} ms, p99 {pct(lat, 99):.1f} ms"
            )
            continue
        got = latency_run(
            work / f"r{r}-lat-{name}",
            sink,
            args.rate,
            args.latency_seconds,
            name == "split",
            SHIPPED.poll_delay,
            shipped=True,
        )
        sent, answered = got["sent"], got["answered"]
        out[name] = {
            "p50": pct(sent, 50),
            "p99": pct(sent, 99),
            "answered_p50": pct(answered, 50),
            "answered_p99": pct(answered, 99),
            "n": len(sent),
            "refused": got["failed"],
        }
        shape = "chert-relay run" if name == "run" else "serve + worker"
        print(
            f"  {shape}: webhook sent -> sink p50 {pct(sent, 50):.1f} ms, p99 "
            f"{pct(sent, 99):.1f} ms; answered -> sink p50 {pct(answered, 50):.1f} ms, p99 "
            f"{pct(answered, 99):.1f} ms ({len(sent):,} events, {got['failed']} refused)"
        )
    for name in args.shapes:
        out[name]["p99_ratio"] = out[name]["p99"] / out["direct"]["p99"]
        out[name]["p50_ratio"] = out[name]["p50"] / out["direct"]["p50"]
    print(
        "  ratios to the direct POST (sent -> sink): "
        + "; ".join(
            f"{n} p50 {out[n]['p50_ratio']:.1f}x, p99 {out[n]['p99_ratio']:.1f}x"
            for n in args.shapes
        )
    )
    return out


# --- 5: recovery -----------------------------------------------------------------------------


def recovery(work: Path, sink: str, args: argparse.Namespace, r: int) -> dict[str, Any]:
    n = args.recovery_events
    settle()
    get_json(f"{sink}/reset", "POST")
    control(sink, status=503)
    work = work / f"r{r}-recovery"
    work.mkdir()
    redis = EmbeddedRedis(work / "redis", port=free_port())
    asyncio.run(redis.start())
    try:
        data = drain_py.config(redis.url, sink, 1, None, None, None)
        path = work / "relay.toml"
        path.write_text(toml(data))
        asyncio.run(fill(data, n, work.name))
        proc = worker(path)
        try:
            started = time.time()
            opened = 0.0
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                with contextlib.suppress(OSError):
                    put_off = deferrals()
                    if put_off.get("breaker_open", 0) + put_off.get("wait_breaker_open", 0) > 0:
                        opened = time.time()
                        break
                time.sleep(0.05)
            if not opened:
                raise SystemExit("recovery: the breaker did not open within 60 s")
            failed = get_json(f"{sink}/stats")["requests"]
            time.sleep(args.down_seconds)
            back = time.time()
            control(sink, status=200)
            stats = wait_count(sink, "unique", n, timeout=args.recovery_timeout)
            deferred = deferrals()
        finally:
            stop(proc)
    finally:
        with contextlib.suppress(OSError):  # the sink may be gone (Ctrl-C)
            control(sink, status=200)
        asyncio.run(redis.stop())
    if stats["unique"] < n:
        print(
            f"  recovery: only {stats['unique']} of {n} delivered {args.recovery_timeout:.0f} s"
            " after the sink came back"
        )
    out = {
        "events": n,
        "opened_after": opened - started,
        "failed_requests": failed,
        "first_2xx": stats["first"] - back if stats["first"] else float("nan"),
        "drained": stats["last"] - back if stats["unique"] >= n else float("nan"),
        "delivered": stats["unique"],
        "deferred": deferred,
    }
    print(
        f"  recovery ({n:,} queued, sink answering 503): breaker open {out['opened_after']:.1f} s"
        f" after the worker started ({failed} requests failed), sink back {args.down_seconds:g} s"
        f" later; sink back -> first 2xx {out['first_2xx']:.1f} s, -> backlog drained "
        f"{out['drained']:.1f} s"
    )
    return out


# --- processes -------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (children first), from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def reap() -> None:
    """Stop whatever this run started and is still running (a safety net: each part
    stops its own processes): SIGTERM, then SIGKILL after 10 s."""
    left = [p for p in descendants(os.getpid()) if alive(p)]
    if left:
        print(f"stopping {len(left)} process(es) left running: {left}", file=sys.stderr)
        for p in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in left) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(-1, os.WNOHANG)
            time.sleep(0.1)
        for p in left:
            if alive(p):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


# --- main ------------------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], fmt: str = ".2f") -> str:
    """The median, and every round's value when there are several."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{med(values):{fmt}} (rounds {', '.join(format(v, fmt) for v in values)})"


def summary(rounds: list[dict[str, Any]], args: argparse.Namespace) -> None:
    def col(section: str, *path: str) -> list[float]:
        out = []
        for r in rounds:
            v: Any = r[section]
            for p in path:
                v = v[p]
            out.append(float(v))
        return out

    cap = SHIPPED_CAP
    print("\n== summary (medians over rounds; every ratio is to a baseline of the same round)")
    have = rounds[0].keys()
    if "drain" in have:
        print(
            f"1. backlog drain, {args.events:,} events, ~{args.sink_ms:g} ms sink, one worker:\n"
            f"   concurrency {cap} (shipped): {spread(col('drain', 'c16', 'rate'), ',.0f')}"
            " deliveries/s;"
            f" concurrency 200: {spread(col('drain', 'c200', 'rate'), ',.0f')}/s;"
            f" plain client: {spread(col('drain', 'plain', 'rate'), ',.0f')} requests/s\n"
            f"   {cap} / 200: {spread(col('drain', 'c16_c200'))}   (goal >= 0.8)\n"
            f"   {cap} / plain client: {spread(col('drain', 'c16_plain'))}   (goal >= 0.8)\n"
            f"   200 / plain client: {spread(col('drain', 'c200_plain'))}\n"
            f"   busy deferrals per 1,000 deliveries: concurrency {cap} "
            f"{spread(col('drain', 'c16', 'busy_per_1000'), ',.0f')}, concurrency 200 "
            f"{spread(col('drain', 'c200', 'busy_per_1000'), ',.0f')}   (goal: near 0)\n"
            f"   busy waits (set aside once until a slot frees) per 1,000 deliveries: "
            f"concurrency {cap} {spread(col('drain', 'c16', 'waits_per_1000'), ',.0f')}\n"
            f"   worker CPU per delivery: concurrency {cap} "
            f"{spread(col('drain', 'c16', 'cpu_ms'), '.3f')} ms, 200 "
            f"{spread(col('drain', 'c200', 'cpu_ms'), '.3f')} ms; plain client per request "
            f"{spread(col('drain', 'plain', 'cpu_ms'), '.3f')} ms; redis-server per delivery:"
            f" concurrency {cap} {spread(col('drain', 'c16', 'redis_ms'), '.3f')} ms, 200 "
            f"{spread(col('drain', 'c200', 'redis_ms'), '.3f')} ms"
        )
    if "slow" in have:
        print(
            f"2. slow sink ({args.slow_ms:g} ms), concurrency {cap}: "
            f"{spread(col('slow', 'rate'), ',.0f')} deliveries/s; of the cap's limit "
            f"({rounds[0]['slow']['limit']:,.0f}/s): {spread(col('slow', 'of_limit'))}; of the"
            f" plain client at {cap} ({spread(col('slow', 'plain'), ',.0f')}/s): "
            f"{spread(col('slow', 'of_plain'))}"
            f"; busy deferrals per 1,000: {spread(col('slow', 'busy_per_1000'), ',.0f')}"
        )
    if "fair" in have:
        print(
            f"3. fairness, {TENANTS} x {SINKS_PER_TENANT} sinks, {args.fair_rate:g} events/s for "
            f"{args.fair_seconds:g} s; the other 99 sinks, ingest -> sink:\n"
            f"   A (no backlog): p50 {spread(col('fair', 'A', 'p50'), '.1f')} ms, p99 "
            f"{spread(col('fair', 'A', 'p99'), '.1f')} ms\n"
            f"   B ({args.backlog:,} backlog on t00/s0): p50 "
            f"{spread(col('fair', 'B', 'p50'), '.1f')} ms,"
            f" p99 {spread(col('fair', 'B', 'p99'), '.1f')} ms\n"
            f"   B/A p99: {spread(col('fair', 'p99_ratio'))} together; worst sink "
            f"{spread(col('fair', 'worst_ratio'))}; sinks over 2x: "
            f"{spread(col('fair', 'over_2x'), '.0f')} of 99   (goal: every sink <= 2)\n"
            f"   C (the backlog drained by a relay of its own): p50 "
            f"{spread(col('fair', 'C', 'p50'), '.1f')} ms, p99 "
            f"{spread(col('fair', 'C', 'p99'), '.1f')} ms; C/A p99 "
            f"{spread(col('fair', 'c_ratio'))}; B/C p99 {spread(col('fair', 'p99_ratio_c'))}\n"
            f"   D (its own worker, the same redis-server): p50 "
            f"{spread(col('fair', 'D', 'p50'), '.1f')} ms, p99 "
            f"{spread(col('fair', 'D', 'p99'), '.1f')} ms; D/C p99 "
            f"{spread(col('fair', 'd_ratio_c'))}"
        )
    if "latency" in have:
        latency_summary(col, args)
    if "recovery" in have:
        recovery_summary(rounds, col, args)


def latency_summary(col: Callable[..., list[float]], args: argparse.Namespace) -> None:
    lines = [
        f"   direct POST to the sink: p50 {spread(col('latency', 'direct', 'p50'), '.1f')} ms, "
        f"p99 {spread(col('latency', 'direct', 'p99'), '.1f')} ms"
    ]
    for shape in args.shapes:
        lines.append(
            f"   {'chert-relay run' if shape == 'run' else 'serve + worker'}: answered -> sink p50 "
            f"{spread(col('latency', shape, 'answered_p50'), '.1f')} ms, p99 "
            f"{spread(col('latency', shape, 'answered_p99'), '.1f')} ms (goal p99 <= 10 ms); "
            f"sent -> sink p50 {spread(col('latency', shape, 'p50'), '.1f')}, p99 "
            f"{spread(col('latency', shape, 'p99'), '.1f')} ms = "
            f"{spread(col('latency', shape, 'p99_ratio'), '.1f')}x the direct p99"
        )
    print(f"4. push latency at {args.rate:g} events/s, shipped config:\n" + "\n".join(lines))


def recovery_summary(
    rounds: list[dict[str, Any]], col: Callable[..., list[float]], args: argparse.Namespace
) -> None:
    cap = SHIPPED_CAP
    healthy = [args.recovery_events / r["drain"]["c16"]["rate"] for r in rounds]
    drained = col("recovery", "drained")
    slower = [d / h for d, h in zip(drained, healthy, strict=True)]
    print(
        f"5. recovery ({args.recovery_events:,} queued, sink down {args.down_seconds:g} s past the"
        f" breaker opening; breaker_cooldown {SHIPPED.breaker_cooldown:g} s):\n"
        f"   sink back -> first 2xx {spread(col('recovery', 'first_2xx'), '.1f')} s;"
        f" -> backlog drained {spread(drained, '.1f')} s, {spread(slower, '.1f')}x"
        f" the {spread(healthy, '.1f')} s the same backlog takes from a healthy sink (section 1's"
        f" rate at concurrency {cap})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, one round")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--events", type=int, help="backlog of the drains (3,000)")
    ap.add_argument("--sink-ms", type=float, default=1.0, help="the sink's answer time")
    ap.add_argument("--slow-ms", type=float, default=20.0, help="the slow sink's answer time")
    ap.add_argument("--fair-rate", type=float, default=200.0, help="events/s, all tenants")
    ap.add_argument("--fair-seconds", type=float)
    ap.add_argument("--backlog", type=int, help="run B's backlog for one sink (50,000)")
    ap.add_argument("--backlog-ms", type=float, default=5.0, help="its sink's answer time")
    ap.add_argument("--per-sink", action="store_true", help="print each sink's p50/p99")
    ap.add_argument("--rate", type=float, default=200.0, help="push latency: events/s")
    ap.add_argument("--latency-seconds", type=float)
    ap.add_argument("--shapes", default="run,split", help="push latency: run, split or both")
    ap.add_argument("--recovery-events", type=int)
    ap.add_argument(
        "--down-seconds", type=float, help="the sink stays down after the breaker opens"
    )
    ap.add_argument("--recovery-timeout", type=float, default=300.0)
    ap.add_argument("--only", default="1,2,3,4,5", help="sections to run (1-5); 5 needs 1")
    ap.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    args = ap.parse_args()
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.shapes = [s for s in args.shapes.split(",") if s]
    only = {int(s) for s in args.only.split(",")}
    if 5 in only:
        only.add(1)

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True
    ).stdout.strip()
    print(
        f"bench/scheduling.py {'--quick ' if args.quick else ''}at {commit or '?'}, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f}\nshipped: sink concurrency {SHIPPED_CAP}, worker max_jobs "
        f"{SHIPPED.max_jobs}, poll_delay {SHIPPED.poll_delay:g} s, breaker "
        f"{SHIPPED.breaker_failures} failures / {SHIPPED.breaker_failure_rate:g} over "
        f"{SHIPPED.breaker_window:g} s, cooldown {SHIPPED.breaker_cooldown:g} s",
        flush=True,
    )
    rounds: list[dict[str, Any]] = []
    started = time.monotonic()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="schedbench-") as tmp:
            work = Path(tmp)
            ports = {"sink": free_port(), "backlog": free_port()}
            procs.append(start_sink(ports["sink"], args.sink_ms))
            procs.append(start_sink(ports["backlog"], args.backlog_ms))
            drain_py.SINK_PID.append(procs[0].pid)
            for port in ports.values():
                wait_port(port)
            sink = f"http://127.0.0.1:{ports['sink']}"
            slow = f"http://127.0.0.1:{ports['backlog']}"
            sections: list[tuple[int, str, Callable[[int], dict[str, Any]]]] = [
                (1, "drain", lambda r: backlog_drain(work, sink, args, r)),
                (2, "slow", lambda r: slow_sink(work, sink, args, r)),
                (3, "fair", lambda r: fairness(work, sink, slow, args, r)),
                (4, "latency", lambda r: push_latency(work, sink, args, r)),
                (5, "recovery", lambda r: recovery(work, sink, args, r)),
            ]
            titles = {
                1: "backlog drain",
                2: "slow sink",
                3: "fairness",
                4: "push latency",
                5: "recovery",
            }
            for r in range(args.rounds):
                got: dict[str, Any] = {}
                for number, key, run in sections:
                    if number in only:
                        print(
                            f"round {r + 1}, {number}. {titles[number]} "
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
