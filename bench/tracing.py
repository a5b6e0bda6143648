"""What tracing costs: ingest and delivery with tracing off, on, and in the code before it.

Three variants, alternated in every round on the same machine:

- **before**: the tree ``--before`` names (a ``git worktree`` of the code without
  tracing), its shipped configuration;
- **off**: this tree, ``[telemetry] tracing = false`` (the default);
- **on**: this tree, ``tracing = true``, exporting every span (the default sampler)
  over OTLP/HTTP to a stand-in collector (its own process: it answers 200 and drops
  what it gets), batched every 50 ms;
- **sampled**: as **on**, keeping one event in ten
  (``OTEL_TRACES_SAMPLER=parentbased_traceidratio``, ``OTEL_TRACES_SAMPLER_ARG=0.1``).

Each run takes a fresh redis-server (AOF, ``appendfsync always``) and then:

1. **ingest** — ``chert-relay serve`` takes ``--events`` signed webhooks, ``--concurrency``
   at a time, from an aiohttp client in this process: webhooks/s, and the serve
   process's CPU per webhook (``/proc``, start-up not counted);
2. **drain** — ``serve`` stopped, one ``chert-relay worker`` delivers them all to one
   sink (``bench/sinkserver.py``'s, its own process): deliveries/s from the first 2xx to
   the last, and the worker's CPU per delivery (start-up not counted).

Prints each run, then the medians of the per-round ratios off/before, on/off and
sampled/off.

    python bench/tracing.py --before /tmp/relay-before [--events 5000] [--rounds 3]
        [--variants before,off,on,sampled]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import aiohttp  # noqa: E402
from drain import SINK_SECRET, TENANT, body, cpu_s, toml  # noqa: E402
from e2e import get_json  # noqa: E402
from receiver import stop, wait_port  # noqa: E402

from relay.signing import webhook_headers  # noqa: E402
from relay.store.embedded import EmbeddedRedis, free_port  # noqa: E402

WEBHOOK_SECRET = "x" * 32
VARIANTS = ("before", "off", "on", "sampled")
SAMPLED = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}


def collector_main(port: int) -> None:
    """A stand-in OTLP/HTTP endpoint: 200 to every export, its spans dropped."""
    from aiohttp import web

    async def traces(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def config(redis_url: str, sink: str, variant: str, ports: dict[str, int]) -> dict[str, Any]:
    data: dict[str, Any] = {
        "server": {"listen": f"127.0.0.1:{ports['receiver']}"},
        "redis": {"url": redis_url},
        "admin": {
            "listen": f"127.0.0.1:{ports['admin']}",
            "worker_listen": f"127.0.0.1:{ports['worker']}",
        },
        "worker": {"max_jobs": 200, "poll_delay": 0.05},
        "tenants": [
            {
                "slug": TENANT,
                "webhook_secrets": [WEBHOOK_SECRET],
                "poll": {"mode": "off"},
                "sinks": [
                    {"name": "s0", "url": f"{sink}/hook/0", "secret": SINK_SECRET},
                ],
            }
        ],
    }
    if variant != "before":
        data["telemetry"] = {"tracing": variant != "off"}
    return data


def start(tree: Path, path: Path, command: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "relay", "--log-level", "warning", "-c", str(path), command]
    return subprocess.Popen(cmd, cwd=tree, env=env)


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the relay exited with {proc.returncode}")
        try:
            get_json(f"http://127.0.0.1:{port}/readyz")
            return
        except Exception:
            time.sleep(0.05)
    raise SystemExit("the relay did not become ready")


async def post_all(port: int, run: str, n: int, concurrency: int) -> None:
    url = f"http://127.0.0.1:{port}/webhooks/chert/{TENANT}"
    now = int(time.time())
    requests = []
    for j in range(n):
        raw = body(f"{run}:{j}")
        headers = {"Content-Type": "application/json"}
        headers.update(webhook_headers(WEBHOOK_SECRET, raw, timestamp=now))
        requests.append((raw, headers))
    queue = iter(requests)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def client() -> None:
            for raw, headers in queue:
                async with http.post(url, data=raw, headers=headers) as r:
                    assert r.status == 202, r.status

        await asyncio.gather(*(client() for _ in range(concurrency)))


def one_run(
    work: Path, tree: Path, variant: str, sink: str, env: dict[str, str], args: argparse.Namespace
) -> dict[str, float]:
    get_json(f"{sink}/reset", "POST")
    work.mkdir()
    redis = EmbeddedRedis(work / "redis", port=free_port())
    asyncio.run(redis.start())
    ports = {"receiver": free_port(), "admin": free_port(), "worker": free_port()}
    try:
        path = work / "relay.toml"
        path.write_text(toml(config(redis.url, sink, variant, ports)))
        serve = start(tree, path, "serve", env)
        try:
            wait_ready(ports["admin"], serve)
            cpu0, t0 = cpu_s(serve.pid), time.monotonic()
            asyncio.run(post_all(ports["receiver"], work.name, args.events, args.concurrency))
            ingest_s, ingest_cpu = time.monotonic() - t0, cpu_s(serve.pid) - cpu0
        finally:
            stop(serve)
        worker = start(tree, path, "worker", env)
        try:
            wait_ready(ports["worker"], worker)
            cpu0 = cpu_s(worker.pid)
            deadline = time.monotonic() + 600
            while True:
                stats = get_json(f"{sink}/stats")
                if stats["unique"] >= args.events:
                    drain_cpu = cpu_s(worker.pid) - cpu0
                    break
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"drain: {stats['unique']} of {args.events} delivered")
                time.sleep(0.2)
        finally:
            stop(worker)
    finally:
        asyncio.run(redis.stop())
    drain_s = max(stats["last"] - stats["first"], 1e-6)
    return {
        "ingest_rate": args.events / ingest_s,
        "ingest_cpu_us": ingest_cpu * 1e6 / args.events,
        "drain_rate": args.events / drain_s,
        "drain_cpu_us": drain_cpu * 1e6 / args.events,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", type=Path, required=True, help="the tree of the code before")
    ap.add_argument("--events", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help="which to run (default: all four)"
    )
    args = ap.parse_args()
    import os

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sink_port, otlp_port = free_port(), free_port()
        procs = [
            subprocess.Popen(
                [sys.executable, str(ROOT / "bench" / "e2e.py"), "--sink", str(sink_port)]
            ),
            subprocess.Popen([sys.executable, __file__, "--collector", str(otlp_port)]),
        ]
        env = {
            **os.environ,
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        }
        sink = f"http://127.0.0.1:{sink_port}"
        variants = tuple(v for v in VARIANTS if v in args.variants.split(","))
        results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
        try:
            wait_port(sink_port)
            wait_port(otlp_port)
            for r in range(args.rounds):
                order = variants if r % 2 == 0 else tuple(reversed(variants))
                for variant in order:
                    tree = args.before if variant == "before" else ROOT
                    run_env = {**env, **SAMPLED} if variant == "sampled" else env
                    got = one_run(work / f"{variant}{r}", tree, variant, sink, run_env, args)
                    results[variant].append(got)
                    print(
                        f"round {r + 1} {variant}: "
                        + json.dumps({k: round(v, 1) for k, v in got.items()}),
                        flush=True,
                    )
        finally:
            for p in procs:
                stop(p)
    for name, num, den in (
        ("off / before", "off", "before"),
        ("on / off", "on", "off"),
        ("sampled / off", "sampled", "off"),
    ):
        if num not in results or den not in results:
            continue
        line = []
        for key in ("ingest_rate", "ingest_cpu_us", "drain_rate", "drain_cpu_us"):
            ratios = [a[key] / b[key] for a, b in zip(results[num], results[den], strict=True)]
            line.append(
                f"{key} {statistics.median(ratios):.3f} ({', '.join(f'{x:.2f}' for x in ratios)})"
            )
        print(f"{name}: " + "; ".join(line))
    for variant in variants:
        med = {k: statistics.median(x[k] for x in results[variant]) for k in results[variant][0]}
        print(f"median {variant}: " + json.dumps({k: round(v, 1) for k, v in med.items()}))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--collector":
        collector_main(int(sys.argv[2]))
    else:
        main()
