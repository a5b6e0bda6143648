"""Hostile clients that take time or numbers: slow heads and bodies, crowds of idle or
half-sent connections, clients that never read their answers, long pipelines.

Each scenario runs many connections at once and reports one :class:`Outcome`: how
many hostile requests (or connections) it made, how many got what they should, and
how many were wrongly accepted. Redis must not change except by the valid requests a
scenario sends on purpose (the run checks that around each scenario)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bench.hostile.cases import World
from bench.hostile.target import Target
from bench.hostile.wire import exchange
from relay.edge.http_server import STALL_S

F_SLOW = "slow clients"
F_CROWD = "connection crowds"
F_UNREAD = "unread answers"

SWEEP_S = 5.0  # the receiver looks for slow and idle connections this often


@dataclass
class Outcome:
    family: str
    kind: str
    requests: int = 0
    as_expected: int = 0
    wrongly_accepted: int = 0
    accepted_valid: int = 0  # valid requests the scenario sent, and had accepted
    notes: list[str] = field(default_factory=list)


async def _status_line(reader: asyncio.StreamReader, timeout: float) -> int | None:
    """The status of the next answer, or None when the connection ends without one."""
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    except (TimeoutError, ConnectionError):
        return None
    if not line:
        return None
    return int(line.split()[1])


async def _closed(reader: asyncio.StreamReader, timeout: float) -> bool:
    try:
        while await asyncio.wait_for(reader.read(65536), timeout):
            pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


async def _open_connections(target: Target) -> int:
    """``chert_relay_receiver_connections``, scraped from the admin listener."""
    reader, writer = await asyncio.open_connection(*target.admin)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
    text = (await reader.read()).decode()
    writer.close()
    for line in text.splitlines():
        if line.startswith("chert_relay_receiver_connections "):
            return int(float(line.split()[1]))
    return -1


async def _until(probe: Callable[[], Awaitable[int]], want: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while await probe() < want:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server never counted {want}")
        await asyncio.sleep(0.05)


def refused_request(world: World) -> bytes:
    """A well-framed webhook with a wrong signature: 401, and nothing stored."""
    _, body = world.body()
    return world.signed(body, signature=f"t={int(time.time())},v1={'0' * 64}")


def valid_accepted(target: Target, world: World) -> bool:
    raw, _ = world.valid()
    got = exchange(target.receiver, [raw], expect=1, sentinel=False)
    return got.statuses == [202]


async def slow_heads(target: Target, world: World, n: int) -> Outcome:
    """Request heads sent a byte at a time: cut off after ``body_timeout`` (+ a sweep)."""
    out = Outcome(F_SLOW, "slow_head", requests=n)
    bound = target.limits.body_timeout + 2 * SWEEP_S + 2

    async def one() -> bool:
        reader, writer = await asyncio.open_connection(*target.receiver)
        raw, _ = world.valid()
        started = time.monotonic()
        try:
            for byte in raw[:200]:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.25)
                if reader.at_eof() or time.monotonic() - started > bound:
                    break
        except ConnectionError:
            pass
        closed = await _closed(reader, max(0.1, bound - (time.monotonic() - started)))
        writer.close()
        return closed

    results = await asyncio.gather(*(one() for _ in range(n)))
    out.as_expected = sum(results)
    return out


async def slow_bodies(target: Target, world: World, n: int) -> Outcome:
    """Bodies that stall half way: 503 ``body_timeout`` (Chert retries those)."""
    out = Outcome(F_SLOW, "slow_body", requests=n)

    async def one() -> int | None:
        reader, writer = await asyncio.open_connection(*target.receiver)
        raw, _ = world.valid()
        head, _, body = raw.partition(b"\r\n\r\n")
        half = len(body) // 2
        writer.write(head + b"\r\n\r\n" + body[:half])
        status = None
        try:
            for byte in body[half : half + 3]:  # a trickle, then nothing
                await asyncio.sleep(0.5)
                writer.write(bytes([byte]))
            status = await _status_line(reader, target.limits.body_timeout + 5)
        except ConnectionError:
            pass
        writer.close()
        return status

    statuses = await asyncio.gather(*(one() for _ in range(n)))
    out.as_expected = sum(1 for s in statuses if s == 503)
    out.wrongly_accepted = sum(1 for s in statuses if s is not None and 200 <= s < 300)
    return out


async def idle_crowd(target: Target, world: World, n: int) -> Outcome:
    """``n`` connections that send nothing (more than ``max_connections``): a valid
    webhook still gets in while they are open, and every one is closed by the server."""
    out = Outcome(F_CROWD, "idle_connections", requests=n)
    conns = []
    for _ in range(n):
        try:
            conns.append(await asyncio.open_connection(*target.receiver))
        except OSError as e:
            out.notes.append(f"connect failed: {e}")
            break
    ok = await asyncio.to_thread(valid_accepted, target, world)
    out.accepted_valid += ok
    if not ok:
        out.notes.append("a valid webhook was not accepted during the idle crowd")
    bound = target.limits.keepalive_timeout + 2 * SWEEP_S + 2
    closed = await asyncio.gather(*(_closed(r, bound) for r, _ in conns))
    for _, w in conns:
        w.close()
    out.as_expected = sum(closed)
    return out


async def busy_crowd(target: Target, world: World) -> Outcome:
    """``max_connections`` connections each mid-way through a request head, then silent
    (senders that stall, holding every slot): once they have stalled for ``STALL_S``, a
    valid webhook still gets in — it takes the longest-stalled one's place — while the
    crowd is open, and every one of the crowd is closed (made room with, or cut off at
    ``body_timeout``)."""
    n = target.limits.max_connections
    out = Outcome(F_CROWD, "half_sent_heads", requests=n + 1)
    conns = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection(*target.receiver)
        writer.write(b"POST " + world.path.encode() + b" HTTP/1.1\r\nHost: relay\r\n")
        conns.append((reader, writer))
    # Every one counted by the server (its reads come before the scrape's answer).
    await _until(lambda: _open_connections(target), n)
    await asyncio.sleep(STALL_S + 0.5)  # the crowd has stalled
    ok = await asyncio.to_thread(valid_accepted, target, world)
    out.accepted_valid += ok
    if not ok:
        out.notes.append("a valid webhook was not accepted while the stalled crowd was open")
    bound = target.limits.body_timeout + 2 * SWEEP_S + 2
    closed = await asyncio.gather(*(_closed(r, bound) for r, _ in conns))
    for _, w in conns:
        w.close()
    out.as_expected = sum(closed) + ok
    return out


async def unread_answers(target: Target, world: World, clients: int, each: int) -> Outcome:
    """Clients that pipeline refused requests and never read an answer: the server stops
    reading from them and drops them; nothing they sent is taken."""
    out = Outcome(F_UNREAD, "never_read", requests=clients * each)
    bad = refused_request(world)

    async def one() -> bool:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, target.receiver)
        _, writer = await asyncio.open_connection(sock=sock)
        try:
            for _ in range(each // 50):
                writer.write(bad * 50)
                await asyncio.wait_for(
                    writer.drain(), target.limits.keepalive_timeout + 2 * SWEEP_S + 5
                )
        except (ConnectionError, TimeoutError):
            pass
        bound = target.limits.keepalive_timeout + 2 * SWEEP_S + 5
        # Not reading: wait for the server to drop the connection (the transport closes).
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline and not writer.is_closing():
            try:
                writer.write(b"x")
                await asyncio.wait_for(writer.drain(), 1)
            except (ConnectionError, TimeoutError):
                break
            await asyncio.sleep(0.2)
        dropped = time.monotonic() < deadline
        writer.close()
        return dropped

    results = await asyncio.gather(*(one() for _ in range(clients)))
    out.as_expected = each * sum(results)
    return out


async def long_pipeline(target: Target, world: World, n: int) -> Outcome:
    """``n`` refused requests pipelined on one connection, answers read as they come:
    every one answered, in order, ``401``."""
    out = Outcome(F_UNREAD, "long_pipeline", requests=n)
    bad = refused_request(world)
    reader, writer = await asyncio.open_connection(*target.receiver)

    async def send() -> None:
        for i in range(0, n, 100):
            writer.write(bad * min(100, n - i))
            await writer.drain()

    sender = asyncio.create_task(send())
    statuses = []
    for _ in range(n):
        status = await _status_line(reader, 10)
        if status is None:
            break
        statuses.append(status)
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
    await sender
    writer.close()
    out.as_expected = sum(1 for s in statuses if s == 401)
    out.wrongly_accepted = sum(1 for s in statuses if 200 <= s < 300)
    return out
