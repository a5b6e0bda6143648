"""Server-Sent Events: the line parser and the stream reader for ``/events/stream``.

The format (WHATWG "server-sent events", as Chert uses it, chert-contract.md §5):
lines of ``field: value``; ``data:`` lines accumulate (joined by newlines), ``event:``
names the message, a blank line dispatches it, and a line starting with ``:`` is a
comment — Chert's heartbeat. ``id:`` is parsed but the relay does not rely on it.
Lines end in LF or CRLF.

:func:`read_messages` yields every dispatched message from a byte stream and
raises :class:`SseIdleError` when no line at all (not even a heartbeat) arrives
within ``idle_timeout``; it returns at end of stream (dropping a message left
unfinished, as the format says). Reconnecting is the caller's
business (the poller's SSE loop).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from relay.errors import UpstreamError


class SseIdleError(UpstreamError):
    """The stream sent nothing, not even a heartbeat, for longer than allowed."""


@dataclass(frozen=True, slots=True)
class SseMessage:
    event: str  # "message" unless an ``event:`` line named it
    data: str
    id: str | None = None


class SseParser:
    """Feed it lines (without their line ending); it returns each message as it completes."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None
        self.comments = 0  # heartbeats seen

    def feed_line(self, line: str) -> SseMessage | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            self.comments += 1
            return None
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self._id = value
        # "retry" and unknown fields are ignored, as the format says.
        return None

    def _dispatch(self) -> SseMessage | None:
        if not self._data and self._event is None:
            return None
        msg = SseMessage(event=self._event or "message", data="\n".join(self._data), id=self._id)
        self._data = []
        self._event = None
        return msg


class LineReader(Protocol):
    async def readline(self) -> bytes: ...


async def read_messages(reader: LineReader, *, idle_timeout: float) -> AsyncIterator[SseMessage]:
    """Messages from an SSE byte stream until it ends; :class:`SseIdleError` on silence."""
    parser = SseParser()
    while True:
        try:
            async with asyncio.timeout(idle_timeout):
                raw = await reader.readline()
        except TimeoutError:
            raise SseIdleError(f"no line from the stream for {idle_timeout:g}s") from None
        if not raw:
            return  # a message the server did not finish with a blank line is dropped
        line = raw.decode("utf-8", errors="replace")
        if line.endswith("\n"):
            line = line[:-1]
        if line.endswith("\r"):
            line = line[:-1]
        msg = parser.feed_line(line)
        if msg is not None:
            yield msg
