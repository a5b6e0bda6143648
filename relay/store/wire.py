"""The Redis wire: RESP encoding, and the connection the script pipelines write to.

The hot paths — ingest, and the finishes of deliveries — run one Lua script for many
callers at once (:mod:`relay.store.script_pipe`): batches written the moment they form,
without waiting, and their replies read in order by one reader. redis-py's client does
not offer that publicly, so this module owns both ends of that wire, on public ground
only (redis-py's public classes and ``hiredis.Reader``, no private name of either):

- **Encoding.** Every RESP byte the relay writes itself is built here: the commands
  (``SCRIPT LOAD``, ``EVALSHA``, ``WAIT``, the set-up), and the arguments of the two
  batched scripts from typed records — :class:`IngestItem` for ``ingest.lua``
  (:class:`IngestBatch`) and :class:`FinishItem` for ``finish_batch.lua``
  (:class:`FinishBatch`) — in the order their headers give. Callers build records; a
  script's ARGV layout is written down once, here, beside the scripts.
- **The connection** (:class:`Wire`, :func:`connect`): an asyncio stream of its own
  (``asyncio.open_connection``, or ``open_unix_connection`` for a socket path) to the
  server a redis-py client is set up for: address, TLS, credentials, database and client
  name as redis-py reads them from the client's settings (a connection object built
  from its pool's public settings and never connected). For a Sentinel client
  (:mod:`relay.store.endpoint`) the address is the primary its pool asks the sentinels
  for, anew for every connection: after a failover the next connection finds the new
  primary. The wire speaks RESP2 whatever protocol the client's own connections use (its
  replies are read here, nowhere else), so it sends no ``HELLO``: ``AUTH``,
  ``CLIENT SETNAME`` and ``SELECT``, as the settings need, pipelined and answered
  before anything else.
- **Replies** are parsed with ``hiredis.Reader`` (redis-py's own accelerator), as many
  per read as have arrived. Nested arrays pass through as lists (a finish's
  ``{next_job, breaker_change}``); error replies, at any depth, become redis-py's
  exception classes (:func:`reply_error`: ``NOSCRIPT`` a ``NoScriptError``,
  ``READONLY`` a ``ReadOnlyError``, …).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

import hiredis
import redis.exceptions
from redis.asyncio import Redis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.sentinel import SentinelManagedConnection
from redis.credentials import UsernamePasswordCredentialProvider

Value = bytes | str | int

_READ_SIZE = 65536
_CLOSE_WAIT = 1.0
_MORE = object()  # hiredis: no whole reply buffered yet


# -- RESP ---------------------------------------------------------------------------


def bulk(value: Value) -> bytes:
    """One RESP bulk string."""
    if isinstance(value, str):
        value = value.encode()
    elif isinstance(value, int):
        value = b"%d" % value
    return b"$%d\r\n%s\r\n" % (len(value), value)


def command(*args: Value) -> bytes:
    """One command, as a RESP array of bulk strings."""
    return b"*%d\r\n%s" % (len(args), b"".join(bulk(a) for a in args))


class Packed(NamedTuple):
    """A script's arguments as RESP bulk strings: ``parts`` are written one after another
    and hold ``nargs`` arguments in all."""

    nargs: int
    parts: list[bytes]


def pack(values: Sequence[Value]) -> Packed:
    """``values`` as a script's arguments, one bulk string each."""
    return Packed(len(values), [b"".join(bulk(v) for v in values)])


class Script:
    """One Lua script as the wire calls it: by digest, after a ``SCRIPT LOAD``."""

    def __init__(self, source: str) -> None:
        text = source.encode()
        self.sha = hashlib.sha1(text).hexdigest()  # noqa: S324 - Redis' id for the script
        self.load = command(b"SCRIPT", b"LOAD", text)
        # EVALSHA sha 0: no KEYS (the batched scripts build their keys from the prefix)
        self._head = b"$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n0\r\n" % self.sha.encode()

    def call(self, args: Packed) -> list[bytes]:
        """``EVALSHA`` of this script with ``args``, as the parts to write."""
        return [b"*%d\r\n%s" % (args.nargs + 3, self._head), *args.parts]


def wait(replicas: int, timeout_ms: int) -> bytes:
    """``WAIT replicas timeout_ms``: answered once that many replicas have everything
    this connection wrote before it (or at the timeout, with how many had)."""
    return command(b"WAIT", replicas, timeout_ms)


# -- ingest.lua's batch ---------------------------------------------------------------


class IngestJob(NamedTuple):
    """One job an event gets: its sink, how long the job lives, and ``"chat"`` for a sink
    that delivers a chat's events in order (else ``""``)."""

    sink: str
    ttl_ms: int
    ordering: str


class IngestRoute:
    """What every event of one type for one tenant gets (or, with sinks that filter by
    fields, every such event their filters agree on): how long it is remembered as seen
    (``event_ttl_ms``), its jobs, and the sinks whose filters keep it (``filtered``: the
    event log records them); encoded once, reused by every such event."""

    __slots__ = ("event_ttl_ms", "filtered", "jobs", "nargs", "resp")

    def __init__(
        self, event_ttl_ms: int, jobs: Sequence[IngestJob], filtered: Sequence[str] = ()
    ) -> None:
        self.event_ttl_ms = event_ttl_ms
        self.jobs = tuple(jobs)
        self.filtered = tuple(filtered)
        values: list[Value] = [event_ttl_ms, len(self.jobs)]
        for job in self.jobs:
            values += [job.sink, job.ttl_ms, job.ordering]
        values += [len(self.filtered), *self.filtered]
        self.nargs = len(values)
        self.resp = b"".join(bulk(v) for v in values)


class IngestItem(NamedTuple):
    """One event for ``ingest.lua``. The stored event (:mod:`relay.store.stored_event`) is
    one argument, given as its three parts — header, type, body — so that a large body
    is copied once, into the batch, not first into a joined string."""

    tenant: str
    event_id: str
    header: bytes
    event_type: bytes
    body: bytes
    chat: str  # the event's chat (for an ordered sink, and the event log); "" for none
    route: IngestRoute
    webhook: bool  # came by webhook: the batch records the tenant's last webhook


class IngestBatch:
    """``ingest.lua``'s arguments for a batch of :class:`IngestItem` (its header names
    them): prefix, queue and job prefix; the event log's byte cap (0: no log) and
    retention; the tenants that sent webhooks; the events."""

    def __init__(
        self, prefix: str, queue: str, job_prefix: str, log_cap: int = 0, log_keep_ms: int = 0
    ) -> None:
        values = (prefix, queue, job_prefix, log_cap, log_keep_ms)
        self._head = b"".join(bulk(v) for v in values)
        self._tenants: dict[str, bytes] = {}

    def _tenant(self, slug: str) -> bytes:
        found = self._tenants.get(slug)
        if found is None:
            found = bulk(slug)
            if len(self._tenants) < 4096:
                self._tenants[slug] = found
        return found

    def __call__(self, items: Sequence[IngestItem]) -> Packed:
        webhook = sorted({item.tenant for item in items if item.webhook})
        parts = [self._head, bulk(len(webhook)), *(bulk(t) for t in webhook), bulk(len(items))]
        nargs = 7 + len(webhook) + 4 * len(items)
        tenants = self._tenants
        for tenant, event_id, head, etype, body, chat, route, _ in items:
            eid, chat_b = event_id.encode(), chat.encode()
            parts.append(
                b"%s$%d\r\n%s\r\n$%d\r\n%s%s%s\r\n$%d\r\n%s\r\n%s"
                % (
                    tenants.get(tenant) or self._tenant(tenant),
                    len(eid),
                    eid,
                    len(head) + len(etype) + len(body),
                    head,
                    etype,
                    body,
                    len(chat_b),
                    chat_b,
                    route.resp,
                )
            )
            nargs += route.nargs
        return Packed(nargs, parts)


# -- finish_batch.lua's batch -----------------------------------------------------------


class FinishItem(NamedTuple):
    """One delivery's finish for ``finish_batch.lua`` (``lib/finish.lua``'s header says
    what each field does)."""

    job_id: str
    tenant: str
    sink: str
    event_id: str
    chat: str  # an ordered delivery's chat, else ""
    token: str  # the run's fencing token
    outcome: str  # ok, retry, dead or drop
    delay_ms: int
    status: int | None  # the attempt's HTTP status, if it got one
    error: str
    effect: str  # on the sink's breaker: success, failure or none
    gone_url: str
    dead_class: str  # dead: the dead letter's class
    hold: bool  # dead, ordered: the dead letter holds its chat
    fields: Sequence[str]  # dead: the dead letter's fields (name, value, …)
    cap: int = 0  # the sink's concurrency: the slots its waiting deliveries may fill
    chain: str = ""  # the sink's claim limits (JSON): take the job the finish queues
    attempt: str = ""  # the attempt, for the event log (JSON, with "ms"); "" if none
    handoff: str = ""  # the reserve started on this run's slot (its job id), if any
    handoff_token: str = ""  # that reserve's fencing token
    reserve: bool = False  # claim the sink's next waiting delivery ahead (with chain)


class FinishBatch:
    """``finish_batch.lua``'s arguments for a batch of :class:`FinishItem`: prefix,
    queue, the breaker's rule (JSON), cooldown and record lifetime, the in-flight lease,
    a tag unique to the batch (``tag_prefix`` and a count), the in-progress hold and the
    keeping margin, whether the event log keeps copies; the finishes."""

    def __init__(
        self,
        prefix: str,
        queue: str,
        breaker_rule: str,
        cooldown_ms: int,
        breaker_ttl_ms: int,
        lease_ms: int,
        tag_prefix: str = "f",
        in_progress_ms: int = 10_000,
        margin_ms: int = 86_400_000,
    ) -> None:
        values = (prefix, queue, breaker_rule, cooldown_ms, breaker_ttl_ms, lease_ms)
        self._head = b"".join(bulk(v) for v in values)
        self._tail = b"".join(bulk(v) for v in (in_progress_ms, margin_ms))
        self._tag_prefix = tag_prefix
        self._batches = itertools.count(1)

    def __call__(self, items: Sequence[FinishItem], *, keep: bool = True) -> Packed:
        """``keep``: the event log keeps a copy of each event its last delivery lets go
        (off while Redis is short of memory)."""
        tag = bulk(f"{self._tag_prefix}.{next(self._batches)}")
        parts = [self._head, tag, self._tail, bulk(1 if keep else 0), bulk(len(items))]
        nargs = 11
        for f in items:
            values: list[Value] = [
                f.job_id,
                f.tenant,
                f.sink,
                f.event_id,
                f.chat,
                f.token,
                f.outcome,
                f.delay_ms,
                "" if f.status is None else f.status,
                f.error,
                f.effect,
                f.gone_url,
                f.dead_class,
                "hold" if f.hold else "skip",
                f.cap,
                f.chain,
                f.attempt,
                f.handoff,
                f.handoff_token,
                "1" if f.reserve else "",
                len(f.fields),
                *f.fields,
            ]
            parts.append(b"".join(bulk(v) for v in values))
            nargs += len(values)
        return Packed(nargs, parts)


# -- replies ----------------------------------------------------------------------------

# An error reply's first word, and the exception redis-py raises for it.
_ERRORS: dict[str, type[redis.exceptions.RedisError]] = {
    "NOSCRIPT": redis.exceptions.NoScriptError,
    "READONLY": redis.exceptions.ReadOnlyError,
    "LOADING": redis.exceptions.BusyLoadingError,
    "OOM": redis.exceptions.OutOfMemoryError,
    "NOAUTH": redis.exceptions.AuthenticationError,
    "WRONGPASS": redis.exceptions.AuthenticationError,
    "NOPERM": redis.exceptions.NoPermissionError,
    "EXECABORT": redis.exceptions.ExecAbortError,
}


def reply_error(message: str) -> redis.exceptions.RedisError:
    """An error reply as the exception redis-py would raise for it (its text without the
    code, as redis-py gives it); ``ResponseError`` for any other code (``ERR``,
    ``MISCONF``, …), with the whole text."""
    code, _, rest = message.partition(" ")
    found = _ERRORS.get(code)
    if found is not None:
        return found(rest)
    if code == "ERR" and rest == "max number of clients reached":
        return redis.exceptions.ConnectionError(rest)
    return redis.exceptions.ResponseError(message)


# -- the connection ---------------------------------------------------------------------


class Wire:
    """One connection to Redis, for one pipeline: written without waiting (the stream
    buffers), its replies read in the order the commands were written."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._parser = hiredis.Reader(
            protocolError=redis.exceptions.InvalidResponse,
            replyError=reply_error,
            notEnoughData=_MORE,
        )

    @property
    def usable(self) -> bool:
        """Still open: a server that closed the connection shows at once as the end of
        the stream, whether or not a read is waiting on it."""
        return not self._writer.is_closing() and not self._reader.at_eof()

    def write(self, parts: Sequence[bytes]) -> None:
        """Queue ``parts`` (whole commands) for sending; never blocks."""
        self._writer.writelines(parts)

    async def read(self) -> list[Any]:
        """The replies that have arrived (at least one), in order; an error reply is an
        exception object in the list, not raised. Raises ``ConnectionError`` once the
        server has closed the connection and ``InvalidResponse`` for what is not RESP."""
        replies: list[Any] = []
        while not replies:
            data = await self._reader.read(_READ_SIZE)
            if not data:
                raise redis.exceptions.ConnectionError("Redis closed the connection")
            self._parser.feed(data)
            while (reply := self._parser.gets()) is not _MORE:
                replies.append(reply)
        return replies

    def abort(self) -> None:
        """Drop the connection now, with whatever it still owes or holds unsent (it is
        out of step, or its server is gone)."""
        self._writer.transport.abort()

    async def close(self) -> None:
        """Close the connection (nothing is owed on it); dropped if it does not close
        cleanly within a second (a TLS peer that does not answer the close, say)."""
        self._writer.close()
        try:
            async with asyncio.timeout(_CLOSE_WAIT):
                await self._writer.wait_closed()
        except Exception:
            self.abort()


async def connect(client: Redis) -> Wire:
    """A new :class:`Wire` to the server ``client`` is set up for (for a Sentinel client,
    the primary the sentinels name now), set up as its settings say. Raises ``OSError``,
    ``TimeoutError`` or a redis-py error when it cannot be reached or refuses the set-up."""
    pool = client.connection_pool
    # redis-py's reading of the client's settings (URL, TLS options, credentials…): a
    # connection object built from the pool's settings, never connected.
    settings: AbstractConnection = pool.connection_class(**pool.connection_kwargs)
    if isinstance(settings, UnixDomainSocketConnection):
        async with asyncio.timeout(settings.socket_connect_timeout):
            reader, writer = await asyncio.open_unix_connection(settings.path)
    elif isinstance(settings, Connection):
        if isinstance(settings, SentinelManagedConnection):
            # A client of a Sentinel deployment (or a pool made from one's settings):
            # the primary is whichever the sentinels name now.
            primary = settings.connection_pool.get_master_address()
            host, port = await primary
        else:
            host, port = settings.host, settings.port
        tls = settings.ssl_context.get() if isinstance(settings, SSLConnection) else None
        async with asyncio.timeout(settings.socket_connect_timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=tls)
    else:
        raise redis.exceptions.ConnectionError(f"no wire for {type(settings).__name__}")
    wire = Wire(reader, writer)
    try:
        await _set_up(wire, settings)
    except BaseException:
        wire.abort()
        raise
    return wire


async def _set_up(wire: Wire, settings: AbstractConnection) -> None:
    """``AUTH``, ``CLIENT SETNAME`` and ``SELECT`` as ``settings`` need, in one write."""
    commands: list[bytes] = []
    provider = settings.credential_provider
    if provider is None and (settings.username or settings.password):
        provider = UsernamePasswordCredentialProvider(settings.username, settings.password)
    if provider is not None:
        commands.append(command(b"AUTH", *await provider.get_credentials_async()))
    if settings.client_name:
        commands.append(command(b"CLIENT", b"SETNAME", settings.client_name))
    if int(settings.db):
        commands.append(command(b"SELECT", int(settings.db)))
    if not commands:
        return
    wire.write(commands)
    replies: list[Any] = []
    while len(replies) < len(commands):
        replies += await wire.read()
    for reply in replies:
        if isinstance(reply, BaseException):
            raise reply
    if len(replies) > len(commands):
        raise redis.exceptions.InvalidResponse("a reply nothing was sent for")
