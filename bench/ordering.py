"""Ordered against unordered delivery to the same sink, same run.

A redis-server (AOF, ``appendfsync always``) on loopback, the sink of ``bench/e2e.py``
in its own process, and one ``chert-relay worker`` process. Each round queues the same
events — ``--chats`` chats of ``--per-chat`` events each — for a sink with ``ordering =
"chat"`` and for one without, then starts the worker and measures how fast it drains
the queue (distinct events at the sink / time from the first 2xx to the last).
Also: one hot chat alone (``--hot`` events of a single chat: its rate is one delivery
round trip after another), and the Redis memory a waiting chat costs (queued ordered
against unordered, per chat).

    python bench/ordering.py [--chats 1000] [--per-chat 20] [--hot 2000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from e2e import get_json, wait_delivered  # noqa: E402
from receiver import stop, wait_port  # noqa: E402
from redis.asyncio import Redis  # noqa: E402

from relay.config import Config, parse_config  # noqa: E402
from relay.ingest import envelope  # noqa: E402
from relay.ingest.ingestor import Ingestor  # noqa: E402
from relay.store.embedded import EmbeddedRedis, free_port  # noqa: E402

TENANT = "acme-7a3f"
SINK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def config(redis_url: str, sink_url: str, ordering: str) -> dict[str, object]:
    return {
        "redis": {"url": redis_url},
        "admin": {"listen": "127.0.0.1:0", "worker_listen": "127.0.0.1:0"},
        "worker": {"max_jobs": 200, "poll_delay": 0.05},
        "tenants": [
            {
                "slug": TENANT,
                "webhook_secrets": ["x" * 32],
                "poll": {"mode": "off"},
                "sinks": [
                    {
                        "name": "sink",
                        "url": sink_url,
                        "secret": SINK_SECRET,
                        "concurrency": 200,
                        "ordering": ordering,
                    }
                ],
            }
        ],
    }


def toml(data: dict[str, object]) -> str:
    def value(v: object) -> str:
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)

    lines = []
    for section, body in data.items():
        if section == "tenants":
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {value(v)}" for k, v in body.items()]  # type: ignore[attr-defined]
    for t in data["tenants"]:  # type: ignore[attr-defined]
        lines.append("[[tenants]]")
        lines += [f"{k} = {value(v)}" for k, v in t.items() if k != "sinks"]
        for s in t["sinks"]:
            lines.append("[[tenants.sinks]]")
            lines += [f"{k} = {value(v)}" for k, v in s.items()]
    return "\n".join(lines) + "\n"


def event(chat: str, n: int, run: str) -> envelope.Event:
    body = {
        "event": "message.received",
        "event_id": f"{run}:{chat}:{n}",
        "partner_id": TENANT,
        "timestamp": "2026-05-24T01:35:34.000Z",
        "data": {
            "chat": {"id": chat},
            "message": {
                "id": f"m{n}",
                "direction": "inbound",
                "parts": [{"type": "text", "value": "Sure, what time?"}],
            },
        },
    }
    return envelope.from_body(json.dumps(body).encode())


async def fill(cfg: Config, chats: list[str], per_chat: int, run: str) -> int:
    """Queue the events (chat by chat order); Redis memory used by them (bytes)."""
    client: Redis = Redis.from_url(cfg.redis.url.get())  # type: ignore[union-attr]
    before = (await client.info("memory"))["used_memory"]
    ingestor = Ingestor(client, cfg)
    for n in range(per_chat):
        await asyncio.gather(*(ingestor.ingest(TENANT, event(c, n, run), "webhook") for c in chats))
    await ingestor.drain()
    after = (await client.info("memory"))["used_memory"]
    await client.aclose()
    return int(after - before)


def drain(
    work: Path, sink: str, ordering: str, chats: list[str], per_chat: int
) -> tuple[float, int]:
    get_json(f"{sink}/reset", "POST")
    work.mkdir()
    redis = EmbeddedRedis(work / "redis", port=free_port())
    asyncio.run(redis.start())
    try:
        data = config(redis.url, f"{sink}/hook", ordering)
        path = work / "relay.toml"
        path.write_text(toml(data))
        cfg = parse_config(data, env={})
        memory = asyncio.run(fill(cfg, chats, per_chat, work.name))
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "--log-level", "warning", "-c", str(path), "worker"],
            cwd=ROOT,
        )
        try:
            stats = wait_delivered(sink, len(chats) * per_chat, timeout=900)
        finally:
            stop(proc)
    finally:
        asyncio.run(redis.stop())
    return stats["unique"] / (stats["last"] - stats["first"]), memory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chats", type=int, default=1000)
    ap.add_argument("--per-chat", type=int, default=20)
    ap.add_argument("--hot", type=int, default=2000, help="events of the one hot chat")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    chats = [f"chat{i:05d}" for i in range(args.chats)]
    n = args.chats * args.per_chat
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sink_port = free_port()
        sink_proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "e2e.py"), "--sink", str(sink_port)]
        )
        sink = f"http://127.0.0.1:{sink_port}"
        try:
            wait_port(sink_port)
            ratios = []
            for r in range(args.rounds):
                rate = {}
                memory = {}
                for ordering in ("none", "chat"):
                    rate[ordering], memory[ordering] = drain(
                        work / f"r{r}-{ordering}", sink, ordering, chats, args.per_chat
                    )
                ratios.append(rate["chat"] / rate["none"])
                per_chat = (memory["chat"] - memory["none"]) / args.chats
                print(
                    f"round {r + 1}: {n} events in {args.chats} chats: unordered "
                    f"{rate['none']:.0f}/s, ordered {rate['chat']:.0f}/s: ratio "
                    f"{ratios[-1]:.2f}; Redis memory queued: unordered {memory['none']:,} B, "
                    f"ordered {memory['chat']:,} B ({per_chat:+.0f} B per waiting chat)"
                )
            hot, _ = drain(work / "hot", sink, "chat", ["hot"], args.hot)
            print(f"one hot chat ({args.hot} events, ordered): {hot:.0f} events/s")
            print(f"ordered / unordered: {', '.join(f'{x:.2f}' for x in ratios)}")
        finally:
            stop(sink_proc)


if __name__ == "__main__":
    main()
