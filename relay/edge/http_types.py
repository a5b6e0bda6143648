"""What the receiver's HTTP server and its handler exchange: answers as bytes.

A handler (:class:`Handler`, the receiver) answers with a :class:`Response` or a
:data:`Pending` (the ingest it waits for, and how its outcome becomes the answer);
:func:`serialize` writes an answer out whole, from pre-built parts.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, NamedTuple, Protocol

from aiohttp.http import HttpProcessingError, RawRequestMessage

# The parser's errors, by kind: aiohttp exports only their base, HttpProcessingError.
# They give a refusal its reason label (tests/test_layout.py names them as allowed;
# tests/edge/test_http_server.py pins each to a request that raises it).
from aiohttp.http_exceptions import BadStatusLine, InvalidHeader, InvalidURLError, LineTooLong

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


class Response(NamedTuple):
    status: int
    body: bytes  # JSON
    headers: tuple[tuple[str, str], ...] = ()


# A future (the ingest) and the function that turns it, once done, into the answer.
Pending = tuple["asyncio.Future[Any]", Callable[["asyncio.Future[Any]"], Response]]


class Handler(Protocol):
    def head(self, msg: RawRequestMessage, remote: str | None) -> Response | Any:
        """An answer now, or a context for the next steps."""

    def body_failed(self, ctx: Any, status: int, reason: str, detail: str) -> Response:
        """The answer when the body could not be read."""

    def handle(self, ctx: Any, msg: RawRequestMessage, body: bytes) -> Response | Pending:
        """The answer, or the work it waits for."""

    def failed(self, ctx: Any, error: BaseException) -> Response:
        """The answer when the handler itself failed (a bug); it logs ``error``.
        ``ctx`` is ``None`` when ``head`` failed."""

    def refused(self, reason: str, detail: str, remote: str | None) -> Response:
        """The answer to a request the parser could not read (see :func:`refusal`); it
        counts and logs it. The connection is closed after it."""

    def connection_refused(self, remote: str | None) -> Response:
        """The answer written to a connection refused at ``max_connections`` (then
        closed); it counts and logs it."""

    def idle_connection_closed(self) -> None:
        """An idle connection was closed to make room for a new one; it counts that."""

    def slow_connection_closed(self, remote: str | None) -> None:
        """A connection whose request had stalled (a head or body still arriving after
        ``STALL_S``) was closed to make room for a new one; it counts that."""


class Date:
    """The ``Date`` header, formatted once a second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second, self._value = now, formatdate(now, usegmt=True).encode()
        return self._value


_ANSWER = (
    b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
    b"Date: %s\r\n%s%s\r\n%s"
)


def serialize(response: Response, date: bytes, close: bool) -> bytes:
    """The whole answer: status line, headers, body."""
    extra = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in response.headers)
    return _ANSWER % (
        response.status,
        _REASONS.get(response.status, b"Unknown"),
        len(response.body),
        date,
        extra,
        b"Connection: close\r\n" if close else b"",
        response.body,
    )


def json_str(text: str) -> bytes:
    return json.dumps(text[:200]).encode()


def refusal(error: HttpProcessingError) -> tuple[str, str]:
    """``(reason, detail)`` for a request aiohttp's parser refused: a stable metric label
    and a fixed description. Never the request's bytes (aiohttp puts some of them in its
    messages: a header's value may be a credential)."""
    if isinstance(error, LineTooLong):
        return "header_too_large", "a request line or header field is too long"
    if isinstance(error, InvalidURLError):
        return "bad_request_line", "the request target is not a valid URL"
    if isinstance(error, BadStatusLine):  # BadHttpMethod too
        if "HTTPS" in str(error.message):
            return "bad_request_line", "TLS on a plain HTTP port"
        return "bad_request_line", "the request line is not HTTP/1.x"
    if isinstance(error, InvalidHeader):
        return "bad_header", "a header field is not allowed or holds a NUL"
    # llhttp's messages are "<fixed description>:\n\n  <bytes>\n  ^": keep the first part.
    message = error.message if isinstance(error.message, str) else ""
    described = message.split(":\n", 1)[0][:100]
    if not described.isprintable():
        described = "the request could not be parsed"
    if "Too many headers" in described:
        return "header_too_large", described
    if "Transfer-Encoding" in described:
        return "bad_transfer_encoding", described
    if "Content-Length" in described:
        return "bad_content_length", described
    if "chunk" in described.lower():
        return "malformed_body", described
    if "header" in described.lower() or "Host" in described:
        return "bad_header", described
    return "malformed_request", described
