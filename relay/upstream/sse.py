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
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from relay.errors import UpstreamError

log = logging.getLogger(__name__)


MAX_MESSAGE_CHARS = 4 * 1024 * 1024  # one event is a few KB; a longer message is dropped


class SseIdleError(UpstreamError):
    """The stream sent nothing, not even a heartbeat, for longer than allowed."""


@dataclass(frozen=True, slots=True)
class SseMessage:
    event: str  # "message" unless an ``event:`` line named it
    data: str
    id: str | None = None


class SseParser:
    """Feed it lines (without their line ending); it returns each message as it completes."""

    def __init__(self, max_message_chars: int = MAX_MESSAGE_CHARS) -> None:
        self._data: list[str] = []
        self._size = 0
        self._too_big = False
        self.max_message_chars = max_message_chars
        self._event: str | None = None
        self._id: str | None = None
        self.comments = 0  # heartbeats seen
        self.dropped = 0  # messages over max_message_chars, not kept

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
            self._size += len(value) + 1
            if self._size > self.max_message_chars:  # a message without end: not in memory
                self._too_big, self._data = True, []
            elif not self._too_big:
                self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self._id = value
        # "retry" and unknown fields are ignored, as the format says.
        return None

    def _dispatch(self) -> SseMessage | None:
        too_big, event, data = self._too_big, self._event, self._data
        self._data, self._size, self._too_big, self._event = [], 0, False, None
        if too_big:
            self.dropped += 1
            return None
        if not data and event is None:
            return None
        return SseMessage(event=event or "message", data="\n".join(data), id=self._id)


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
        dropped = parser.dropped
        msg = parser.feed_line(line)
        if parser.dropped != dropped:
            log.warning("SSE message over %d characters dropped", parser.max_message_chars)
        if msg is not None:
            yield msg
