"""One scenario's relay: Redis, a counting sink, ``serve`` and ``worker`` from one config
file, and the bookkeeping every scenario reports (acked, delivered, lost, duplicates,
time to settle, restarts)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.faults.harness import (
    API_SECRET,
    TENANT,
    WEBHOOK_SECRET,
    Chert,
    CountingSink,
    RedisServer,
    RelayProcess,
    backlog,
    wait_http,
    write_config,
)
from relay.store.embedded import free_port


@dataclass
class Result:
    scenario: str
    title: str
    sent: int = 0
    acked: int = 0
    delivered: int = 0  # acked events the sink got at least once
    lost: int = 0  # acked and never delivered once the system settled
    duplicates: int = 0  # deliveries past the first, per event, at the sink
    settle_s: float = 0.0  # from the end of load and faults to the last delivery
    restarts: int = 0
    duplicates_allowed: bool = False  # a relay process (or Redis) crashed
    notes: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def ok(self) -> bool:
        return (
            not self.error
            and self.lost == 0
            and (self.duplicates_allowed or self.duplicates == 0)
            and self.acked > 0
        )


WORKER = {
    "max_jobs": 100,
    "poll_delay": 0.05,
    "shutdown_grace": 5,
    "retry_backoff": 0.2,
    "retry_backoff_max": 2.0,
    "breaker_failures": 10,
    "breaker_cooldown": 2.0,
}


class Stack:
    """The relay under test, in ``workdir``."""

    def __init__(self, workdir: Path, *, redis_dir: Path | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(redis_dir or workdir / "redis")
        self.sink = CountingSink()
        self.listen = free_port()
        self.admin = free_port()
        self.worker_admin = free_port()
        self.config = workdir / "relay.toml"
        self.serve = RelayProcess(self.config, "serve", workdir / "serve.log")
        self.worker = RelayProcess(
            self.config,
            "worker",
            workdir / "worker.log",
            "--admin-listen",
            f"127.0.0.1:{self.worker_admin}",
        )
        self.webhook_url = f"http://127.0.0.1:{self.listen}/webhooks/chert/{TENANT}"
        self.chert = Chert(self.webhook_url)
        self.client = self.redis.client()

    def write_config(
        self,
        *,
        sink: dict[str, Any] | None = None,
        poll: dict[str, Any] | None = None,
        api_url: str | None = None,
        worker: dict[str, Any] | None = None,
    ) -> None:
        tenant: dict[str, Any] = {
            "slug": TENANT,
            "webhook_secrets": [WEBHOOK_SECRET],
            "poll": poll or {"mode": "off"},
            "sinks": [
                {
                    "name": "s",
                    "url": self.sink.url,
                    "timeout": 10,  # a slow answer from a busy harness is no failure
                    "max_age": 3600,
                    "concurrency": 32,
                    **(sink or {}),
                }
            ],
        }
        if api_url is not None:
            tenant["api"] = {"base_url": api_url, "signing_secret": API_SECRET, "max_backoff": 1}
        write_config(
            self.config,
            {
                "server": {"listen": f"127.0.0.1:{self.listen}", "retry_after": 1},
                "admin": {"listen": f"127.0.0.1:{self.admin}"},
                "redis": {"url": self.redis.url, "startup_wait": 60},
                "relay": {"state_dir": str(self.workdir / "state")},
                "worker": {**WORKER, **(worker or {})},
                "tenants": [tenant],
            },
        )

    async def start(self, **config: Any) -> None:
        await self.redis.start()
        await self.sink.start()
        self.write_config(**config)
        self.serve.start()
        self.worker.start()
        await self.ready()

    async def ready(self) -> None:
        await wait_http(f"http://127.0.0.1:{self.admin}/readyz")
        await wait_http(f"http://127.0.0.1:{self.worker_admin}/healthz")

    async def restart_worker(self) -> None:
        self.worker.kill()
        self.worker.start()

    async def restart_serve(self) -> None:
        self.serve.kill()
        self.serve.start()

    async def close(self) -> None:
        await self.chert.close()
        await self.serve.stop()
        await self.worker.stop()
        await self.sink.stop()
        await self.client.aclose()
        if self.redis.alive():
            await self.redis.stop()

    async def settle(self, acked: set[str], timeout: float) -> float:
        """Wait until every acked event has reached the sink and the queue is empty (so no
        further delivery can come); seconds it took. Returns at ``timeout`` regardless."""
        start = time.monotonic()
        deadline = start + timeout
        last = start
        while time.monotonic() < deadline:
            missing = sum(1 for e in acked if e not in self.sink.delivered)
            if missing == 0:
                last = time.monotonic()
                with contextlib.suppress(Exception):  # Redis may be restarting
                    if await backlog(self.client) == 0:
                        break
            await asyncio.sleep(0.1)
        if any(e not in self.sink.delivered for e in acked):
            last = time.monotonic()
        return last - start

    def account(self, result: Result, acked: set[str], settle_s: float) -> Result:
        result.acked = len(acked)
        result.delivered = sum(1 for e in acked if e in self.sink.delivered)
        result.lost = result.acked - result.delivered
        result.duplicates = self.sink.duplicates()
        result.settle_s = round(settle_s, 1)
        result.notes.setdefault("status_counts", dict(self.chert.stats.statuses))
        result.notes.setdefault("refused", len(self.chert.stats.refused))
        return result


def event_ids(scenario: str, n: int) -> list[str]:
    return [f"chert:msg:{scenario}-{i:07d}" for i in range(n)]
