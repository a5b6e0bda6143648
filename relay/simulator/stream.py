"""``GET /api/v1/events/stream``: the simulated Server-Sent Events tail (contract §5).

On connect (authenticated like any GET) the stream first sends the tenant's rows
created after ``?since=`` (oldest first), then every new row as it is logged, one
``data: <json log row>`` line each; a ``:`` comment line every
``heartbeat_interval``; and after ``stream_lifetime`` an ``event: close`` before
the connection ends. :meth:`StreamHub.disconnect_all` drops every connection
abruptly instead (no ``event: close``), as a network fault would.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

from aiohttp import web

from relay.simulator.api import RECORD, TRACE_ID, ApiError, EventsApi
from relay.simulator.eventlog import EventLog, LogEntry
from relay.simulator.models import parse_iso_us

log = logging.getLogger(__name__)

_ABORT = "abort"  # drop the connection without `event: close`
_STOP = "stop"  # end the stream quietly (simulator shutting down)


@dataclass(eq=False)
class _Stream:
    tenant: str
    type: str | None
    queue: asyncio.Queue[LogEntry | str] = field(default_factory=asyncio.Queue)


class StreamHub:
    """Open SSE connections, fed by the event log."""

    def __init__(self, *, log: EventLog, api: EventsApi, lifetime: float, heartbeat: float) -> None:
        self._log = log
        self._api = api
        self.lifetime = lifetime
        self.heartbeat = heartbeat
        self._streams: set[_Stream] = set()
        self.connections = 0  # streams opened so far
        log.listeners.append(self._on_entry)

    @property
    def open(self) -> int:
        return len(self._streams)

    def _on_entry(self, entry: LogEntry) -> None:
        for stream in self._streams:
            if stream.tenant == entry.tenant and stream.type in (None, entry.row["type"]):
                stream.queue.put_nowait(entry)

    def disconnect_all(self) -> int:
        """Drop every open connection at once, without ``event: close``."""
        for stream in self._streams:
            stream.queue.put_nowait(_ABORT)
        return len(self._streams)

    def stop_all(self) -> None:
        for stream in self._streams:
            stream.queue.put_nowait(_STOP)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        tenant = self._api.authenticate(request)
        since = request.query.get("since")
        try:
            since_us = parse_iso_us(since) if since else None
        except ValueError:
            raise ApiError(400, 1001, "since must be an ISO-8601 time") from None
        stream = _Stream(tenant.slug, request.query.get("type") or None)
        # Subscribe and take the backlog in one step: no row is missed or sent twice.
        self._streams.add(stream)
        backlog = [] if since_us is None else self._log.after(tenant.slug, since_us)
        try:
            return await self._serve(request, stream, backlog)
        finally:
            self._streams.discard(stream)

    async def _serve(
        self, request: web.Request, stream: _Stream, backlog: list[LogEntry]
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Trace-ID": request[TRACE_ID],
            }
        )
        request[RECORD].status = 200
        await response.prepare(request)
        self.connections += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lifetime
        next_beat = loop.time() + self.heartbeat
        try:
            for entry in backlog:
                if stream.type in (None, entry.row["type"]):
                    await _send_row(response, entry)
            while True:
                now = loop.time()
                if now >= deadline:
                    await response.write(b'event: close\ndata: {"reason":"lifetime"}\n\n')
                    break
                try:
                    async with asyncio.timeout(min(deadline, next_beat) - now):
                        item = await stream.queue.get()
                except TimeoutError:
                    if loop.time() >= next_beat:
                        await response.write(b": heartbeat\n\n")
                        next_beat += self.heartbeat
                    continue
                if item == _ABORT:
                    if request.transport is not None:
                        request.transport.abort()
                    return response
                if item == _STOP:
                    break
                assert isinstance(item, LogEntry)
                await _send_row(response, item)
            await response.write_eof()
        except (ConnectionResetError, ConnectionError):
            log.debug("stream client went away")
        return response


async def _send_row(response: web.StreamResponse, entry: LogEntry) -> None:
    data = json.dumps(entry.row, separators=(",", ":"))
    await response.write(f"data: {data}\n\n".encode())
