"""Group-committed, pipelined calls of one Lua script on one connection of its own.

The ingest hot path runs one script for many concurrent callers. Each caller hands
in an item; items are packed into batches, one ``EVALSHA`` each, and the batches are
pipelined on a single connection: written as soon as they are formed and their
replies read in order by one reader task.

A batch goes out when ``flush_at`` items are waiting — in the middle of an event-loop
turn, so that Redis runs one batch while the relay is still verifying and parsing the
requests that make up the next — and otherwise at the start of the next turn, with
whatever arrived. Without the mid-turn send, a burst of requests would reach Redis
as one large batch only after all of them were parsed, and the relay would sit idle
while Redis ran it. With ``appendfsync always``, batches that reach Redis in the same
turn of its event loop also share one fsync.

Callers hand in records, and ``encode(items)`` turns a batch of them into the script's
arguments: an encoder of :mod:`relay.store.wire`, the module that owns every RESP byte
the relay writes and the connection they go on (opened to the server the client is set
up for; for a Sentinel client, to the primary the sentinels name at the time). Batches
are written to that connection without waiting, so that one can go out in the middle
of a turn of the loop, and replies are read as many per read as have arrived. One timer
watches the oldest batch in flight, instead of a timeout set and cancelled for each.

Batches call the script by its digest (``EVALSHA``: ``EVAL`` would make Redis hash the whole script
for every batch, a cost that shows at this rate); each new connection first sends
``SCRIPT LOAD``, pipelined ahead of its first batch. Should the script still be
missing (Redis restarted, or an operator ran ``SCRIPT FLUSH``), a batch that gets
``NOSCRIPT`` is sent once more behind a new ``SCRIPT LOAD``, in the same call; only a
second ``NOSCRIPT`` fails it as "Redis unavailable".

While Redis is down, its failures are logged once per kind every 10 s (with a count of
those not logged), not once per batch.

A connection is opened when work arrives and closed once no batch has been waiting or
in flight for ``linger`` seconds. It is the pipeline's own, not one of the client's
pool: every byte Redis sends on it is a reply to a batch in flight.

With ``replicas`` (``[redis] min_replica_acks``), each batch is followed on the
connection by ``WAIT replicas timeout``: its callers get their answers only once that
many replicas have acknowledged everything the connection wrote, and otherwise fail as
"Redis unavailable" (their events may be stored: a retry finds them as duplicates, once
replicated). A ``READONLY`` answer means the primary this connection reached is a
replica now (a failover): the connection is dropped, so that the next one finds the new
primary.

The module is a little over 500 lines and stays whole: it is one role, one connection's
pipeline, whose sending, reading, timing out and resending share the batches in flight.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import redis.exceptions
from redis.asyncio import Redis

from relay.errors import RedisUnavailableError
from relay.logs import Throttle
from relay.store import wire
from relay.store.wire import Packed, Wire

log = logging.getLogger(__name__)

T = TypeVar("T")

# Transient Redis faults: the caller answers "try again later" (503), never "no".
REDIS_TRANSIENT = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ResponseError,  # e.g. OOM or MISCONF: Redis refuses writes for now
    OSError,
)


@dataclass(slots=True)
class _Batch:
    futures: list[asyncio.Future[Any]]  # none for a SCRIPT LOAD
    deadline: float  # loop time by which Redis must have answered
    sent: float = field(default_factory=time.perf_counter)
    load: bool = False
    wait: bool = False  # a WAIT follows: the script's reply is held until its answer
    reply: Any = None  # the script's reply, while the WAIT's is awaited
    written: Sequence[bytes] | None = None  # the EVALSHA (and WAIT) as written, for one resend
    resent: bool = False


@dataclass(frozen=True, slots=True)
class PipeState:
    """What a pipeline is doing at one moment (:meth:`ScriptPipeline.state`)."""

    waiting: int  # calls not sent yet
    in_flight: int  # batches written whose replies are owed (a SCRIPT LOAD is one)
    session: bool  # a session runs: getting a connection, or holding one
    connected: bool
    reading: bool  # a reader task waits for the replies owed
    asleep: bool  # the session waits to be woken: by work, a reply or the linger's end
    watchdog_at: float | None  # loop time the timer over the oldest batch fires


class ReplicasBehindError(RedisUnavailableError):
    """Fewer replicas than ``[redis] min_replica_acks`` acknowledged a batch in time."""


class ScriptPipeline(Generic[T]):
    """Runs one script for many callers: ``await call(item)`` → this item's reply element.

    ``client`` says which Redis (its settings; the pipeline opens its own connection),
    and ``encode(items)`` gives the script's arguments for a batch (an encoder of
    :mod:`relay.store.wire`); the script must return one reply element per item, in
    order (an element may itself be an array).
    """

    def __init__(
        self,
        client: Redis,
        source: str,
        encode: Callable[[list[T]], Packed],
        *,
        timeout: float,
        flush_at: int = 16,
        max_batch: int = 256,
        max_inflight: int = 16,
        observe: Callable[[float, int], None] | None = None,
        linger: float = 1.0,
        replicas: int = 0,
        replica_timeout: float = 0.5,
        unacked: Callable[[int], None] | None = None,
        what: str = "ingest",
    ) -> None:
        self._client = client
        self._script = wire.Script(source)
        self._loading = False
        self._encode = encode
        self.timeout = timeout
        self._flush_at = flush_at
        self._max_batch = max_batch
        # Redis holds a connection's later commands while its WAIT blocks, so batches
        # queued behind one would each wait a replica round of their own: with replicas,
        # one batch is in flight and what arrives meanwhile goes out together after it.
        self._max_inflight = 1 if replicas else max_inflight
        self._observe = observe
        self.linger = linger
        self._replicas = replicas
        self._wait = wire.wait(replicas, max(1, int(replica_timeout * 1000)))
        self._unacked = unacked
        self.what = what  # what a call is, in log lines: "ingest", "delivery finish"
        # Waiting to be sent, in three parallel lists: the item, its caller's future and
        # when it arrived (loop time). ``timeout`` runs from arrival: getting a
        # connection and waiting for room in flight count against it.
        self._items: list[T] = []
        self._futures: list[asyncio.Future[Any]] = []
        self._arrived: list[float] = []
        self._inflight: collections.deque[_Batch] = collections.deque()
        self._flush_scheduled = False
        self._conn: Wire | None = None  # held by the session, usable
        self._session: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        # One timer for every batch in flight: due when the oldest is (see _watch).
        self._watchdog: asyncio.TimerHandle | None = None
        self._timed_out = False
        self._wake: asyncio.Future[None] | None = None
        self._release_now = False
        # While Redis is down every batch fails: one line per kind of failure every
        # 10 s, with how many were held back, rather than one per batch.
        self._throttle = Throttle(10.0)

    @property
    def connected(self) -> bool:
        """Whether the pipeline holds a connection now (while working, and for the
        linger after)."""
        return self._conn is not None

    @property
    def script(self) -> wire.Script:
        """The script as this pipeline sends it: its digest and its ``SCRIPT LOAD``."""
        return self._script

    def state(self) -> PipeState:
        """A snapshot of what the pipeline is doing, for diagnostics and tests."""
        reader, wake, watchdog = self._reader, self._wake, self._watchdog
        return PipeState(
            waiting=len(self._items),
            in_flight=len(self._inflight),
            session=self._session is not None,
            connected=self._conn is not None,
            reading=reader is not None and not reader.done(),
            asleep=wake is not None and not wake.done(),
            watchdog_at=None if watchdog is None else watchdog.when(),
        )

    async def call(self, item: T) -> Any:
        """Run the script for ``item`` (batched with concurrent calls); its reply element.

        Raises :class:`RedisUnavailableError` when Redis could not run it: unreachable,
        refusing writes, or not answering within ``timeout``. Then the caller must not
        assume either outcome.
        """
        return await self.submit(item)

    def submit(self, item: T) -> asyncio.Future[Any]:
        """:meth:`call` as a future to await (one coroutine frame fewer on a hot path)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._items.append(item)
        self._futures.append(fut)
        self._arrived.append(loop.time())
        if len(self._items) >= self._flush_at and self._conn is not None:
            self._send()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return fut

    async def drain(self) -> None:
        """Wait until every call already made has been answered (or failed)."""
        while True:
            self._drop_cancelled()
            owed = [*self._futures, *(f for b in self._inflight for f in b.futures)]
            owed = [f for f in owed if not f.done()]  # a cancelled caller is owed nothing
            if not owed:
                break
            if self._session is None and not self._flush_scheduled:
                self._flush()
            await asyncio.wait(owed)
        if self._session is not None:
            # Give the connection back now rather than after the linger (once any
            # batch still in flight for a cancelled caller has been answered).
            self._release_now = True
            self._poke()
            await asyncio.wait({self._session})

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._items:
            return
        if self._conn is not None:
            self._send()
        elif self._session is None:
            self._session = asyncio.get_running_loop().create_task(self._run_session())

    def _send(self) -> None:
        """Write batches of waiting items, as many as may be in flight. Never blocks."""
        conn = self._conn
        assert conn is not None
        while self._items and len(self._inflight) < self._max_inflight:
            if not conn.usable:
                self._poke()  # the connection is gone: the session ends, the next reconnects
                return
            n = self._max_batch
            items, futures, deadline = self._items[:n], self._futures[:n], self._arrived[0]
            del self._items[:n], self._futures[:n], self._arrived[:n]
            deadline += self.timeout
            try:
                written = self._script.call(self._encode(items))
            except BaseException as e:
                _fail(futures, e)
                raise
            if self._replicas:
                written.append(self._wait)
            conn.write(written)
            self._sent(conn, _Batch(futures, deadline, wait=self._replicas > 0, written=written))

    def _send_load(self, conn: Wire) -> None:
        if not conn.usable or self._loading:
            return
        conn.write([self._script.load])
        self._loading = True
        self._sent(conn, _Batch([], asyncio.get_running_loop().time() + self.timeout, load=True))

    def _sent(self, conn: Wire, batch: _Batch) -> None:
        self._inflight.append(batch)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_loop(conn))
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_at(batch.deadline, self._watch)

    def _watch(self) -> None:
        """The oldest batch in flight must be answered by its deadline, or the reader
        stops (as a timeout). One timer serves every batch: when it fires it is either
        overdue or re-armed for whichever batch is now the oldest, rather than a timer
        being set and cancelled for each batch."""
        self._watchdog = None
        if not self._inflight or self._reader is None:
            return
        loop = asyncio.get_running_loop()
        deadline = self._inflight[0].deadline
        if loop.time() < deadline:
            self._watchdog = loop.call_at(deadline, self._watch)
        else:
            self._timed_out = True
            self._reader.cancel()

    def _disarm(self) -> None:
        """The reader has ended: no timer may be left to act on the next one (a timer
        firing before a new reader's first step would cancel it before it could
        answer anyone)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _poke(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _run_session(self) -> None:
        """Hold a connection while there is work; close it when there is none."""
        loop = asyncio.get_running_loop()
        try:
            try:
                oldest = self._arrived[0] if self._arrived else loop.time()
                async with asyncio.timeout_at(oldest + self.timeout):
                    conn = await wire.connect(self._client)
            except Exception as e:
                # Transient or not (a server that is not Redis, say): whoever waits gets
                # "unavailable" now; the next call tries again.
                _warn(
                    self._throttle,
                    "connect",
                    "Redis unavailable for %d %s(s): %r",
                    len(self._items),
                    self.what,
                    e,
                )
                self._fail_waiting(e)
                return
            try:
                self._conn = conn
                self._loading = False
                self._send_load(conn)
                while True:
                    if self._items:
                        self._send()
                    if not conn.usable:
                        # Lost (Redis restarted, say, while this was idle): what is still
                        # waiting goes out on a new connection.
                        break
                    idle = not self._items and not self._inflight
                    if idle and self._release_now:
                        break
                    self._wake = loop.create_future()
                    try:
                        # Idle, keep the connection a little longer: the next burst
                        # should not wait for a connection to be set up.
                        async with asyncio.timeout(self.linger if idle else None):
                            await self._wake
                    except TimeoutError:
                        if not self._items and not self._inflight:
                            break
                    finally:
                        self._wake = None
            finally:
                self._conn = None
                self._release_now = False
                if self._reader is not None:
                    self._reader.cancel()
                    await asyncio.wait({self._reader})
                await conn.close()
        except asyncio.CancelledError as e:
            # The loop is being torn down: nobody may be left waiting, nothing restarted.
            self._fail_waiting(e)
            raise
        finally:
            self._session = None
            if self._items and not self._flush_scheduled:
                self._flush_scheduled = True
                loop.call_soon(self._flush)

    async def _read_loop(self, conn: Wire) -> None:
        """Read replies in the order batches were sent; each resolves its batch.

        Replies come as many as have arrived per read: the connection is the
        pipeline's alone, and every byte Redis sends on it is a reply to a batch in
        flight.
        """
        try:
            while self._inflight:
                for reply in await conn.read():
                    if not self._inflight:
                        raise redis.exceptions.InvalidResponse("a reply nothing was sent for")
                    head = self._inflight[0]
                    if head.wait and head.reply is None:
                        head.reply = _HELD if reply is None else reply  # its WAIT is next
                        continue
                    self._answer(conn, self._inflight.popleft(), reply)
                    if isinstance(reply, redis.exceptions.ReadOnlyError) or isinstance(
                        head.reply, redis.exceptions.ReadOnlyError
                    ):
                        # This "primary" is a replica now: find the new one.
                        raise redis.exceptions.ConnectionError("the primary is now a replica")
                if self._items and self._conn is conn:
                    self._send()  # room in flight again
            self._reader = None
            self._disarm()
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError) and self._timed_out:
                # Stopped by the watchdog: the oldest batch is overdue.
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
                e = TimeoutError(f"Redis did not answer a {self.what} batch in time")
            self._timed_out = False
            # Timed out, connection lost or cancelled: the replies still owed on this
            # connection can no longer be matched to their batches. Fail them all (their
            # events may or may not be stored; the senders retry) and start afresh.
            conn.abort()
            self._reader = None
            self._disarm()
            if not isinstance(e, asyncio.CancelledError):
                n = sum(len(b.futures) for b in self._inflight)
                _warn(
                    self._throttle,
                    "lost",
                    "%d %s(s) failed: Redis unavailable: %r",
                    n,
                    self.what,
                    e,
                )
            self._fail_inflight(e)
            if isinstance(e, TimeoutError):
                self._fail_waiting(e)  # Redis is too slow: do not pile more on it
            # A reply nothing was sent for, or one hiredis cannot read: the connection
            # is out of step, handled as lost (nobody awaits this task to see more).
            handled = (*REDIS_TRANSIENT, redis.exceptions.InvalidResponse, TimeoutError)
            if not isinstance(e, (*handled, asyncio.CancelledError)):
                raise
        finally:
            self._poke()

    def _answer(self, conn: Wire, batch: _Batch, reply: Any) -> None:
        """Resolve ``batch``'s callers from its reply (a list, or an error reply); for a
        batch followed by a WAIT, ``reply`` is the WAIT's and the script's was held."""
        if batch.wait:
            reply = self._acked(batch, reply)
        if batch.load:
            self._loading = False
            if isinstance(reply, BaseException):
                log.warning("could not load the %s script: %s", self.what, reply)
            return
        if isinstance(reply, redis.exceptions.NoScriptError):
            # Redis lost its script cache (a restart, SCRIPT FLUSH): load it and send the
            # batch once more, in the same call; the batches after it find it loaded.
            self._send_load(conn)
            if self._resend(conn, batch):
                return
        if self._observe is not None:
            self._observe(time.perf_counter() - batch.sent, len(batch.futures))
        if isinstance(reply, BaseException):
            _warn(self._throttle, "refused", f"Redis refused a {self.what} batch: %s", reply)
            _fail(batch.futures, reply)
        elif not isinstance(reply, list) or len(reply) != len(batch.futures):
            _fail(batch.futures, RuntimeError("the reply does not match the batch"))
        else:
            for fut, value in zip(batch.futures, reply, strict=True):
                if not fut.done():
                    fut.set_result(value)

    def _acked(self, batch: _Batch, acks: Any) -> Any:
        """The batch's reply if enough replicas acknowledged it, else the failure."""
        reply = None if batch.reply is _HELD else batch.reply
        if isinstance(reply, BaseException) or isinstance(acks, BaseException):
            return reply if isinstance(reply, BaseException) else acks
        if isinstance(acks, int) and acks >= self._replicas:
            return reply
        if self._unacked is not None:
            self._unacked(len(batch.futures))
        return ReplicasBehindError(
            f"{acks} of {self._replicas} replica(s) acknowledged the batch in time"
        )

    def _resend(self, conn: Wire, batch: _Batch) -> bool:
        """Write ``batch`` again (once) on ``conn``, behind a ``SCRIPT LOAD``."""
        if batch.resent or batch.written is None or not conn.usable:
            return False
        if all(f.done() for f in batch.futures):
            return True  # nobody waits for it any more
        conn.write(batch.written)
        again = _Batch(
            batch.futures, asyncio.get_running_loop().time() + self.timeout, wait=batch.wait
        )
        again.written, again.resent = batch.written, True
        self._sent(conn, again)
        return True

    def _fail_inflight(self, e: BaseException) -> None:
        while self._inflight:
            _fail(self._inflight.popleft().futures, e)

    def _drop_cancelled(self) -> None:
        """Forget waiting items whose callers went away: nobody would read the answer,
        and a drained pipeline must not open a connection for them later."""
        if any(f.done() for f in self._futures):
            keep = [i for i, f in enumerate(self._futures) if not f.done()]
            self._items = [self._items[i] for i in keep]
            self._futures = [self._futures[i] for i in keep]
            self._arrived = [self._arrived[i] for i in keep]

    def _fail_waiting(self, e: BaseException) -> None:
        futures = self._futures
        self._items, self._futures, self._arrived = [], [], []
        _fail(futures, e)


def _warn(throttle: Throttle, kind: str, msg: str, *args: object) -> None:
    """Log ``msg`` unless ``throttle`` holds lines of this ``kind`` back for now."""
    suppressed = throttle.allow(kind)
    if suppressed is None:
        return
    if suppressed:
        msg += " (and %d more like it not logged)"
        args = (*args, suppressed)
    log.warning(msg, *args)


_HELD = object()  # a script's reply of nil, held while its WAIT is answered


def _fail(futures: list[asyncio.Future[Any]], e: BaseException) -> None:
    if isinstance(e, RedisUnavailableError):
        err: BaseException = e
    elif isinstance(e, (*REDIS_TRANSIENT, TimeoutError)):
        err = RedisUnavailableError(f"Redis unavailable: {type(e).__name__}")
    elif isinstance(e, asyncio.CancelledError):
        err = RedisUnavailableError("ingest was cancelled")
    else:
        err = RedisUnavailableError(f"ingest failed: {type(e).__name__}")
    for fut in futures:
        if not fut.done():
            fut.set_exception(err)
