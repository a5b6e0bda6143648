"""The fault suite's moving parts, all real: a redis-server the suite starts, stops and
kills; the relay as separate ``serve`` and ``worker`` processes from one config file; a
load generator that signs and retries as Chert does; and a sink counting what it got.

Chert (chert-contract.md §2): 2xx is delivered; 5xx, timeouts and connection errors get
up to 3 attempts with exponential backoff; 4xx is never retried. The load generator
does the same — three attempts, 1-2 s then 2-4 s apart — and counts an
event *acked* once one of them got a 2xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
from aiohttp import web
from redis.asyncio import Redis

from relay.keys import Keys
from relay.signing import webhook_headers
from relay.store import backlog as store_backlog
from relay.store.embedded import EmbeddedRedis, free_port

TENANT = "acme-7a3f"
WEBHOOK_SECRET = "7f3c1e9a5b2d4f6081a3c5e7f9b1d3e5a7c9e1f3b5d7f9a1c3e5b7d9f1a3c5e7"
API_SECRET = "5f2b8c1d9e4a7f3b6c0d2e8f1a9b4c7d"
PREFIX = "chert-relay"
CHERT_ATTEMPTS = 3
CHERT_BACKOFF_S = 1.0


# --- the sink --------------------------------------------------------------------------


class CountingSink:
    """An HTTP endpoint that answers as ``status()`` says, ``delay()`` seconds after the
    request came in, and counts every ``webhook-id`` it answered 2xx (a delivery) and
    every request it got.

    It also keeps what the fault scenarios check beyond counts: the order in which
    each event first came in with a 2xx to give (``first``: event id -> rank), the
    most requests it was answering at once (``max_active``, against the sink's
    ``concurrency``), and the client ports of the requests it is answering now
    (``peers``), so that a scenario can tell which process holds them."""

    def __init__(self, name: str = "s") -> None:
        self.name = name
        self.delivered: Counter[str] = Counter()
        self.requests = 0
        self.status: Callable[[], int] = lambda: 200
        self.delay: Callable[[], float] = lambda: 0.0
        self.first: dict[str, int] = {}
        self.active = 0
        self.max_active = 0
        self.peers: Counter[int] = Counter()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.requests += 1
        event_id = request.headers.get("webhook-id", "")
        peer = request.transport.get_extra_info("peername") if request.transport else None
        port = int(peer[1]) if peer else 0
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.peers[port] += 1
        try:
            status = self.status()
            if 200 <= status < 300:
                self.first.setdefault(event_id, len(self.first))
            delay = self.delay()
            if delay > 0:
                await asyncio.sleep(delay)
            if 200 <= status < 300:
                self.delivered[event_id] += 1
            return web.Response(status=status)
        finally:
            self.active -= 1
            self.peers[port] -= 1
            if self.peers[port] <= 0:
                del self.peers[port]

    def answering(self, ports: set[int]) -> int:
        """Requests this sink is answering now that came from one of ``ports``."""
        return sum(n for port, n in self.peers.items() if port in ports)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def duplicates(self) -> int:
        return sum(n - 1 for n in self.delivered.values() if n > 1)


# --- the load generator ----------------------------------------------------------------


def envelope(event_id: str, chat: str = "c-1") -> bytes:
    return json.dumps(
        {
            "event": "message.received",
            "event_id": event_id,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            "partner_id": TENANT,
            "data": {"chat": {"id": chat}, "message": {"id": event_id, "parts": []}},
        },
        separators=(",", ":"),
    ).encode()


@dataclass
class LoadStats:
    acked: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)  # never acked after every attempt
    statuses: Counter[str] = field(default_factory=Counter)  # per attempt: 202, 503, error…


class Chert:
    """Sends signed webhooks the way Chert does, retrying 5xx and connection errors."""

    def __init__(self, url: str, *, connections: int = 32) -> None:
        self.url = url
        self.stats = LoadStats()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections),
            timeout=aiohttp.ClientTimeout(total=10),
        )

    async def close(self) -> None:
        await self._session.close()

    async def _attempt(self, body: bytes, timestamp: int | None) -> int | None:
        headers = {
            "Content-Type": "application/json",
            **webhook_headers(WEBHOOK_SECRET, body, timestamp=timestamp),
        }
        try:
            async with self._session.post(self.url, data=body, headers=headers) as resp:
                await resp.read()
                return resp.status
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    async def send(self, event_id: str, *, body: bytes | None = None, skew: int = 0) -> bool:
        """One event, up to :data:`CHERT_ATTEMPTS` attempts; True once acked (2xx).
        ``skew``: sign with a timestamp this many seconds off now (a fresh signature)."""
        body = envelope(event_id) if body is None else body
        for attempt in range(CHERT_ATTEMPTS):
            if attempt:
                await asyncio.sleep(CHERT_BACKOFF_S * 2 ** (attempt - 1) * (1 + random.random()))
            status = await self._attempt(body, int(time.time()) + skew if skew else None)
            self.stats.statuses["error" if status is None else str(status)] += 1
            if status is not None and 200 <= status < 300:
                self.stats.acked.add(event_id)
                self.stats.refused.discard(event_id)
                return True
            if status is not None and 400 <= status < 500:
                break  # never retried
        if event_id not in self.stats.acked:
            self.stats.refused.add(event_id)
        return False

    async def probe(self, event_id: str) -> bool:
        """One attempt only, no retry (a probe of whether webhooks are accepted); True
        if acked."""
        status = await self._attempt(envelope(event_id), None)
        self.stats.statuses["error" if status is None else str(status)] += 1
        if status is not None and 200 <= status < 300:
            self.stats.acked.add(event_id)
            return True
        return False

    async def run(
        self,
        ids: list[str],
        rate: float,
        send: Callable[[str], Awaitable[Any]] | None = None,
    ) -> None:
        """Start one send per id at ``rate`` per second; return when every one is done."""
        send = send or self.send
        tasks: list[asyncio.Future[Any]] = []
        start = time.monotonic()
        for i, event_id in enumerate(ids):
            due = start + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(send(event_id)))
        await asyncio.gather(*tasks)


# --- Redis ---------------------------------------------------------------------------------


class RedisServer:
    """The suite's redis-server: AOF ``appendfsync always``, on a fixed port and directory,
    so that it can be stopped, killed and started again from its AOF."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self._server = EmbeddedRedis(directory, port=self.port)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        await self._server.start(timeout=60)

    async def stop(self) -> None:
        await self._server.stop()

    def kill(self) -> None:
        self._server.kill()

    @property
    def pid(self) -> int | None:
        p = self._server.process
        return None if p is None else p.pid

    def alive(self) -> bool:
        p = self._server.process
        return p is not None and p.poll() is None

    def reap(self) -> None:
        """Forget a server that exited by itself (so that it can be started again)."""
        p = self._server.process
        if p is not None and p.poll() is not None:
            if p.stderr is not None:
                p.stderr.close()
            self._server.process = None

    def client(self) -> Redis:
        client: Redis = Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)
        return client


async def backlog(client: Redis) -> int:
    """Deliveries not done: queued (due or scheduled) or set aside for their sinks."""
    return await store_backlog.backlog(client, Keys(PREFIX))


async def dead_letters(client: Redis) -> int:
    counts = await cast(
        Awaitable[dict[bytes, bytes]],
        client.hgetall(Keys(PREFIX).dead_letter_counts(TENANT)),
    )
    return sum(int(v) for v in counts.values())


# --- the relay's processes ---------------------------------------------------------------


class RelayProcess:
    """``python -m relay --config FILE <command>``, its log appended to a file; ``env``
    adds to the environment it starts with (a fake clock, for one)."""

    def __init__(
        self,
        config: Path,
        command: str,
        log: Path,
        *extra: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv = [sys.executable, "-m", "relay", "--log-format", "json", "--config"]
        self.argv += [str(config), command, *extra]
        self.log = log
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with self.log.open("ab") as out:
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=out, env=env)
        self.starts += 1

    def send_signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    async def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.kill()

    def rss_kib(self) -> int | None:
        """The process's resident set size (VmRSS), KiB."""
        if self.proc is None:
            return None
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return None


def spread(total: float, every: float) -> list[float]:
    """Moments every ``every`` seconds inside ``total`` (at least one, in the middle)."""
    times = [every * k for k in range(1, int(total / every) + 1) if every * k < total]
    return times or [total / 2]


async def during(
    load: Awaitable[None], times: list[float], act: Callable[[], Awaitable[None]]
) -> None:
    """Run ``load``; call ``act`` at each of ``times`` (seconds from now) meanwhile."""
    task = asyncio.ensure_future(load)
    start = time.monotonic()
    for t in times:
        delay = start + t - time.monotonic()
        if delay > 0:
            await asyncio.wait({task}, timeout=delay)
        if not task.done():
            await act()
    await task


# --- pauses, sockets, logs and metrics of the processes --------------------------------


async def pause(pid: int | None, seconds: float) -> None:
    """Freeze process ``pid`` (SIGSTOP) for ``seconds`` — a VM stun, ``docker pause`` or
    a swap storm as the process sees it — then let it go on (SIGCONT), whatever
    happens meanwhile."""
    if pid is None:
        raise RuntimeError("no process to pause")
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(seconds)
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed meanwhile
            os.kill(pid, signal.SIGCONT)


def tcp_ports(pid: int | None) -> set[int]:
    """The local ports of process ``pid``'s TCP sockets (from /proc)."""
    if pid is None:
        return set()
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def log_count(log: Path, text: str) -> int:
    """How many lines of ``log`` hold ``text``."""
    with contextlib.suppress(OSError):
        return sum(1 for line in log.read_text(errors="replace").splitlines() if text in line)
    return 0


async def wait_log(log: Path, text: str, count: int, timeout: float = 30.0) -> None:
    """Wait until ``log`` holds ``text`` on at least ``count`` lines."""
    deadline = time.monotonic() + timeout
    while log_count(log, text) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{log.name} did not say {text!r} within {timeout:.0f}s")
        await asyncio.sleep(0.05)


async def deliveries_by_outcome(admin: str) -> Counter[str]:
    """``chert_relay_deliveries_total`` of the process whose admin listener is ``admin``
    (host:port), summed by outcome (empty if it cannot be read)."""
    found: Counter[str] = Counter()
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(f"http://{admin}/metrics") as resp,
        ):
            text = await resp.text()
        for line in text.splitlines():
            if not line.startswith("chert_relay_deliveries_total{"):
                continue
            labels, _, value = line.rpartition(" ")
            for part in labels[labels.index("{") + 1 : labels.rindex("}")].split(","):
                key, _, v = part.partition("=")
                if key == "outcome":
                    found[v.strip('"')] += int(float(value))
    return found


def libfaketime() -> str | None:
    """Debian's libfaketime (package ``faketime``), if installed."""
    for pattern in ("/usr/lib/*/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1"):
        for found in sorted(Path("/").glob(pattern.lstrip("/"))):
            return str(found)
    return None


def skewed_clock(offset_s: int) -> dict[str, str]:
    """The environment that starts a process with its wall clock ``offset_s`` seconds
    off (libfaketime: ``time.time`` shifted). Its monotonic clock is left alone, so
    asyncio's timers keep their pace."""
    lib = libfaketime()
    if lib is None:
        raise RuntimeError("libfaketime not found: install Debian's faketime package")
    return {
        "LD_PRELOAD": lib,
        "FAKETIME": f"{offset_s:+d}s",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


async def wait_http(url: str, timeout: float = 60.0, ok: tuple[int, ...] = (200,)) -> None:
    """Wait until ``url`` answers one of ``ok``."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                async with session.get(url) as resp:
                    if resp.status in ok:
                        return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")
            await asyncio.sleep(0.1)


def _key(name: str) -> str:
    """A TOML key: bare if it can be (``a-z``, digits, ``_``, ``-``), else quoted (``"$or"``)."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    return json.dumps(value)


def write_config(path: Path, data: dict[str, Any]) -> None:
    lines: list[str] = []
    for section, body in data.items():
        if section == "tenants":
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml(v)}" for k, v in body.items()]
    for t in data["tenants"]:
        lines.append("[[tenants]]")
        lines += [f"{k} = {toml(v)}" for k, v in t.items() if k not in ("sinks", "api", "poll")]
        for table in ("api", "poll"):
            if table in t:
                lines.append(f"[tenants.{table}]")
                lines += [f"{k} = {toml(v)}" for k, v in t[table].items()]
        for s in t["sinks"]:
            lines.append("[[tenants.sinks]]")
            lines += [f"{k} = {toml(v)}" for k, v in s.items()]
    path.write_text("\n".join(lines) + "\n")
