"""One client connection of the receiver's HTTP server (:mod:`relay.edge.http_server`).

A plain :class:`asyncio.Protocol`, in the way uvicorn builds its HTTP protocol on
httptools: the request parser is the one aiohttp exports (``aiohttp.http``: its C
parser, llhttp, with its limits and its defences against malformed and smuggled
requests); the flow control is this module's own (:class:`FlowControl`, over the
transport's ``pause_reading``/``resume_reading`` and its ``pause_writing``/
``resume_writing`` calls); what the connections share comes in a
:class:`~relay.edge.http_server.ServerState`.

Requests are handled one at a time, in the order they came, and their answers written
in that order. The parser is made to stop after each request (``max_msg_queue_size=1``)
and is fed again for the next, so a request it refuses never takes the requests before
it down with it: they are answered, then the refused one gets its ``400`` (see
:meth:`Connection._bad_request`).

The parser hands each request over with its body's reader (an ``aiohttp.StreamReader``)
and calls back into the connection for that reader's flow control: ``pause_reading()``
when a body's buffer is full, ``resume_reading()`` when its reader has caught up, and
``connected``. Those three are the whole of what it asks of the connection.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import ClientPayloadError, StreamReader
from aiohttp.http import HttpProcessingError, HttpRequestParser, RawRequestMessage
from aiohttp.web import RequestPayloadError

from relay.edge.http_types import Response, refusal, serialize

if TYPE_CHECKING:
    from relay.edge.http_server import ServerState

log = logging.getLogger(__name__)

READ_BUFSIZE = 2**16  # the parser's buffer per body before it pauses reading
MAX_LINE = 8190  # request line and header line limits: aiohttp's
MAX_FIELD = 8190
MAX_HEADERS = 128
MAX_QUEUE = 32  # parsed requests waiting per connection before reading pauses

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class FlowControl:
    """Back-pressure on one connection, over its transport's own switches (uvicorn's
    ``FlowControl``).

    Reading from the socket stops while either of two things holds it — a request
    body's buffer is full (its reader is behind), or ``MAX_QUEUE`` parsed requests are
    waiting — and resumes once neither does. Writing: the transport says when its buffer
    has passed its high-water mark (the client is not reading its answers) and when it
    has drained.
    """

    __slots__ = ("_reading", "_transport", "body_full", "queue_full", "writing_paused")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._reading = True  # what the transport was last told
        self.body_full = False
        self.queue_full = False
        self.writing_paused = False

    def update(self) -> None:
        """Tell the transport whether to read, when that has changed. (A transport
        that is closing ignores both calls.)"""
        reading = not (self.body_full or self.queue_full)
        if reading != self._reading:
            self._reading = reading
            if reading:
                self._transport.resume_reading()
            else:
                self._transport.pause_reading()


class Connection(asyncio.Protocol):
    """One client connection."""

    __slots__ = (
        "_close_after",
        "_close_after_queue",
        "_closing",
        "_eof",
        "_flow",
        "_head_only",
        "_in_next",
        "_loop",
        "_parser",
        "_queue",
        "_reading",
        "_refused",
        "_remote",
        "_state",
        "_switching",
        "_task",
        "busy",
        "closing_since",
        "head_since",
        "held",
        "last_active",
        "reading_since",
        "transport",
    )

    def __init__(self, state: ServerState, loop: asyncio.AbstractEventLoop) -> None:
        self._state = state
        self._loop = loop
        # The parser calls back only pause_reading(), resume_reading() and connected
        # (its body readers' flow control): this class has them; aiohttp's annotation
        # names its own protocol class.
        self._parser: HttpRequestParser | None = HttpRequestParser(
            self,  # type: ignore[arg-type]
            loop,
            READ_BUFSIZE,
            max_line_size=MAX_LINE,
            max_headers=MAX_HEADERS,
            max_field_size=MAX_FIELD,
            # Bodies come as sent: the receiver decodes a Content-Encoding itself, and
            # only for a tenant that accepts one (relay/edge/decoding.py).
            auto_decompress=False,
            # One request per feed: when a feed fails, every request before the failure
            # has already been handed over (aiohttp drops those parsed in a failing feed).
            max_msg_queue_size=1,
        )
        self.transport: asyncio.Transport | None = None
        self._flow: FlowControl  # from connection_made on
        self._queue: collections.deque[tuple[RawRequestMessage, StreamReader]] = collections.deque()
        self.busy = False  # a request is being handled: its answer is not written yet
        self._close_after = False  # close once the current answer is written
        self._closing = False
        self._eof = False  # the client has sent all it will send
        self._close_after_queue = False  # close once what is queued has been answered
        self._head_only = False  # the current request is a HEAD: no body in its answer
        self._switching = False  # a request asked to switch protocols: read no more
        self._refused: Response | None = None  # the answer to a request the parser refused
        self.head_since: float | None = None  # a request head began arriving then
        self.closing_since: float | None = None
        self._reading: StreamReader | None = None  # a body being read by a task
        self.reading_since: float | None = None  # since then
        self.held = 0  # bytes of that body held (ServerState.hold)
        self._task: asyncio.Task[None] | None = None
        self._remote: str | None = None
        self.last_active = loop.time()
        self._in_next = False

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio sets TCP_NODELAY on TCP sockets itself.
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._flow = FlowControl(transport)
        peer = transport.get_extra_info("peername")
        self._remote = str(peer[0]) if isinstance(peer, tuple) and peer else None
        state = self._state
        if state.closing:
            self.close()
        elif not state.admit(self, self._loop.time()):
            self._close_after = True
            try:
                self._answer(state.handler.connection_refused(self._remote))
            except Exception as e:  # a bug in the handler: the connection still goes
                log.error("refusing a connection failed", exc_info=e)
                self.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._state.connections.discard(self)
        self.transport = None
        self._closing = True
        self._queue.clear()
        if self._reading is not None:
            # The body being read will never complete: its reader learns why.
            self._reading.set_exception(ConnectionResetError("the client closed the connection"))
        self._parser = None
        if self.busy:
            # An ingest still running finishes on its own; its answer has nowhere to go.
            self.busy = False
            self._state.request_ended()

    def data_received(self, data: bytes) -> None:
        if self._closing or self._parser is None or self._switching:
            return
        self.last_active = self._loop.time()
        parser = self._parser
        got = False
        upgraded = False
        try:
            # The parser stops after each request and keeps what follows (its tail):
            # an empty feed parses the next one from there.
            messages, upgraded, _tail = parser.feed_data(data)
            if not messages and data and not upgraded:
                # It may have stopped at the end of a request handed over before (whose
                # body ended in this read), with the next one in its tail.
                messages, upgraded, _tail = parser.feed_data(b"")
            while messages:
                got = True
                self._queue.extend(messages)
                parser.message_consumed()
                if upgraded or len(self._queue) >= MAX_QUEUE:
                    break  # the rest waits in the tail (_resume_if_drained)
                messages, upgraded, _tail = parser.feed_data(b"")
        except HttpProcessingError as e:
            self._bad_request(e)
            return
        if got:
            self.head_since = None
            if len(self._queue) >= MAX_QUEUE and not self._flow.queue_full:
                self._flow.queue_full = True
                self._flow.update()
        elif data and self.head_since is None and not self.busy and not self._queue:
            self.head_since = self.last_active  # part of a request head, so far
        if upgraded:
            # A protocol switch (Upgrade, CONNECT) is not offered: the request is
            # answered as any other and the connection closed after it; nothing after
            # it is read.
            self._switching = True
        if not self.busy:
            self._next()

    def eof_received(self) -> bool:
        """The client has sent all it will (it may still read): answer what it sent,
        then close. A body still arriving never will."""
        self._eof = True
        if self._reading is not None and not self._reading.is_eof():
            self._reading.set_exception(ConnectionResetError("the client stopped sending"))
        if not self.busy and not self._queue and self._refused is None:
            self.close()
        return True  # keep the transport open to write the answers

    def pause_writing(self) -> None:
        self._flow.writing_paused = True

    def resume_writing(self) -> None:
        self._flow.writing_paused = False
        self._next()

    # --- what the parser's body readers call -----------------------------------------

    @property
    def connected(self) -> bool:
        return self.transport is not None

    def pause_reading(self) -> None:
        """A body's buffer is full: the parser stops where it is (keeping the rest as
        its tail) and the socket is not read until the body's reader catches up."""
        if self._parser is not None and not self._switching:
            self._parser.pause_reading()
        self._flow.body_full = True
        self._flow.update()

    def resume_reading(self, resume_parser: bool = True) -> None:
        """The body's reader has caught up (or the body ended: ``resume_parser`` is
        then false, the parser having nothing of it left): parse what the parser kept,
        and read from the socket again unless that filled a buffer once more."""
        self._flow.body_full = False
        if resume_parser and not self._switching:
            self.data_received(b"")
        self._flow.update()

    @property
    def remote(self) -> str | None:
        """The client's address."""
        return self._remote

    @property
    def stalled_since(self) -> float | None:
        """When the request still arriving began to (its head, or its body being read);
        None if none is."""
        if self.closing_since is not None or self.transport is None:
            return None
        return self.reading_since if self.busy else self.head_since

    @property
    def idle(self) -> bool:
        """Nothing owed and nothing arriving: closing it loses nothing."""
        return (
            not self.busy
            and not self._queue
            and self._refused is None
            and self.head_since is None
            and self.closing_since is None
            and self.transport is not None
        )

    # --- requests, one at a time -----------------------------------------------------

    def _next(self) -> None:
        if self._in_next:
            return
        self._in_next = True
        try:
            # Not while the client is not reading its answers (the transport paused
            # our writing): the queue then fills, and reading from it pauses too.
            flow = self._flow
            while self._queue and not self.busy and not self._closing and not flow.writing_paused:
                msg, payload = self._queue.popleft()
                if flow.queue_full and len(self._queue) <= MAX_QUEUE // 2:
                    self._resume_if_drained()
                self._start(msg, payload)
            if not self._queue and not self.busy:
                if self._refused is not None:
                    refused, self._refused = self._refused, None
                    self._close_after, self._head_only = True, False
                    self._answer(refused)
                elif self._close_after_queue:
                    self.close()
        finally:
            self._in_next = False

    def _resume_if_drained(self) -> None:
        """The parser stopped at ``MAX_QUEUE`` waiting requests and holds the bytes
        after them: parse those now, and read from the socket again unless that filled
        the queue once more."""
        self.data_received(b"")  # its own call of _next does nothing: we are in it
        if len(self._queue) < MAX_QUEUE and not self._closing:
            self._flow.queue_full = False
            self._flow.update()

    def _start(self, msg: RawRequestMessage, payload: StreamReader) -> None:
        self.busy = True
        self._state.request_started()
        self._close_after = msg.should_close or msg.upgrade
        self._head_only = msg.method == "HEAD"
        handler = self._state.handler
        try:
            ctx = handler.head(msg, self._remote)
        except Exception as e:
            self._close_after = True
            self._answer(handler.failed(None, e))
            return
        if isinstance(ctx, Response):
            if not payload.is_eof():
                self._close_after = True  # its body is not read
            self._answer(ctx)
            return
        if payload.is_eof():
            try:
                body = payload.read_nowait()
            except Exception as e:  # the body was cut short or garbled
                self._close_after = True
                self._answer(self._payload_failed(ctx, e))
                return
            if len(body) > self._state.max_body:  # chunked, so no length was announced
                self._close_after = True
                self._answer(self._too_large(ctx))
                return
            self._dispatch(ctx, msg, body)
        else:
            if msg.headers.get("Expect", "").lower() == "100-continue" and msg.version >= (1, 1):
                assert self.transport is not None
                self.transport.write(_CONTINUE)
            self._reading = payload
            self.reading_since = self._loop.time()
            self._task = self._loop.create_task(self._read_body(ctx, msg, payload))

    async def _read_body(self, ctx: Any, msg: RawRequestMessage, payload: StreamReader) -> None:
        srv = self._state
        chunks: list[bytes] = []
        size = 0
        response: Response | None = None
        try:
            async with asyncio.timeout(srv.body_timeout):
                while chunk := await payload.readany():
                    size += len(chunk)
                    if size > srv.max_body:
                        response = self._too_large(ctx)
                        break
                    if not srv.hold(self, len(chunk), self._loop.time()):
                        detail = (
                            f"the bodies arriving hold server.max_body_memory "
                            f"({srv.max_body_memory} bytes)"
                        )
                        response = srv.handler.body_failed(ctx, 503, "body_memory", detail)
                        break
                    chunks.append(chunk)
        except TimeoutError:
            # Slow or stalled: the sender may well succeed on a retry.
            detail = f"the body did not arrive within {srv.body_timeout:g}s"
            response = srv.handler.body_failed(ctx, 503, "body_timeout", detail)
        except Exception as e:
            response = self._payload_failed(ctx, e)
        finally:
            srv.release(self)
            self._reading = None
            self.reading_since = None
            self._task = None
        if response is not None:
            self._close_after = True
            self._answer(response)
        else:
            self._dispatch(ctx, msg, b"".join(chunks))
        self._next()

    def _too_large(self, ctx: Any) -> Response:
        detail = f"body exceeds {self._state.max_body} bytes"
        return self._state.handler.body_failed(ctx, 413, "body_too_large", detail)

    def _payload_failed(self, ctx: Any, e: Exception) -> Response:
        if isinstance(e, ConnectionError):  # the sender went away mid-body
            detail = "the connection closed before the body was complete"
            return self._state.handler.body_failed(ctx, 400, "client_disconnected", detail)
        if isinstance(e, (HttpProcessingError, ClientPayloadError, RequestPayloadError)):
            # Garbled: bad chunked framing, or a Content-Encoding that does not decode.
            # aiohttp's text quotes the body's bytes: the description only, never them.
            what = refusal(e)[1] if isinstance(e, HttpProcessingError) else type(e).__name__
            detail = f"the body could not be read: {what}"
            return self._state.handler.body_failed(ctx, 400, "malformed_body", detail)
        return self._state.handler.failed(ctx, e)

    def _dispatch(self, ctx: Any, msg: RawRequestMessage, body: bytes) -> None:
        handler = self._state.handler
        try:
            result = handler.handle(ctx, msg, body)
        except Exception as e:
            result = handler.failed(ctx, e)
        if isinstance(result, Response):
            self._answer(result)
        else:
            future, finish = result
            future.add_done_callback(lambda f: self._finished(ctx, finish, f))

    def _finished(
        self,
        ctx: Any,
        finish: Callable[[asyncio.Future[Any]], Response],
        future: asyncio.Future[Any],
    ) -> None:
        try:
            response = finish(future)
        except BaseException as e:  # a callback: nothing above it would see this
            response = self._state.handler.failed(ctx, e)
        self._answer(response)
        self._next()

    def _answer(self, response: Response) -> None:
        transport = self.transport
        if transport is not None and not self._closing:
            close = self._close_after or self._state.closing or (self._eof and not self._queue)
            data = serialize(response, self._state.date.get(), close)
            if self._head_only:  # the headers a GET would have had, no body
                data = data[: len(data) - len(response.body)]
            transport.write(data)
            self.last_active = self._loop.time()
            if close:
                self.close()
        if self.busy:  # not if the connection was lost meanwhile
            self.busy = False
            self._state.request_ended()

    def _bad_request(self, e: HttpProcessingError) -> None:
        """A request the parser cannot read: nothing more is read from this connection.

        Every request before it was handed over (the parser stops after each one), so
        they are answered first, in turn; then this one gets its answer (``400``, with
        ``Connection: close``) and the connection is closed. When the failure is in the
        body of a request already handed over (chunked framing turning bad), that body
        fails instead: ``400 malformed_body``, from the handler's ``body_failed``."""
        self._parser = None
        body = self._reading
        if body is None and self._queue:
            body = self._queue[-1][1]
        if body is not None and not body.is_eof():
            body.set_exception(e)
            self._close_after_queue = True
        else:
            reason, detail = refusal(e)
            try:
                self._refused = self._state.handler.refused(reason, detail, self._remote)
            except Exception as err:
                self._refused = self._state.handler.failed(None, err)
        self._next()

    # --- closing ---------------------------------------------------------------------

    def close(self) -> None:
        self._closing = True
        if self.closing_since is None:
            self.closing_since = self._loop.time()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
        if self.transport is not None:
            self.transport.abort()
