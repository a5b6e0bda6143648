"""Shared pieces of the delivery tests (no tests here): real aiohttp sinks on 127.0.0.1,
a runtime for the worker role, a worker running in the background, and a worker
process."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from redis.asyncio import Redis
from standardwebhooks.webhooks import Webhook

from relay.config import Config, parse_config
from relay.delivery.role import WorkerRole
from relay.ingest import envelope
from relay.ingest.ingestor import Ingestor
from relay.keys import Keys
from relay.metrics import Metrics
from relay.runtime import Runtime
from relay.store.backlog import backlog, waiting
from relay.store.embedded import free_port
from relay.store.endpoint import Endpoint
from tests.support.common import SINK_SECRET, TENANT, config_dict
from tests.support.common import envelope as make_envelope
from tests.support.process import RelayProcess, write_toml

# Small, fast settings: retries in tenths of a second, a breaker that trips quickly.
FAST_WORKER = {
    "max_jobs": 100,
    "poll_delay": 0.01,
    "shutdown_grace": 5,
    "retry_backoff": 0.05,
    "retry_backoff_max": 1.0,
    "breaker_failures": 50,
    "breaker_cooldown": 30,
}


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float  # monotonic
    client: str | None = None  # over mutual TLS: the common name of the client certificate

    @property
    def event_id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def attempt(self) -> int:
        return int(self.headers["X-Relay-Attempt"])


Reply = tuple[int, dict[str, str]]
Behaviour = Callable[["Sink", Received], Awaitable[Reply] | Reply]


@dataclass
class Sink:
    """A real HTTP endpoint recording what it gets; ``behaviour`` decides the answer.
    With ``ssl_context`` (tests/support/certs.py's ``server_context``), an https one."""

    behaviour: Behaviour | None = None
    secret: str | None = SINK_SECRET
    port: int = 0
    received: list[Received] = field(default_factory=list)
    bad_signatures: int = 0
    running: int = 0
    max_running: int = 0
    url: str = ""
    body: str | None = None  # what it answers with (default: "nope" for a non-2xx, else "")
    ssl_context: ssl.SSLContext | None = None
    path: str = "/hook"
    _runner: web.AppRunner | None = None

    def ids(self) -> list[str]:
        return [r.event_id for r in self.received]

    def for_event(self, event_id: str) -> list[Received]:
        return [r for r in self.received if r.event_id == event_id]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        client = None
        if peer:
            names = dict(pair for rdn in peer.get("subject", ()) for pair in rdn)
            client = names.get("commonName")
        got = Received(dict(request.headers), body, time.monotonic(), client)
        if self.secret is not None:
            try:
                Webhook(self.secret).verify(body, got.headers)
            except Exception:
                self.bad_signatures += 1
        self.received.append(got)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            status, headers = 200, {}
            if self.behaviour is not None:
                reply = self.behaviour(self, got)
                if asyncio.iscoroutine(reply):
                    reply = await reply
                status, headers = reply
        finally:
            self.running -= 1
        text = self.body if self.body is not None else ("nope" if status >= 300 else "")
        return web.Response(status=status, headers=headers, text=text)

    async def start(self) -> Sink:
        app = web.Application()
        app.router.add_post(self.path, self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, "127.0.0.1", self.port or free_port(), ssl_context=self.ssl_context
        )
        await site.start()
        self.port = self._runner.addresses[0][1]
        scheme = "http" if self.ssl_context is None else "https"
        self.url = f"{scheme}://127.0.0.1:{self.port}{self.path}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@contextlib.asynccontextmanager
async def sinks(*items: Sink) -> AsyncIterator[tuple[Sink, ...]]:
    for s in items:
        await s.start()
    try:
        yield items
    finally:
        for s in items:
            await s.stop()


def sink_conf(name: str, url: str, **extra: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {"name": name, "url": url, "secret": SINK_SECRET, "timeout": 2}
    conf.update(extra)
    return conf


def delivery_config(
    redis_url: str, sink_list: list[dict[str, Any]], **worker: Any
) -> dict[str, Any]:
    """The delivery tests' configuration, as a dict: the test tenant (no polling) with
    ``sink_list``, the fast worker settings with ``worker`` over them, every listener
    on a free port."""
    return config_dict(
        redis_url=redis_url,
        tenants=[
            {
                "slug": TENANT,
                "webhook_secrets": ["x" * 32],
                "poll": {"mode": "off"},
                "sinks": sink_list,
            }
        ],
        worker={**FAST_WORKER, **worker},
    )


def config_with(redis_url: str, sink_list: list[dict[str, Any]], **worker: Any) -> Config:
    """:func:`delivery_config`, validated: what a worker in the test's process runs on."""
    return parse_config(delivery_config(redis_url, sink_list, **worker), env={})


def runtime(redis: Redis, config: Config) -> Runtime:
    metrics = Metrics()
    return Runtime(
        config=config,
        redis=redis,
        metrics=metrics,
        ingestor=Ingestor(redis, config, metrics),
        keys=Keys(config.redis.key_prefix),
        endpoint=Endpoint(url=config.redis.url.get() if config.redis.url else None),
    )


def event(event_id: str, etype: str = "message.received") -> envelope.Event:
    return envelope.from_object(make_envelope(event_id, etype))


async def ingest(
    rt: Runtime, ids: list[str], source: str = "webhook", event_type: str = "message.received"
) -> None:
    await asyncio.gather(*(rt.ingestor.ingest(TENANT, event(i, event_type), source) for i in ids))


async def drained(redis: Redis) -> bool:
    """No delivery left to do: none queued, none waiting for its sink."""
    return await backlog(redis, Keys("chert-relay")) == 0


async def waiting_is(redis: Redis, sink: str, n: int) -> bool:
    """The test tenant's ``sink`` has ``n`` deliveries set aside in its waiting line."""
    return (await waiting(redis, Keys("chert-relay"))).get((TENANT, sink), 0) == n


@contextlib.asynccontextmanager
async def worker(rt: Runtime) -> AsyncIterator[WorkerRole]:
    """A worker role running in the background; stopped (gracefully) on exit."""
    role = WorkerRole(rt)
    await role.start()
    task = asyncio.create_task(role.run())
    try:
        yield role
    finally:
        await role.stop()
        await task


def worker_config_file(
    path: Path, redis_url: str, sink_list: list[dict[str, Any]], **worker: Any
) -> Path:
    """``path``/relay.toml: :func:`delivery_config` for a worker process (its admin
    listener on a free port)."""
    return write_toml(path / "relay.toml", delivery_config(redis_url, sink_list, **worker))


@contextlib.asynccontextmanager
async def worker_process(
    path: Path,
    redis_url: str,
    sink_list: list[dict[str, Any]],
    *,
    env: dict[str, str] | None = None,
    **worker: Any,
) -> AsyncIterator[RelayProcess]:
    """A ``chert-relay worker`` process on :func:`worker_config_file` (``path`` is the
    test's directory; its log is ``relay.worker.log`` there), started; on exit it is
    let go on (SIGCONT: a test may have stopped it), sent SIGTERM, waited for and, if
    still running, killed."""
    proc = RelayProcess(worker_config_file(path, redis_url, sink_list, **worker), "worker", env=env)
    proc.start()
    try:
        yield proc
    finally:
        proc.signal(signal.SIGCONT)
        proc.signal(signal.SIGTERM)
        try:
            await proc.wait()
        finally:
            proc.kill()


def metric_sum(metrics: Metrics, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    found = 0.0
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                found += s.value
    return found
