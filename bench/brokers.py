"""Delivery rate of each sink kind on one machine in one run: HTTP, Redis Streams, NATS
JetStream, RabbitMQ.

For each kind, ``--events`` events are queued for one sink of that kind (the shipped
``concurrency`` of 16, unless ``--concurrency``), then one worker role (in this process,
the same way for every kind) drains them; the rate is deliveries over the time from
the worker's start to the last delivery it counted. The kinds run in rotated order for
``--rounds`` rounds; each rate is reported with its ratio to HTTP's in the same round.

- HTTP: ``bench/sinkserver.py`` (its own process) answering 200 at once.
- Redis Streams: ``XADD`` to a second ``redis-server`` (AOF, ``appendfsync everysec``).
- NATS: a JetStream stream with file storage on Debian's ``nats-server``.
- RabbitMQ: a durable direct exchange and queue on Debian's ``rabbitmq-server``,
  persistent messages with publisher confirms.

    python bench/brokers.py [--events 3000] [--rounds 2] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from redis.asyncio import Redis  # noqa: E402
from sinkserver import start_sink  # noqa: E402

from relay.config import parse_config  # noqa: E402
from relay.delivery.role import WorkerRole  # noqa: E402
from relay.ingest import envelope  # noqa: E402
from relay.ingest.ingestor import Ingestor  # noqa: E402
from relay.keys import Keys  # noqa: E402
from relay.metrics import Metrics  # noqa: E402
from relay.runtime import Runtime  # noqa: E402
from relay.store.embedded import EmbeddedRedis, free_port  # noqa: E402
from relay.store.endpoint import Endpoint  # noqa: E402
from tests.support.brokers import NatsServer, RabbitServer  # noqa: E402
from tests.support.common import SINK_SECRET, TENANT  # noqa: E402
from tests.support.common import envelope as make_envelope  # noqa: E402

KINDS = ("http", "redis-stream", "nats", "amqp")


def sink_of(kind: str, urls: dict[str, str], concurrency: int | None, run: str) -> dict[str, Any]:
    cap = {} if concurrency is None else {"concurrency": concurrency}
    base = {"name": "s", "secret": SINK_SECRET, **cap}
    if kind == "http":
        return {**base, "url": f"{urls['http']}/hook/{run}"}
    if kind == "redis-stream":
        return {**base, "url": urls["redis-stream"], "stream": f"bench-{run}"}
    if kind == "nats":
        return {**base, "url": urls["nats"], "subject": "bench.events"}
    return {**base, "url": urls["amqp"], "exchange": "bench", "routing_key": "events"}


async def drain(
    relay_redis: EmbeddedRedis, kind: str, urls: dict[str, str], n: int, args: Any, run: str
) -> float:
    """Queue ``n`` events for one sink of ``kind``; drain them; deliveries/s."""
    data = {
        "redis": {"url": relay_redis.url},
        "admin": {"listen": "127.0.0.1:0"},
        "worker": {"max_jobs": 200},
        "tenants": [
            {
                "slug": TENANT,
                "webhook_secrets": ["x" * 32],
                "poll": {"mode": "off"},
                "sinks": [sink_of(kind, urls, args.concurrency, run)],
            }
        ],
    }
    config = parse_config(data, env={})
    client: Redis = Redis.from_url(relay_redis.url)
    await client.flushall()
    metrics = Metrics()
    rt = Runtime(
        config=config,
        redis=client,
        metrics=metrics,
        ingestor=Ingestor(client, config, metrics),
        keys=Keys(config.redis.key_prefix),
        endpoint=Endpoint(url=relay_redis.url),
    )
    events = [envelope.from_object(make_envelope(f"{run}:{i}")) for i in range(n)]
    for start in range(0, n, 500):
        chunk = events[start : start + 500]
        await asyncio.gather(*(rt.ingestor.ingest(TENANT, e, "webhook") for e in chunk))
    role = WorkerRole(rt)
    await role.start()
    started = time.perf_counter()
    task = asyncio.create_task(role.run())
    last = started
    deadline = started + 600
    while True:
        done = sum(
            s.value
            for fam in metrics.registry.collect()
            for s in fam.samples
            if s.name == "chert_relay_deliveries_total" and s.labels.get("outcome") == "delivered"
        )
        if done >= n:
            last = time.perf_counter()
            break
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{kind}: only {done} of {n} delivered in 600 s")
        await asyncio.sleep(0.005)
    await role.stop()
    await task
    await client.aclose()
    return n / (last - started)


async def prepare(nats: NatsServer, rabbit: RabbitServer) -> None:
    await nats.add_stream("BENCH", ["bench.events"], storage="file")
    await rabbit.declare("bench", "direct", "bench", "events")


async def main_async(args: Any) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-brokers-"))
    relay_redis = EmbeddedRedis(work / "relay", port=free_port(), appendfsync="always")
    target = EmbeddedRedis(work / "target", port=free_port(), appendfsync="everysec")
    nats = NatsServer(work / "nats")
    rabbit = RabbitServer(work / "rabbit")
    http_port = free_port()
    sink = start_sink(http_port)
    try:
        await relay_redis.start()
        await target.start()
        await nats.start()
        await rabbit.start()
        await prepare(nats, rabbit)
        urls = {
            "http": f"http://127.0.0.1:{http_port}",
            "redis-stream": target.url,
            "nats": nats.url,
            "amqp": rabbit.url,
        }
        rates: dict[str, list[float]] = {k: [] for k in KINDS}
        ratios: dict[str, list[float]] = {k: [] for k in KINDS}
        for r in range(args.rounds):
            order = KINDS[r % len(KINDS) :] + KINDS[: r % len(KINDS)]
            found = {}
            for kind in order:
                found[kind] = await drain(relay_redis, kind, urls, args.events, args, f"r{r}{kind}")
                print(f"round {r + 1} {kind:13} {found[kind]:8.0f} deliveries/s", flush=True)
            for kind in KINDS:
                rates[kind].append(found[kind])
                ratios[kind].append(found[kind] / found["http"])
        cap = args.concurrency if args.concurrency is not None else "16 (the default)"
        print(f"\n{args.events} events, sink concurrency {cap}, {args.rounds} round(s)")
        print(f"{'kind':13} {'deliveries/s (median)':>22} {'vs HTTP (median)':>17}")
        for kind in KINDS:
            print(
                f"{kind:13} {statistics.median(rates[kind]):22.0f} "
                f"{statistics.median(ratios[kind]):17.2f}"
            )
    finally:
        sink.terminate()
        sink.wait()
        await rabbit.stop()
        await nats.stop()
        await target.stop()
        await relay_redis.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=None)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
