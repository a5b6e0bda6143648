"""One scenario's relay: Redis, counting sinks, ``serve`` and one or more ``worker``
processes from one config file, and the bookkeeping every scenario reports (acked,
delivered, lost, duplicates, time to settle, restarts)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.faults.harness import (
    API_SECRET,
    PREFIX,
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
from relay.keys import Keys
from relay.store.backlog import waiting
from relay.store.embedded import free_port


@dataclass
class Result:
    scenario: str
    title: str
    sent: int = 0
    acked: int = 0
    delivered: int = 0  # acked events every sink meant to get them got at least once
    lost: int = 0  # acked and, at some sink, never delivered once the system settled
    duplicates: int = 0  # deliveries past the first, per event and sink
    settle_s: float = 0.0  # from the end of load and faults to the last delivery
    restarts: int = 0
    duplicates_allowed: bool = False  # a relay process (or Redis) crashed or stalled
    notes: dict[str, Any] = field(default_factory=dict)
    broken: list[str] = field(default_factory=list)  # the scenario's other expectations
    error: str = ""

    @property
    def ok(self) -> bool:
        return (
            not self.error
            and not self.broken
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
    """The relay under test, in ``workdir``: ``sinks`` counting sinks (named s, s2, …,
    all in the tenant's configuration unless ``configured`` says fewer) and ``workers``
    worker processes on the one queue; ``skewed`` starts every worker past the first
    with that environment (a fake clock)."""

    def __init__(
        self,
        workdir: Path,
        *,
        redis_dir: Path | None = None,
        sinks: int = 1,
        workers: int = 1,
        skewed: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.stuck: dict[str, Any] = {}  # what settle() found left when it timed out
        self.log_problems: list[str] = []  # the event log against the sinks (settle())
        workdir.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(redis_dir or workdir / "redis")
        self.sinks = [CountingSink("s" if i == 0 else f"s{i + 1}") for i in range(sinks)]
        self.sink = self.sinks[0]
        self.listen = free_port()
        self.admin = free_port()
        self.config = workdir / "relay.toml"
        self.serve = RelayProcess(self.config, "serve", workdir / "serve.log")
        self.worker_admins: list[str] = []
        self.workers: list[RelayProcess] = []
        for i in range(workers):
            admin = f"127.0.0.1:{free_port()}"
            self.worker_admins.append(admin)
            self.workers.append(
                RelayProcess(
                    self.config,
                    "worker",
                    workdir / ("worker.log" if i == 0 else f"worker{i + 1}.log"),
                    "--admin-listen",
                    admin,
                    env=skewed if i else None,
                )
            )
        self.worker = self.workers[0]
        self.webhook_url = f"http://127.0.0.1:{self.listen}/webhooks/chert/{TENANT}"
        self.chert = Chert(self.webhook_url)
        self.client = self.redis.client()
        self._config: dict[str, Any] = {}

    def write_config(
        self,
        *,
        sink: dict[str, Any] | None = None,
        poll: dict[str, Any] | None = None,
        api_url: str | None = None,
        worker: dict[str, Any] | None = None,
        configured: int | None = None,
        per_sink: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Write the config file: ``sink`` adds to every sink's settings, ``per_sink``
        to the named sink's; ``configured``: how many of the sinks it names."""
        self._config = {
            "sink": sink,
            "per_sink": per_sink,
            "poll": poll,
            "api_url": api_url,
            "worker": worker,
            "configured": configured,
        }
        tenant: dict[str, Any] = {
            "slug": TENANT,
            "webhook_secrets": [WEBHOOK_SECRET],
            "poll": poll or {"mode": "off"},
            "sinks": [
                {
                    "name": s.name,
                    "url": s.url,
                    "timeout": 10,  # a slow answer from a busy harness is no failure
                    "max_age": 3600,
                    "concurrency": 32,
                    **(sink or {}),
                    **(per_sink or {}).get(s.name, {}),
                }
                for s in self.sinks[: len(self.sinks) if configured is None else configured]
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

    def rewrite_config(self, **changes: Any) -> None:
        """Write the config file again with ``changes`` to what it was written with."""
        self.write_config(**{**self._config, **changes})

    async def start(self, **config: Any) -> None:
        await self.redis.start()
        for sink in self.sinks:
            await sink.start()
        self.write_config(**config)
        self.serve.start()
        for worker in self.workers:
            worker.start()
        await self.ready()

    async def ready(self) -> None:
        await wait_http(f"http://127.0.0.1:{self.admin}/readyz")
        for admin in self.worker_admins:
            await wait_http(f"http://{admin}/healthz")

    async def restart_worker(self) -> None:
        self.worker.kill()
        self.worker.start()

    async def restart_serve(self) -> None:
        self.serve.kill()
        self.serve.start()

    async def close(self) -> None:
        await self.chert.close()
        await self.serve.stop()
        for worker in self.workers:
            await worker.stop()
        for sink in self.sinks:
            await sink.stop()
        await self.client.aclose()
        if self.redis.alive():
            await self.redis.stop()

    def expected(
        self, acked: set[str], expect: dict[str, set[str]] | None = None
    ) -> list[tuple[CountingSink, set[str]]]:
        """Each sink with the events it must get: ``acked``, or ``expect[name]``."""
        return [(s, (expect or {}).get(s.name, acked)) for s in self.sinks]

    def missing(self, acked: set[str], expect: dict[str, set[str]] | None = None) -> set[str]:
        """Acked events some sink has not got (yet)."""
        return {e for s, want in self.expected(acked, expect) for e in want if e not in s.delivered}

    async def settle(
        self,
        acked: set[str],
        timeout: float,
        *,
        expect: dict[str, set[str]] | None = None,
        quiet: float | None = None,
    ) -> float:
        """Wait until every acked event has reached every sink meant to get it and the
        queue is empty (so no further delivery can come); seconds it took. Returns at
        ``timeout`` regardless, or, with ``quiet``, once the queue has been empty that
        long with events still missing (nothing is left that could deliver them)."""
        start = time.monotonic()
        deadline = start + timeout
        last = start
        empty_since: float | None = None
        while time.monotonic() < deadline:
            missing = len(self.missing(acked, expect))
            queued: int | None = None
            with contextlib.suppress(Exception):  # Redis may be restarting
                queued = await backlog(self.client)
            now = time.monotonic()
            if missing == 0:
                last = now
                if queued == 0:
                    break
            if quiet is not None and missing and queued == 0:
                empty_since = empty_since or now
                if now - empty_since >= quiet:
                    break
            else:
                empty_since = None
            await asyncio.sleep(0.1)
        else:
            self.stuck = await self._snapshot(acked, expect)
        if self.missing(acked, expect):
            last = time.monotonic()
        with contextlib.suppress(Exception):  # Redis may be gone (the disk-full scenario)
            self.log_problems = await self._check_log(acked, expect)
        return last - start

    async def _check_log(self, acked: set[str], expect: dict[str, set[str]] | None) -> list[str]:
        """The event log against each sink: every event the sink answered 2xx for is
        recorded as delivered to it, and none that it never answered 2xx for."""
        problems = []
        keys = Keys(PREFIX)
        for sink, want in self.expected(acked, expect):
            ids = sorted(want & acked)
            async with self.client.pipeline(transaction=False) as pipe:
                for event_id in ids:
                    pipe.hget(keys.event_log(TENANT, event_id), f"s:{sink.name}")
                states = await pipe.execute()
            unsaid = [
                e for e, st in zip(ids, states, strict=True) if e in sink.delivered and st != b"ok"
            ]
            false = [
                e
                for e, st in zip(ids, states, strict=True)
                if st == b"ok" and e not in sink.delivered
            ]
            if unsaid:
                problems.append(
                    f"event log: {len(unsaid)} event(s) {sink.name} got are not recorded as "
                    f"delivered to it (e.g. {unsaid[:3]})"
                )
            if false:
                problems.append(
                    f"event log: {len(false)} event(s) recorded as delivered to {sink.name} "
                    f"that it never answered 2xx for (e.g. {false[:3]})"
                )
        return problems

    async def _snapshot(
        self, acked: set[str], expect: dict[str, set[str]] | None
    ) -> dict[str, Any]:
        """What was left when :meth:`settle` timed out: the missing events, and the queue's
        first entries with their due time (s from now) and whether a run holds them."""
        out: dict[str, Any] = {"missing": sorted(self.missing(acked, expect))[:5]}
        with contextlib.suppress(Exception):
            keys = Keys(PREFIX)
            now_s, _ = await self.client.time()
            head = await self.client.zrange(keys.queue, 0, 4, withscores=True)
            out["queued"] = await self.client.zcard(keys.queue)
            out["head"] = [
                (
                    job.decode(),
                    round(score / 1000 - now_s, 1),
                    bool(await self.client.exists(Keys.job_in_progress(job.decode()))),
                )
                for job, score in head
            ]
            parked = await waiting(self.client, keys)
            out["waiting"] = {f"{t}:{s}": n for (t, s), n in parked.items()}
        return out

    def account(
        self,
        result: Result,
        acked: set[str],
        settle_s: float,
        *,
        expect: dict[str, set[str]] | None = None,
    ) -> Result:
        result.acked = len(acked)
        missing = self.missing(acked, expect) & acked
        result.delivered = result.acked - len(missing)
        result.lost = len(missing)
        result.duplicates = sum(s.duplicates() for s in self.sinks)
        result.settle_s = round(settle_s, 1)
        if len(self.sinks) > 1:
            result.notes.setdefault(
                "lost_per_sink",
                {
                    s.name: sum(1 for e in want & acked if e not in s.delivered)
                    for s, want in self.expected(acked, expect)
                },
            )
            result.notes.setdefault("dups_per_sink", {s.name: s.duplicates() for s in self.sinks})
        result.notes.setdefault("status_counts", dict(self.chert.stats.statuses))
        result.notes.setdefault("refused", len(self.chert.stats.refused))
        if self.stuck:
            result.notes["settle_timed_out"] = self.stuck
        result.broken += self.log_problems
        result.notes.setdefault("log_checked", not self.log_problems)
        return result


def event_ids(scenario: str, n: int) -> list[str]:
    return [f"chert:msg:{scenario}-{i:07d}" for i in range(n)]
