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

from aiohttp.http_parser import RawRequestMessage

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
