"""The admin listener's connections: a cap, and deadlines for a request head and for idleness.

aiohttp's server takes every connection it is offered and waits on each as long as
its client likes, so a crowd of idle or trickling connections on the admin port would
hold descriptors the receiver needs (1,300 of them under a 1,200 limit left webhooks
unanswered). This wraps each connection's protocol (aiohttp's, an
:class:`asyncio.Protocol`, driven unchanged):

- past ``admin.max_connections`` open, a new connection gets ``503`` and is closed at
  once;
- a connection whose request has not reached a handler ``admin.head_timeout`` after
  its first byte arrived is aborted (a request in a handler is never cut);
- one idle for ``admin.idle_timeout`` (nothing sent since its last answer) is closed,
  and aborted if it has still not taken what it is owed ``idle_timeout`` later.

Each is counted in ``chert_relay_admin_refusals_total{reason}`` (``too_many_connections``,
``head_timeout``, ``idle_timeout``) and logged at most once every 10 s per reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from relay.logs import Throttle

log = logging.getLogger(__name__)

SWEEP_S = 1.0
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nRetry-After: 1\r\nContent-Length: 63\r\n\r\n"
    b'{"error": "too_many_connections", "message": "try again later"}'
)


@dataclass(slots=True)
class _Conn:
    transport: asyncio.BaseTransport
    last: float  # opened, or its last answer
    busy: int = 0  # requests in a handler
    pending: int = 0  # bytes received since ``last``
    head_since: float = 0.0  # the first of them arrived then
    closing_since: float | None = None  # closed idle, its answers still flushing


@dataclass
class ConnectionGuard:
    """Wraps the admin server's protocol factory; :meth:`middleware` goes on its app."""

    max_connections: int
    head_timeout: float
    idle_timeout: float
    count: Callable[[str], None]
    open: dict[asyncio.BaseTransport, _Conn] = field(default_factory=dict)
    _throttle: Throttle = field(default_factory=lambda: Throttle(interval=10.0))
    _sweeper: asyncio.Task[None] | None = None

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Guarded(self, inner)

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        conn = self.open.get(request.transport) if request.transport is not None else None
        if conn is None:
            return await handler(request)
        conn.busy += 1
        try:
            return await handler(request)
        finally:
            conn.busy -= 1
            conn.last, conn.pending = time.monotonic(), 0

    def refused(self, reason: str) -> None:
        self.count(reason)
        suppressed = self._throttle.allow(reason)
        if suppressed is not None:
            log.warning(
                "admin: %s (%d open, at most %d)%s",
                _WHAT[reason],
                len(self.open),
                self.max_connections,
                f" ({suppressed} more since the last line)" if suppressed else "",
            )

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            now = time.monotonic()
            for conn in list(self.open.values()):
                transport: asyncio.Transport = conn.transport  # type: ignore[assignment]
                if conn.closing_since is not None:
                    if now - conn.closing_since > self.idle_timeout:
                        transport.abort()  # a client that never reads what it is owed
                elif conn.busy:
                    continue
                elif conn.pending and now - conn.head_since > self.head_timeout:
                    self.refused("head_timeout")
                    transport.abort()
                elif not conn.pending and now - conn.last > self.idle_timeout:
                    self.refused("idle_timeout")
                    conn.closing_since = now
                    transport.close()  # once what it is owed is flushed


_WHAT = {
    "too_many_connections": "refused a connection (503): the admin listener is at its cap",
    "head_timeout": "aborted a connection whose request head did not arrive in time",
    "idle_timeout": "closed an idle connection",
}


class _Guarded(asyncio.Protocol):
    """One connection: aiohttp's protocol, or a 503 when the listener is full."""

    def __init__(self, guard: ConnectionGuard, inner: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._make = inner
        self._inner: asyncio.Protocol | None = None
        self._conn: _Conn | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        if len(guard.open) >= guard.max_connections:
            guard.refused("too_many_connections")
            transport.write(_BUSY)  # type: ignore[attr-defined]
            transport.close()
            return
        self._conn = _Conn(transport, time.monotonic())
        guard.open[transport] = self._conn
        self._inner = self._make()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        conn = self._conn
        if self._inner is not None and conn is not None:
            if not conn.pending:
                conn.head_since = time.monotonic()  # a request begins
            conn.pending += len(data)
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._guard.open.pop(self._conn.transport, None)
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()
