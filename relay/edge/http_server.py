"""The receiver's HTTP/1.1 server: aiohttp's request parser under a small protocol.

aiohttp's web server spends most of a webhook's CPU on its own machinery: a request
object, a task, a response object, keep-alive bookkeeping. This server keeps what
matters of it — the C request parser aiohttp exports (``aiohttp.http``: llhttp, with
its limits and its defences against malformed and smuggled requests) — under its own
``asyncio.Protocol`` with its own flow control, and answers from pre-built bytes, in
the way uvicorn builds its HTTP protocol on httptools. It takes from aiohttp only
what aiohttp exports (``tests/test_layout.py`` holds all of ``relay/`` to that). A bare
handler on it answers twice as many requests per second as the same handler on
aiohttp's low-level server (``bench/receiver.py``, ``bench/README.md``).

This module is the listener: it accepts connections (:mod:`relay.edge.http_connection`),
hands each the :class:`ServerState` they share, sweeps idle ones and shuts down; the
answers are built by :mod:`relay.edge.http_types`.

Per connection, requests are handled one at a time, in the order they came, so
pipelined requests are answered in order. The handler (:class:`Handler`, the
receiver) sees a request in up to three steps:

- ``head``: the request line and headers; it may answer at once (a wrong path, an
  unknown tenant, a body announced too large, the relay shutting down);
- the body: taken as is when it has all arrived (the usual case); otherwise read by a
  task bounded by ``body_timeout`` and ``max_body``, after an interim
  ``100 Continue`` when the client asked for one (``body_failed`` answers the
  failures);
- ``handle``: the whole request. It answers at once or hands back a future (the
  ingest) and a function turning its outcome into the answer.

The connection is closed after an answer when the client asked for that (HTTP/1.0,
``Connection: close``, an ``Upgrade``), when a request's body was left unread or could
not be read, after a request the parser could not read (answered 400 once the requests
before it are answered: see ``Connection._bad_request``), once a client that
half-closed has its answers, and on shutdown.

At most ``max_connections`` are open at once. A connection beyond that first takes
the place of the longest-idle one (closed, as the keep-alive timeout would close it: an
idle connection has nothing owed to it), so that a crowd of idle connections cannot
lock senders out; failing that, of the longest-stalled sender — one whose request (its
head, or its body) has been arriving for over ``STALL_S``, which a webhook sent whole
never is — so that a crowd trickling bytes cannot either (it is aborted: what it sent
is dropped, unanswered); when every connection is busy handling a request or only just
started one, the new one is answered ``503`` (the handler's ``connection_refused``)
and closed. One
sweep (a single timer for all connections, not one per request) closes connections
idle for ``keepalive_timeout``, and those whose request head has been arriving for
longer than ``body_timeout``; it aborts those still flushing answers to a client
that does not read, ``keepalive_timeout`` after they were closed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from relay import memory
from relay.config.values import Listen
from relay.edge.http_connection import Connection
from relay.edge.http_types import Date, Handler

log = logging.getLogger(__name__)

SWEEP_S = 5.0  # how often idle connections are looked for
# A request still arriving this long after it began has stalled: Chert sends a whole
# webhook at once, so past max_connections such a sender gives its place to a new one.
STALL_S = 1.0
# Once bodies arriving held this much, the sweep gives freed memory back when they go.
TRIM_AFTER = 4 << 20


class ServerState:
    """What the server shares with each of its connections, passed to each one (as
    uvicorn passes its ``ServerState``): the handler, the limits (changed in place when
    the configuration is reloaded), the open connections and how many are busy."""

    __slots__ = (
        "_busy",
        "body_held",
        "body_peak",
        "body_timeout",
        "closing",
        "connections",
        "date",
        "handler",
        "idle",
        "keepalive_timeout",
        "max_body",
        "max_body_memory",
        "max_connections",
    )

    def __init__(
        self,
        handler: Handler,
        *,
        max_body: int,
        body_timeout: float,
        keepalive_timeout: float,
        max_connections: int,
        max_body_memory: int = 64 << 20,
    ) -> None:
        self.handler = handler
        self.max_body = max_body
        self.max_body_memory = max_body_memory
        self.body_held = 0  # bytes of bodies still arriving, every connection together
        self.body_peak = 0  # the most held since the sweep last gave memory back
        self.body_timeout = body_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_connections = max_connections
        self.closing = False  # shutting down: new connections are closed at once
        self.date = Date()
        self.connections: set[Connection] = set()
        self._busy = 0  # connections handling a request
        self.idle = asyncio.Event()  # set while that is none
        self.idle.set()

    def admit(self, conn: Connection, now: float) -> bool:
        """Whether a new connection may stay: under ``max_connections``, or once the
        longest-idle connection — or else the longest-stalled sender, one whose request
        has been arriving for over ``STALL_S`` — has made room for it."""
        if len(self.connections) < self.max_connections:
            self.connections.add(conn)
            return True
        idle = [c for c in self.connections if c.idle]
        if idle:
            min(idle, key=lambda c: c.last_active).close()  # leaves connections on its loss
            self.handler.idle_connection_closed()
            self.connections.add(conn)
            return True
        stalled = [
            (since, c)
            for c in self.connections
            if (since := c.stalled_since) is not None and now - since > STALL_S
        ]
        if not stalled:
            return False
        _, slowest = min(stalled, key=lambda s: s[0])
        self.handler.slow_connection_closed(slowest.remote)
        slowest.abort()  # what it sent is dropped: a sender that stalls gets no answer
        self.connections.discard(slowest)
        self.connections.add(conn)
        return True

    def hold(self, conn: Connection, n: int, now: float) -> bool:
        """Whether ``conn`` may hold ``n`` more bytes of a body still arriving: within
        ``max_body_memory``, or once the longest-stalled other body (arriving for over
        ``STALL_S``) has been dropped to make room (its sender aborted, as at the
        connection cap). ``False``: the caller answers 503."""
        while self.body_held + n > self.max_body_memory:
            stalled = [
                (since, c)
                for c in self.connections
                if c is not conn and c.held and (since := c.reading_since) is not None
                and now - since > STALL_S
            ]  # fmt: skip
            if not stalled:
                return False
            _, slowest = min(stalled, key=lambda s: s[0])
            self.handler.slow_connection_closed(slowest.remote)
            self.release(slowest)
            slowest.abort()
            self.connections.discard(slowest)
        self.body_held += n
        self.body_peak = max(self.body_peak, self.body_held)
        conn.held += n
        return True

    def release(self, conn: Connection) -> None:
        """``conn``'s body is read (or dropped): what it held is free again."""
        self.body_held -= conn.held
        conn.held = 0

    def request_started(self) -> None:
        self._busy += 1
        self.idle.clear()

    def request_ended(self) -> None:
        self._busy -= 1
        if not self._busy:
            self.idle.set()


class HttpServer:
    """Serves one :class:`Handler` on one listener."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_body: int,
        body_timeout: float,
        keepalive_timeout: float = 75.0,
        max_connections: int = 1000,
        sweep_every: float = SWEEP_S,
    ) -> None:
        self.state = ServerState(
            handler,
            max_body=max_body,
            body_timeout=body_timeout,
            keepalive_timeout=keepalive_timeout,
            max_connections=max_connections,
        )
        self.sweep_every = sweep_every
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def addresses(self) -> list[Any]:
        if self._server is None:
            return []
        return [s.getsockname() for s in self._server.sockets]

    async def start(self, listen: Listen) -> None:
        loop = asyncio.get_running_loop()
        if listen.path is not None:
            self._server = await loop.create_unix_server(self._connection, listen.path)
        else:
            assert listen.port is not None
            self._server = await loop.create_server(
                self._connection, listen.host, listen.port, reuse_address=True
            )
        self._sweeper = loop.call_later(self.sweep_every, self._sweep)

    def _connection(self) -> Connection:
        return Connection(self.state, asyncio.get_running_loop())

    @property
    def open_connections(self) -> int:
        return len(self.state.connections)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        state = self.state
        cutoff = loop.time() - state.keepalive_timeout
        slow = loop.time() - state.body_timeout
        for conn in list(state.connections):
            if conn.closing_since is not None:
                if conn.closing_since < cutoff:
                    conn.abort()  # still flushing to a client that does not read
            elif conn.busy:
                continue
            elif conn.last_active < cutoff:
                conn.close()
            elif conn.head_since is not None and conn.head_since < slow:
                conn.close()  # a request head trickling in: the body's bound applies
        if state.body_peak > TRIM_AFTER and state.body_held < TRIM_AFTER // 4:
            memory.trim()  # a burst of large bodies let go: their pages go back
            state.body_peak = state.body_held
        self._sweeper = loop.call_later(self.sweep_every, self._sweep)

    async def shutdown(self, timeout: float) -> None:
        """Stop listening; close idle connections at once and busy ones once they have
        answered, waiting up to ``timeout`` for them; then close whatever is left."""
        state = self.state
        state.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(state.connections):
            if not conn.busy:
                conn.close()
        try:
            async with asyncio.timeout(timeout):
                await state.idle.wait()
        except TimeoutError:
            log.warning("%d webhook connection(s) still busy at shutdown", len(state.connections))
        for conn in list(state.connections):
            conn.abort()
        if self._server is not None:
            await self._server.wait_closed()
