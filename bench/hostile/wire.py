"""Raw HTTP/1.1 over a socket: building signed requests, and reading every answer a
server gives on a connection (a case's answers, then whatever else follows)."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

from relay.signing import chert_signature

# After a case's bytes, this goes on the same connection: every answer before its own
# is an answer to something the case sent (a smuggled request shows up there).
SENTINEL = b"GET /__sentinel__ HTTP/1.1\r\nHost: sentinel\r\nConnection: close\r\n\r\n"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Exchange:
    """What came back on one connection."""

    answers: list[Answer] = field(default_factory=list)
    interim: int = 0  # 1xx answers seen (100 Continue)
    closed: bool = False  # the server closed the connection
    reset: bool = False  # …abruptly (RST)
    timed_out: bool = False  # we gave up waiting
    sentinel: bool = False  # the sentinel's answer came (and is not in ``answers``)

    @property
    def statuses(self) -> list[int]:
        return [a.status for a in self.answers]


def signed_request(
    secret: str,
    body: bytes,
    *,
    path: str,
    timestamp: int | None = None,
    extra: str = "",
    signature: str | None = None,
) -> bytes:
    """A webhook as Chert sends it (``X-Webhook-Signature: t=…,v1=…``)."""
    ts = int(time.time()) if timestamp is None else timestamp
    sig = signature if signature is not None else f"t={ts},v1={chert_signature(secret, ts, body)}"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-Webhook-Signature: {sig}\r\n{extra}\r\n"
    )
    return head.encode() + body


class _Reader:
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.buf = b""
        self.deadline = deadline
        self.eof = False
        self.reset = False
        self.timed_out = False

    def fill(self) -> bool:
        """Read more; False at EOF, reset or the deadline."""
        if self.eof:
            return False
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.timed_out = True
            return False
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            self.timed_out = True
            return False
        except ConnectionResetError:
            self.eof = self.reset = True
            return False
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def answer(self) -> Answer | None:
        """The next whole answer, or None if the connection ended first."""
        while b"\r\n\r\n" not in self.buf:
            if not self.fill():
                return None
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "0"))
        if 100 <= status < 200:
            length = 0
        while len(self.buf) < length:
            if not self.fill():
                return None
        body, self.buf = self.buf[:length], self.buf[length:]
        return Answer(status, headers, body)


def exchange(
    address: tuple[str, int],
    parts: list[bytes],
    *,
    expect: int,
    pause: float = 0.0,
    timeout: float = 5.0,
    sentinel: bool = True,
) -> Exchange:
    """Send ``parts`` (``pause`` seconds apart) on a new connection, read ``expect``
    answers (or until the connection ends), then send the sentinel and read until it is
    answered or the connection ends: every answer the server gave is in the result."""
    out = Exchange()
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = _Reader(sock, time.monotonic() + timeout)
        try:
            for i, part in enumerate(parts):
                if i and pause:
                    time.sleep(pause)
                sock.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed on us: what it answered is still readable
        while len(out.answers) < expect:
            got = reader.answer()
            if got is None:
                break
            if 100 <= got.status < 200:
                out.interim += 1
            else:
                out.answers.append(got)
        if sentinel and not reader.eof and not reader.timed_out:
            try:
                sock.sendall(SENTINEL)
            except (BrokenPipeError, ConnectionResetError):
                reader.eof = True
            reader.deadline = time.monotonic() + timeout
            extra: list[Answer] = []
            while (got := reader.answer()) is not None:
                if 100 <= got.status < 200:
                    out.interim += 1
                else:
                    extra.append(got)
            # The sentinel asks to close after it: the last answer before the close is its.
            if extra and extra[-1].status == 404 and reader.eof and not reader.reset:
                extra.pop()
                out.sentinel = True
            out.answers += extra
        out.closed = reader.eof
        out.reset = reader.reset
        out.timed_out = reader.timed_out
    return out
