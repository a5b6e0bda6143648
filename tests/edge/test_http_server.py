"""The receiver's HTTP/1.1 server on its own: keep-alive, pipelining, closing, limits,
shutdown — with a scripted handler, over real sockets."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from aiohttp.http import RawRequestMessage

from relay.config.values import Listen
from relay.edge.http_connection import MAX_QUEUE
from relay.edge.http_server import STALL_S, HttpServer
from relay.edge.http_types import Pending, Response
from tests.support.common import wait_for


class Scripted:
    """Answers ``{"path": …, "body": …}``; a body starting ``wait:`` is answered only
    when the test resolves its future (as an ingest would)."""

    def __init__(self) -> None:
        self.waiting: dict[bytes, asyncio.Future[Any]] = {}
        self.failures: list[str] = []

    def head(self, msg: RawRequestMessage, remote: str | None) -> Response | RawRequestMessage:
        if msg.path == "/refuse":
            return Response(403, b'{"error": "refused"}')
        return msg

    def body_failed(self, ctx: Any, status: int, reason: str, detail: str) -> Response:
        self.failures.append(reason)
        return Response(status, json.dumps({"error": reason}).encode())

    def handle(self, ctx: Any, msg: RawRequestMessage, body: bytes) -> Response | Pending:
        answer = json.dumps({"path": msg.path, "body": body.decode()}).encode()
        if body.startswith(b"wait:"):
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self.waiting[body] = future
            return future, lambda f: Response(200, answer)
        return Response(200, answer)

    def failed(self, ctx: Any, error: BaseException) -> Response:
        return Response(500, b'{"error": "internal_error"}')

    def refused(self, reason: str, detail: str, remote: str | None) -> Response:
        self.failures.append(reason)
        answer = {"error": "bad_request", "reason": reason, "detail": detail}
        return Response(400, json.dumps(answer).encode())

    def connection_refused(self, remote: str | None) -> Response:
        self.failures.append("connection_refused")
        return Response(503, b'{"error": "too_many_connections"}')

    def idle_connection_closed(self) -> None:
        self.failures.append("idle_closed")

    def slow_connection_closed(self, remote: str | None) -> None:
        self.failures.append("slow_closed")


async def start(handler: Scripted, **options: Any) -> tuple[HttpServer, int]:
    server = HttpServer(handler, **{"max_body": 4096, "body_timeout": 5.0, **options})
    await server.start(Listen(host="127.0.0.1", port=0))
    return server, server.addresses[0][1]


def request(path: str, body: bytes = b"", version: str = "1.1", extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/{version}\r\nHost: relay\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP answer off the stream: status, headers (lower-cased names), body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v for k, _, v in (x.partition(": ") for x in lines[1:] if x)}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
    return status, headers, body


async def closed(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(), 10) == b""


async def test_requests_on_one_connection_are_answered_in_turn() -> None:
    server, port = await start(Scripted())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for n in range(3):
            writer.write(request("/a", b"x%d" % n))
            status, headers, body = await answer(reader)
            assert (status, json.loads(body)["body"]) == (200, f"x{n}")
            assert "connection" not in headers
            assert headers["content-type"] == "application/json"
            assert headers["date"].endswith("GMT")
    finally:
        writer.close()
        await server.shutdown(1)


async def test_pipelined_requests_are_answered_in_order() -> None:
    """The second request is ready at once, the first waits: the first is still
    answered first."""
    handler = Scripted()
    server, port = await start(handler)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request("/1", b"wait:1") + request("/2", b"now"))
        await wait_for(lambda: b"wait:1" in handler.waiting, 10)
        handler.waiting[b"wait:1"].set_result(1)
        first, second = await answer(reader), await answer(reader)
        assert json.loads(first[2])["path"] == "/1"
        assert json.loads(second[2])["path"] == "/2"
    finally:
        writer.close()
        await server.shutdown(1)


async def test_more_pipelined_requests_than_the_queue_holds_are_all_answered() -> None:
    server, port = await start(Scripted())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    n = MAX_QUEUE * 20
    try:
        writer.write(b"".join(request(f"/{i}", b"b%d" % i) for i in range(n)))
        paths = [json.loads((await answer(reader))[2])["path"] for _ in range(n)]
        assert paths == [f"/{i}" for i in range(n)]
    finally:
        writer.close()
        await server.shutdown(1)


async def test_requests_held_back_behind_a_slow_one_are_all_answered_after_it() -> None:
    """While the first request waits, the parser stops at MAX_QUEUE requests and holds
    the rest of what arrived; once the queue drains it must parse that rest itself (no
    more bytes are coming to make it)."""
    handler = Scripted()
    server, port = await start(handler)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    n = MAX_QUEUE * 3
    try:
        writer.write(request("/0", b"wait:0") + b"".join(request(f"/{i}") for i in range(1, n)))
        await wait_for(lambda: b"wait:0" in handler.waiting, 10)
        handler.waiting[b"wait:0"].set_result(1)
        paths = [json.loads((await answer(reader))[2])["path"] for _ in range(n)]
        assert paths == [f"/{i}" for i in range(n)]
    finally:
        writer.close()
        await server.shutdown(1)


async def test_http_1_0_connection_close_and_upgrade_end_the_connection_after_the_answer() -> None:
    server, port = await start(Scripted())
    try:
        for raw in (
            request("/a", b"x", version="1.0"),
            request("/a", extra="Connection: close\r\n"),
            request("/a", extra="Connection: Upgrade\r\nUpgrade: websocket\r\n"),
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            status, headers, _ = await answer(reader)
            assert (status, headers["connection"]) == (200, "close")
            assert await closed(reader)
            writer.close()
    finally:
        await server.shutdown(1)


async def test_a_request_the_parser_cannot_read_is_400_and_closes() -> None:
    server, port = await start(Scripted())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /a HTTP/1.1\r\nHost: r\r\nNo colon in this header\r\n")
        status, headers, body = await answer(reader)
        assert (status, headers["connection"]) == (400, "close")
        assert json.loads(body)["error"] == "bad_request"
        assert await closed(reader)
    finally:
        writer.close()
        await server.shutdown(1)


async def test_a_refusal_before_the_body_arrived_closes_the_connection() -> None:
    """The unread rest of the body must not be taken for the next request."""
    server, port = await start(Scripted())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /refuse HTTP/1.1\r\nHost: relay\r\nContent-Length: 100\r\n\r\nonly-part"
        )
        status, headers, _ = await answer(reader)
        assert (status, headers["connection"]) == (403, "close")
        assert await closed(reader)
    finally:
        writer.close()
        await server.shutdown(1)


async def test_a_body_sent_in_pieces_is_read_whole() -> None:
    server, port = await start(Scripted())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /a HTTP/1.1\r\nHost: relay\r\nContent-Length: 6\r\n\r\nabc")
        await writer.drain()
        writer.write(b"def")
        status, _, body = await answer(reader)
        assert (status, json.loads(body)["body"]) == (200, "abcdef")
    finally:
        writer.close()
        await server.shutdown(1)


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_larger_than_the_read_buffer_is_read_whole_behind_flow_control(
    chunked: bool,
) -> None:
    """A body past twice the parser's buffer (READ_BUFSIZE) arriving faster than it is
    read: its reader asks the connection to stop reading, and to read again once it has
    caught up — then the request after it is answered too."""
    server, port = await start(Scripted(), max_body=4 * 2**20)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = b"z" * (2**20 + 7)
    if chunked:
        framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:99], body[99:]))
        head = b"POST /big HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n"
        raw = head + framed + b"0\r\n\r\n"
    else:
        raw = request("/big", body)
    try:
        writer.write(raw + request("/after", b"x"))
        status, _, answer_body = await answer(reader)
        assert (status, len(json.loads(answer_body)["body"])) == (200, len(body))
        status, _, answer_body = await answer(reader)
        assert (status, json.loads(answer_body)["path"]) == (200, "/after")
    finally:
        writer.close()
        await server.shutdown(1)


async def test_an_idle_connection_is_closed_after_the_keepalive_timeout() -> None:
    server, port = await start(Scripted(), keepalive_timeout=0.2, sweep_every=0.05)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request("/a", b"x"))
        assert (await answer(reader))[0] == 200
        assert await closed(reader)
    finally:
        writer.close()
        await server.shutdown(1)


async def test_shutdown_closes_idle_connections_and_lets_a_request_in_flight_answer() -> None:
    handler = Scripted()
    server, port = await start(handler)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        idle_writer.write(request("/idle", b"x"))
        assert (await answer(idle_reader))[0] == 200
        busy_writer.write(request("/busy", b"wait:busy"))
        await wait_for(lambda: b"wait:busy" in handler.waiting, 10)
        stopping = asyncio.create_task(server.shutdown(10))
        assert await closed(idle_reader)
        assert not stopping.done()
        handler.waiting[b"wait:busy"].set_result(1)
        status, headers, _ = await answer(busy_reader)
        assert (status, headers["connection"]) == (200, "close")
        await asyncio.wait_for(stopping, 10)
        assert await closed(busy_reader)
        refused = asyncio.open_connection("127.0.0.1", port)
        try:
            _, w = await refused
        except OSError:
            pass  # nothing listens any more
        else:
            w.close()
            raise AssertionError("the server still accepts connections")
    finally:
        idle_writer.close()
        busy_writer.close()


async def test_shutdown_gives_up_on_a_request_that_does_not_finish_in_time() -> None:
    handler = Scripted()
    server, port = await start(handler)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request("/busy", b"wait:never"))
        await wait_for(lambda: b"wait:never" in handler.waiting, 10)
        await asyncio.wait_for(server.shutdown(0.2), 10)
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()


async def test_it_serves_on_a_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "receiver.sock")
    server = HttpServer(Scripted(), max_body=4096, body_timeout=5.0)
    await server.start(Listen(path=path))
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(request("/u", b"over a unix socket"))
        status, _, body = await answer(reader)
        assert (status, json.loads(body)["body"]) == (200, "over a unix socket")
    finally:
        writer.close()
        await server.shutdown(1)


async def test_a_request_in_flight_is_answered_before_the_refusal_of_the_next() -> None:
    handler = Scripted()
    server, port = await start(handler)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request("/good", b"wait:good"))
        await wait_for(lambda: b"wait:good" in handler.waiting, 10)
        writer.write(b"NOT HTTP AT ALL\r\n")
        await writer.drain()
        handler.waiting[b"wait:good"].set_result(1)
        status, _, body = await answer(reader)
        assert (status, json.loads(body)["path"]) == (200, "/good")
        status, headers, body = await answer(reader)
        assert (status, headers["connection"], json.loads(body)["error"]) == (
            400,
            "close",
            "bad_request",
        )
        assert await closed(reader)
    finally:
        writer.close()
        await server.shutdown(1)


async def test_a_client_that_half_closes_after_its_request_still_gets_the_answer() -> None:
    handler = Scripted()
    server, port = await start(handler)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request("/a", b"wait:half"))
        writer.write_eof()  # done sending; still reading
        await wait_for(lambda: b"wait:half" in handler.waiting, 10)
        handler.waiting[b"wait:half"].set_result(1)
        status, headers, _ = await answer(reader)
        assert (status, headers["connection"]) == (200, "close")
        assert await closed(reader)
    finally:
        writer.close()
        await server.shutdown(1)


async def test_a_head_request_is_answered_without_a_body() -> None:
    server, port = await start(Scripted())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"HEAD /a HTTP/1.1\r\nHost: relay\r\n\r\n" + request("/next", b"y"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        # The next bytes are the next answer, not a body of the HEAD's.
        status, _, body = await answer(reader)
        assert (status, json.loads(body)["path"]) == (200, "/next")
    finally:
        writer.close()
        await server.shutdown(1)


async def test_a_refused_request_read_with_a_good_one_is_answered_after_it() -> None:
    """aiohttp's parser drops the requests it read in the same feed as a bad one; this
    server's parser stops after each request, so the good one is answered, then the bad
    one gets its 400 — never in the good one's place."""
    handler = Scripted()
    server, port = await start(handler)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    bad = b"POST /bad HTTP/1.1\r\nHost: r\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx"
    try:
        writer.write(request("/good", b"x") + bad)
        status, _, body = await answer(reader)
        assert (status, json.loads(body)["path"]) == (200, "/good")
        status, headers, body = await answer(reader)
        assert (status, headers["connection"]) == (400, "close")
        assert json.loads(body)["reason"] == "bad_content_length"
        assert await closed(reader)
    finally:
        writer.close()
        await server.shutdown(1)


@pytest.mark.parametrize(
    ("shape", "reason"),
    [
        (b"Content-Length: abc\r\n", "bad_content_length"),
        (b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n", "bad_transfer_encoding"),
        (b"Content-Length: 3\r\nContent-Length: 3\r\n", "bad_content_length"),
    ],
)
async def test_a_refused_request_alone_is_answered_400_and_handed_to_the_handler(
    shape: bytes, reason: str
) -> None:
    handler = Scripted()
    server, port = await start(handler)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /a HTTP/1.1\r\nHost: r\r\n" + shape + b"\r\nabc")
        status, headers, body = await answer(reader)
        assert (status, headers["connection"]) == (400, "close")
        assert (json.loads(body)["reason"], handler.failures) == (reason, [reason])
        assert await closed(reader)
    finally:
        writer.close()
        await server.shutdown(1)


async def test_a_client_that_never_reads_its_answers_is_dropped() -> None:
    """Closing waits to flush what is written; a client that never reads would hold
    its connection, the answers and the queued requests for ever."""
    server, port = await start(Scripted(), keepalive_timeout=0.2, sweep_every=0.05)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    _, writer = await asyncio.open_connection(sock=sock)  # its answers are never read
    try:
        writer.write(b"".join(request(f"/{i}", b"y" * 4000) for i in range(2000)))
        await wait_for(lambda: len(server.state.connections) == 1, 10)
        conn = next(iter(server.state.connections))
        await wait_for(lambda: conn.closing_since is not None, 10)
        await wait_for(lambda: not server.state.connections, 10)
    finally:
        writer.close()
        await server.shutdown(1)


async def test_a_request_head_that_trickles_in_is_cut_off_after_the_body_timeout() -> None:
    server, port = await start(Scripted(), body_timeout=0.2, sweep_every=0.05)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /a HTTP/1.1\r\nHost: r\r\n")  # and never the rest
        assert await closed(reader)
        # A connection that is merely idle stays (until the keep-alive timeout).
        idle_writer.write(request("/still-here", b"x"))
        assert (await answer(idle_reader))[0] == 200
    finally:
        writer.close()
        idle_writer.close()
        await server.shutdown(1)


# --- what the parser raises, by kind: the reasons of refusals rest on it -------------

PARSER_ERRORS = [
    (  # LineTooLong
        b"POST /a HTTP/1.1\r\nHost: r\r\nX-Long: " + b"x" * 9000 + b"\r\n\r\n",
        ("header_too_large", "a request line or header field is too long"),
    ),
    (  # InvalidURLError
        b"GET /a\x01b HTTP/1.1\r\nHost: r\r\n\r\n",
        ("bad_request_line", "the request target is not a valid URL"),
    ),
    (  # BadStatusLine
        b"GET /a HTTP/x.y\r\nHost: r\r\n\r\n",
        ("bad_request_line", "the request line is not HTTP/1.x"),
    ),
    (  # BadHttpMethod (a BadStatusLine), on a TLS hello
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        ("bad_request_line", "TLS on a plain HTTP port"),
    ),
    (  # InvalidHeader
        b"GET /a HTTP/1.1\r\nHost: r\r\nSec-WebSocket-Key1: x\r\n\r\n",
        ("bad_header", "a header field is not allowed or holds a NUL"),
    ),
]


@pytest.mark.parametrize(("raw", "expected"), PARSER_ERRORS)
async def test_each_kind_of_parser_error_is_refused_with_its_own_reason(
    raw: bytes, expected: tuple[str, str]
) -> None:
    """``http_types.refusal`` tells the parser's errors apart by their classes, which
    aiohttp does not export (``tests/test_layout.py`` allows them by name): an aiohttp
    release raising others for these requests would change what refusals are counted
    as, and fails here."""
    server, port = await start(Scripted())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        status, headers, body = await answer(reader)
        assert (status, headers["connection"]) == (400, "close")
        assert (json.loads(body)["reason"], json.loads(body)["detail"]) == expected
    finally:
        writer.close()
        await server.shutdown(1)


# --- the parser failing: no answer is given in another request's place ----------------


async def _answers_until_closed(reader: asyncio.StreamReader) -> list[int]:
    statuses: list[int] = []
    while True:
        line = await asyncio.wait_for(reader.readline(), 10)
        if not line:
            return statuses
        statuses.append(int(line.split()[1]))
        length = 0
        while (h := await asyncio.wait_for(reader.readline(), 10)) != b"\r\n":
            if h.lower().startswith(b"content-length:"):
                length = int(h.split(b":")[1])
        await asyncio.wait_for(reader.readexactly(length), 10)


async def test_a_bad_request_behind_more_good_ones_than_the_queue_holds_is_answered_last() -> None:
    """The connection stops reading at MAX_QUEUE requests and the parser keeps the rest
    as its tail; when the queue drains, ``_resume_if_drained`` parses that tail. Every
    good request in it is answered, then the bad one gets its 400."""
    server, port = await start(Scripted())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    bad = b"POST /bad HTTP/1.1\r\nHost: r\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx"
    good = [request(f"/{i}") for i in range(MAX_QUEUE + 1)]  # no bodies
    try:
        writer.write(b"".join(good) + bad)
        statuses = await _answers_until_closed(reader)
        assert statuses == [200] * len(good) + [400]
    finally:
        writer.close()
        await server.shutdown(1)


async def test_a_bad_request_after_a_head_split_across_reads_is_answered_after_it() -> None:
    """Read 1 = request A whole + request B's head up to "\\r\\n\\r"; read 2 = "\\n" +
    garbage. B completes in read 2, before the garbage fails the parser: B is answered,
    then the garbage gets its 400."""
    handler = Scripted()
    server, port = await start(handler)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    b_head = b"POST /b HTTP/1.1\r\nHost: r\r\n\r"
    try:
        writer.write(request("/a", b"body-of-a") + b_head)
        first = await _answer(reader)  # A answered: read 1 has been handled
        assert first == 200
        writer.write(b"\nNOT HTTP AT ALL\r\n")
        statuses = [first, *await _answers_until_closed(reader)]
        assert statuses == [200, 200, 400]
    finally:
        writer.close()
        await server.shutdown(1)


async def _answer(reader: asyncio.StreamReader) -> int:
    line = await asyncio.wait_for(reader.readline(), 10)
    status = int(line.split()[1])
    length = 0
    while (h := await asyncio.wait_for(reader.readline(), 10)) != b"\r\n":
        if h.lower().startswith(b"content-length:"):
            length = int(h.split(b":")[1])
    await asyncio.wait_for(reader.readexactly(length), 10)
    return status


async def test_garbled_chunk_framing_mid_body_is_400_not_left_to_the_body_timeout() -> None:
    """A chunked body being read by ``_read_body`` whose framing then turns bad: the
    parser raises from ``feed_data`` (``_bad_request``: parser dropped), but the
    StreamReader the task awaits is never told, so the task waits out ``body_timeout``
    and the sender gets 503 ``body_timeout`` (and retries the same bytes) instead of
    400 ``malformed_body``. ``_bad_request`` should fail ``self._reading`` (as
    ``eof_received``/``connection_lost`` do)."""
    handler = Scripted()
    server, port = await start(handler, body_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /c HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == (
            b"HTTP/1.1 100 Continue\r\n\r\n"
        )  # the body is now awaited by _read_body
        writer.write(b"3\r\nabc\r\nzz-not-a-chunk-size\r\n")
        status = await _answer(reader)
        assert (status, handler.failures) == (400, ["malformed_body"])
    finally:
        writer.close()
        await server.shutdown(1)


# --- the connection cap ----------------------------------------------------------------


async def test_past_max_connections_a_new_connection_replaces_the_longest_idle_one() -> None:
    handler = Scripted()
    server, port = await start(handler, max_connections=2)
    oldest_reader, oldest = await asyncio.open_connection("127.0.0.1", port)
    _, idle = await asyncio.open_connection("127.0.0.1", port)
    await wait_for(lambda: server.open_connections == 2, 10)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request("/new", b"x"))
        status, _, body = await answer(reader)
        assert (status, json.loads(body)["path"]) == (200, "/new")
        assert await closed(oldest_reader)  # the longest idle made room
        assert handler.failures == ["idle_closed"]
        assert server.open_connections == 2
    finally:
        for w in (oldest, idle, writer):
            w.close()
        await server.shutdown(1)


async def test_past_max_connections_with_every_one_busy_a_new_one_gets_503() -> None:
    handler = Scripted()
    server, port = await start(handler, max_connections=1)
    busy_reader, busy = await asyncio.open_connection("127.0.0.1", port)
    try:
        busy.write(request("/busy", b"wait:busy"))
        await wait_for(lambda: b"wait:busy" in handler.waiting, 10)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        status, headers, _ = await answer(reader)
        assert (status, headers["connection"]) == (503, "close")
        assert await closed(reader)
        writer.close()
        assert handler.failures == ["connection_refused"]
        handler.waiting[b"wait:busy"].set_result(1)  # the busy one is unaffected
        assert (await answer(busy_reader))[0] == 200
    finally:
        busy.close()
        await server.shutdown(1)


async def test_past_max_connections_a_stalled_sender_gives_its_place_to_a_new_one() -> None:
    # One connection sends a head and two bytes of its body, then nothing (a slow
    # sender holding a slot); past STALL_S, a new connection takes its place.
    handler = Scripted()
    server, port = await start(handler, max_connections=2)
    stalled_reader, stalled = await asyncio.open_connection("127.0.0.1", port)
    busy_reader, busy = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    try:
        stalled.write(request("/slow", b"0123456789")[:-8])
        busy.write(request("/busy", b"wait:busy"))  # busy, but not stalled: it stays
        await wait_for(lambda: b"wait:busy" in handler.waiting, 10)
        await wait_for(lambda: _stalled_past(server, loop.time()), 10)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request("/new", b"x"))
        status, _, body = await answer(reader)
        assert (status, json.loads(body)["path"]) == (200, "/new")
        assert await closed(stalled_reader)
        assert "slow_closed" in handler.failures
        handler.waiting[b"wait:busy"].set_result(1)
        assert (await answer(busy_reader))[0] == 200
        writer.close()
    finally:
        stalled.close()
        busy.close()
        await server.shutdown(1)


def _stalled_past(server: HttpServer, now: float) -> bool:
    return any(
        (since := c.stalled_since) is not None and now - since > STALL_S
        for c in server.state.connections
    )


async def test_a_request_behind_a_body_that_ends_in_a_later_read_is_answered() -> None:
    """The parser stops at the end of each request; when that end (the rest of a body
    handed over earlier) comes in the same read as the next request, the next one is in
    the parser's tail and must still be parsed — nothing more may ever arrive."""
    server, port = await start(Scripted())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    a, b = request("/a", b"x" * 100), request("/b", b"y")
    split = a.index(b"\r\n\r\n") + 4 + 50
    try:
        writer.write(a[:split])
        await writer.drain()
        await wait_for(lambda: next(iter(server.state.connections)).busy, 10)
        writer.write(a[split:] + b)
        paths = [json.loads((await answer(reader))[2])["path"] for _ in range(2)]
        assert paths == ["/a", "/b"]
    finally:
        writer.close()
        await server.shutdown(1)
