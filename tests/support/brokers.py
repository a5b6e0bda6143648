"""Real message brokers for the tests: a NATS server with JetStream and a RabbitMQ node,
each a child process on free loopback ports with its data in a directory of its own.

NatsServer
    Debian's ``nats-server`` (2.9.10 on bookworm) with ``-js -sd DIR/jetstream`` and its
    log in ``DIR/nats.log``. Ready when nats-py connects and JetStream answers
    ``account_info()``: 0.02 s on the 2-core test machine. ``kill()`` is SIGKILL,
    ``stop()`` SIGTERM (a clean shutdown), ``restart()`` keeps the port and the store.

RabbitServer
    Debian's ``rabbitmq-server`` (3.10.8), run through its real start script,
    ``/usr/lib/rabbitmq/bin/rabbitmq-server`` (``/usr/sbin/rabbitmq-server`` is a
    wrapper that, as root, switches to the ``rabbitmq`` user and Debian's own
    directories). The script stays in the foreground as the head of a process group of
    its own and waits for the VM (``beam.smp``), which it starts in the background;
    SIGTERM to the script stops the node cleanly. No plugins (``enabled_plugins`` is
    ``[].``); every file — Mnesia, logs, config, the Erlang cookie through ``HOME`` —
    under ``DIR``; AMQP and the Erlang distribution on free ports of 127.0.0.1; a
    unique node name ``relaytest-<hex>@localhost``.

    Each node has an ``epmd`` of its own on a free port (``ERL_EPMD_PORT``), started
    before the node and stopped with it, so nothing is shared with a system RabbitMQ
    or another Erlang node on 4369 — the start works whether or not an epmd already
    runs there and whatever is registered in it — and no epmd is left behind (the VM
    would otherwise start ``epmd -daemon`` on 4369, which outlives it).

    ``kill()`` SIGKILLs the process group, the node's helpers that run in sessions of
    their own (``erl_child_setup``, ``inet_gethost``, the disk monitor's shell) and
    epmd, then waits until every thread of them has exited: after a SIGKILL,
    beam.smp's main thread can show as a zombie while its other threads still hold
    the listening sockets, so "zombie" is not "gone". ``restart()`` keeps the ports,
    the node name and the Mnesia directory: durable queues and their persistent
    messages come back.

    Timings on the 2-core test machine (ready = aio-pika connects): a start on a new
    directory 4.9-7.8 s, typically 6-6.5 s; a restart on existing data about the same
    (5-7 s); a graceful ``stop()`` 1.1 s; ``kill()`` 0.02 s.

Both are started by tests/conftest.py's fixtures: ``nats_server`` / ``rabbit_server``
(one per session, started when a test first asks for it) and ``make_nats_server`` /
``make_rabbit_server`` (private servers a test may kill and restart). Every server
still running when the interpreter exits is killed then, even if a fixture's
finalizer never ran.

What follows was observed against these servers; tests/brokers/test_servers.py checks
each item but those marked "seen" (watched in a run, not held by a test).

Observed with nats-py 2.16.0 against nats-server 2.9.10
    - Connection refused at connect: ``nats.errors.NoServersError`` (str "nats: no
      servers available for connection"), raised once every server of the pool has
      failed ``max_reconnect_attempts`` + 1 times; each ``ConnectionRefusedError``
      goes only to ``error_cb`` (logged at ERROR with a traceback when no ``error_cb``
      is given). ``allow_reconnect=False`` does not make it fail sooner: the pool is
      walked all the same. ``max_reconnect_attempts=0`` does not mean "no retries":
      at connect it retries forever (only a value > 0 is checked; -1 does the same).
      With the defaults (60 attempts, ``reconnect_time_wait`` 2 s) a refused connect
      takes about two minutes to raise (nats-py's defaults, not timed here).
    - Authentication failure at connect: a plain ``nats.errors.Error`` whose str is
      "nats: 'Authorization Violation'" — not ``nats.errors.AuthorizationError``, which
      nats-py only uses for an error after the connection is up — raised as it is with
      ``allow_reconnect=False`` (and given to ``error_cb`` first, sometimes followed
      by a ``ConnectionResetError`` as the server drops the socket); with reconnects
      allowed the same ``Error`` goes to ``error_cb`` and connect raises
      ``NoServersError``.
    - When ``nats.connect()`` raises after the socket was opened (the auth failure
      with ``allow_reconnect=False``), the socket is left open: a ResourceWarning
      once the event loop is gone (an error under pytest's ``filterwarnings``; seen).
      ``nc = nats.aio.client.Client()`` then ``await nc.connect(...)`` and
      ``await nc.close()`` in a ``finally`` closes it.
    - Publish to a subject no stream captures: ``nats.js.errors.NoStreamResponseError``
      (the server's "no responders" status; a ``nats.js.errors.Error`` and
      ``nats.errors.Error``, not a ``NoRespondersError``), at once, not after the
      timeout.
    - Publish whose PubAck does not come (a plain subscriber on the subject, or the
      server killed while the client reconnects): ``nats.errors.TimeoutError`` after
      ``timeout``; it subclasses the built-in ``TimeoutError`` (which is
      ``asyncio.TimeoutError``). Whether a publish that timed out while the server
      was down is stored is not known (one made just after the kill was lost, seen):
      publish again with the same ``Nats-Msg-Id``. The client reconnects by itself once the
      server is back, on the same ``nc`` and ``js``.
    - Publish on a closed connection (``allow_reconnect=False`` and the server gone):
      ``nats.errors.ConnectionClosedError``.
    - Payload over the server's ``max_payload`` (1 MiB by default; ``nc.max_payload``
      from the server's INFO): ``nats.errors.MaxPayloadError``, raised by the client
      before anything is sent; the connection stays usable.
    - ``Nats-Msg-Id``: a second publish with the same id inside the stream's
      ``duplicate_window`` (2 min by default) answers ``PubAck(duplicate=True)`` with
      the first message's ``seq``; a first publish has ``duplicate=None`` (not False).
    - A publish with ``stream=`` naming another stream than the one capturing the
      subject: ``nats.js.errors.BadRequestError`` (an ``APIError``: ``code`` 400,
      ``err_code`` 10060, ``description`` "expected stream does not match").
    - A stream with file storage (the server's default) keeps its messages across a
      SIGKILL right after the PubAck and a restart on the same store (seen for 10
      rounds of 100 messages, none lost).

Observed with aio-pika 10.2.1 (aiormq 7.2.4, pamqp 4.0.1) against RabbitMQ 3.10.8. The
exception classes are aiormq's (``aiormq.exceptions``), re-exported by
``aio_pika.exceptions`` under the same names.
    - Publisher confirms (``channel(publisher_confirms=True, on_return_raises=True)``):
      ``await exchange.publish(...)`` returns ``pamqp.commands.Basic.Ack``. A
      persistent message confirmed into a durable queue survives a SIGKILL of the
      broker right after the confirm (seen for 5 rounds of 50, none lost).
    - An unroutable ``mandatory=True`` publish (aio-pika's default):
      ``PublishError``, a subclass of ``DeliveryError``; ``e.frame`` is the
      ``pamqp.commands.Basic.Return`` (``reply_code`` 312, ``reply_text``
      "NO_ROUTE", ``exchange``, ``routing_key``), ``e.message`` the returned
      ``aiormq.abc.DeliveredMessage`` (``.body``; ``.delivery`` is the same Return),
      ``e.args == (reply_text, routing_key)``. The channel stays open and usable.
      (A broker's Nack would be a bare ``DeliveryError`` with ``message`` None and
      ``frame`` the ``Basic.Nack``: aiormq's source, not provoked here.)
    - The same publish on a channel without ``on_return_raises``: no exception — the
      publish *returns* the ``DeliveredMessage`` (``.delivery`` a Basic.Return) instead
      of a Basic.Ack; with ``mandatory=False`` the broker drops the message and
      answers Basic.Ack. A publisher must check the result's type or raise on returns.
    - A publish to an exchange that does not exist: the broker closes the channel, and
      the publish raises ``ChannelNotFoundEntity`` (a ``ChannelClosed``,
      ``AMQPChannelError``) whose ``args`` are ``("NOT_FOUND - no exchange 'NAME' in
      vhost '/'",)`` — the broker's reply text; there is no ``reply_code`` attribute,
      the class stands for 404. The connection stays open. A plain channel is then
      closed for good (``channel.is_closed``; a publish on it raises
      ``ChannelInvalidStateError``, a ``RuntimeError``) and a new
      ``connection.channel()`` works; a robust connection's channel is reopened by
      aio-pika in the background, here within 0.1 s (a publish before that raises
      ``ChannelInvalidStateError``).
    - Connection refused: ``AMQPConnectionError`` (also a built-in
      ``ConnectionError``) with ``args == (111, "Connect call failed ('127.0.0.1',
      PORT)")``, at once; aiormq also logs "Error when creating transport".
    - Wrong password (or unknown user): ``ProbableAuthenticationError`` (an
      ``AMQPConnectionError``) with ``args[0]`` "ACCESS_REFUSED - Login was refused
      using authentication mechanism PLAIN. For details see the broker logfile."
    - The broker killed under a plain connection (``aio_pika.connect``): its close
      callbacks get ``AMQPConnectionError("Server connection reset:
      ConnectionResetError(104, 'Connection reset by peer')")`` and
      ``connection.connected`` is cleared, but ``connection.is_closed`` stays False
      (only the user's ``close()`` sets it). ``connection.channel()`` then raises a
      bare built-in ``RuntimeError('<Connection: "amqp://guest:******@…" at 0x…>
      closed')`` — not an ``AMQPError``, not a ``ConnectionError`` — and keeps doing so
      after the broker is back: such a connection never recovers, so a publisher must
      test ``connected.is_set()`` (or catch that RuntimeError) and connect again.
      Publishes in flight when it dies: one ``AMQPConnectionError`` (the reset), the
      others ``ChannelInvalidStateError`` (the channel is closed; seen).
    - A robust connection (``connect_robust``) reconnects by itself, every
      ``reconnect_interval`` (5 s by default: back 4.6 s after the broker was), and
      restores its channels. While the broker is away nothing waits: a publish raises
      ``AMQPConnectionError`` (the reset, if it races it) or
      ``ChannelInvalidStateError``, and ``connection.channel()`` the same bare
      ``RuntimeError`` as above (seen).
    - A connection open when the broker is killed logs the reset (aiormq's
      "Cancelling cause reader exited abnormally", with the ConnectionResetError; seen).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import nats
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from nats.aio.client import Client as NatsClient
from nats.js.api import RawStreamMsg, StreamInfo
from nats.js.errors import NotFoundError

from relay.store.embedded import free_port

NATS_START_TIMEOUT = 20.0
RABBIT_START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0

# Debian installs both servers in /usr/sbin, which is not on a user's PATH by default.
_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def find_binary(name: str, package: str, *more: str) -> str:
    """``name`` on PATH, in an sbin directory or at one of ``more``; a clear failure
    naming the Debian package when it is nowhere (never a skip)."""
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN))
    for candidate in (*more, found):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(
        f"{name} is needed by the broker tests: `make deps` installs it "
        f"(Debian: apt-get install {package})",
        pytrace=False,
    )


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return f"({path} was not written)"
    return "\n".join(text[-lines:]) or f"({path} is empty)"


# Servers started and not yet stopped: killed when the interpreter exits, whatever a
# test or fixture left behind.
_RUNNING: set[NatsServer | RabbitServer] = set()


@atexit.register
def _kill_all() -> None:
    for server in list(_RUNNING):
        with contextlib.suppress(Exception):
            server.kill()


async def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


@dataclass(frozen=True)
class StreamMessage:
    """A message read back from a JetStream stream."""

    subject: str
    seq: int
    headers: dict[str, str]  # {} when it has none
    data: bytes

    @classmethod
    def of(cls, raw: RawStreamMsg) -> StreamMessage:
        assert raw.subject is not None
        assert raw.seq is not None
        return cls(raw.subject, raw.seq, dict(raw.headers or {}), raw.data or b"")


class NatsServer:
    """A ``nats-server -js`` child process with its JetStream store in ``directory``."""

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        self.directory = directory.resolve()
        self.port = port or free_port()
        self.user = user
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None
        self.started_in = 0.0  # seconds the last start took

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.directory / "nats.log"

    def _argv(self, exe: str) -> list[str]:
        argv = [exe, "-js", "-a", "127.0.0.1", "-p", str(self.port)]
        argv += ["-sd", str(self.directory / "jetstream"), "-l", str(self.log)]
        if self.user is not None:
            argv += ["--user", self.user, "--pass", self.password or ""]
        return argv

    async def start(self, timeout: float = NATS_START_TIMEOUT) -> str:
        """Start the server; return its URL once a client connects and JetStream
        answers. Again after ``stop()`` or ``kill()``: same port, same store."""
        if self.process is not None:
            raise RuntimeError(f"nats-server on {self.url} is already running")
        exe = find_binary("nats-server", "nats-server")
        self.directory.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        with (self.directory / "nats.out").open("ab") as out:
            self.process = subprocess.Popen(
                self._argv(exe),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _RUNNING.add(self)
        deadline = began + timeout
        while not await self._answers():
            if self.process.poll() is not None:
                code = self.process.returncode
                self.kill()
                raise RuntimeError(f"nats-server exited ({code}) at start:\n{self._output()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"nats-server did not answer within {timeout:.0f}s:\n{self._output()}"
                )
            await asyncio.sleep(0.02)
        self.started_in = time.monotonic() - began
        return self.url

    def _output(self) -> str:
        return f"{_tail(self.directory / 'nats.out', 5)}\n{_tail(self.log)}"

    def options(self, **kwargs: Any) -> dict[str, Any]:
        """``nats.connect`` options for this server: its credentials, and a connect that
        fails after one retry (not after nats-py's default of two minutes)."""
        options: dict[str, Any] = {
            "connect_timeout": 2,
            "max_reconnect_attempts": 1,
            "reconnect_time_wait": 0.1,
        }
        if self.user is not None:
            options.update(user=self.user, password=self.password)
        return options | kwargs

    async def _answers(self) -> bool:
        async def quiet(_e: Exception) -> None:
            pass

        # Not nats.connect(): when it raises after the socket is open it leaves the
        # socket open; close() on the client closes it.
        nc = NatsClient()
        try:
            await nc.connect(
                self.url,
                **self.options(
                    allow_reconnect=False, error_cb=quiet, connect_timeout=1, reconnect_time_wait=0
                ),
            )
            await nc.jetstream(timeout=1).account_info()
        except Exception:
            return False
        finally:
            await nc.close()
        return True

    @contextlib.asynccontextmanager
    async def client(self, **kwargs: Any) -> AsyncIterator[NatsClient]:
        """A nats-py client connected to this server, closed at the end."""
        nc = await nats.connect(self.url, **self.options(**kwargs))
        try:
            yield nc
        finally:
            await nc.close()

    async def add_stream(self, name: str, subjects: Sequence[str], **config: Any) -> StreamInfo:
        """Create a stream (file storage unless ``storage=`` says otherwise: the
        server's default). ``config``: more ``StreamConfig`` fields."""
        async with self.client() as nc:
            return await nc.jetstream().add_stream(name=name, subjects=list(subjects), **config)

    async def messages(self, stream: str) -> list[StreamMessage]:
        """Every message in ``stream``, oldest first, read by sequence number with
        ``get_msg`` (the stream keeps them)."""
        async with self.client() as nc:
            js = nc.jetstream()
            state = (await js.stream_info(stream)).state
            if not state.messages:
                return []
            found: list[StreamMessage] = []
            for seq in range(state.first_seq, state.last_seq + 1):
                try:
                    raw = await js.get_msg(stream, seq)
                except NotFoundError:  # deleted: a gap in the sequence
                    continue
                found.append(StreamMessage.of(raw))
            return found

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM (nats-server shuts down cleanly) and wait; SIGKILL if it hangs."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            if not await _wait_exit(proc, timeout):
                self.kill()
                return
        self.process = None
        _RUNNING.discard(self)

    def kill(self) -> None:
        """SIGKILL, as a crash would, and wait for it."""
        proc, self.process = self.process, None
        _RUNNING.discard(self)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    async def restart(self, timeout: float = NATS_START_TIMEOUT) -> str:
        """Stop it if it runs, and start it again on the same port and store."""
        await self.stop()
        return await self.start(timeout)


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid …": comm may hold spaces and parentheses
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Some thread of the process has not exited yet. Not only the main thread's state:
    when SIGKILL ends beam.smp its main thread can be a zombie while other threads
    still exit, holding the process's files — its listening sockets among them."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False
    for task in tasks:
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] not in "ZX":
            return True
    return False


class RabbitServer:
    """A RabbitMQ node (Debian's ``rabbitmq-server``) with all its state in ``directory``,
    its own ``epmd`` on a free port; see the module's docstring."""

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        dist_port: int | None = None,
        epmd_port: int | None = None,
    ) -> None:
        self.directory = directory.resolve()
        self.port = port or free_port()
        self.dist_port = dist_port or free_port()
        self.epmd_port = epmd_port or free_port()
        self.nodename = f"relaytest-{secrets.token_hex(4)}@localhost"
        self.process: subprocess.Popen[bytes] | None = None
        self.epmd: subprocess.Popen[bytes] | None = None
        self.started_in = 0.0  # seconds the last start took

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def log(self) -> Path:
        return self.directory / "log" / f"{self.nodename}.log"

    def _write_files(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "enabled_plugins").write_text("[].\n")
        (self.directory / "rabbitmq-env.conf").write_text("")
        (self.directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users.guest = true\n"
        )

    def _env(self) -> dict[str, str]:
        # Nothing from the caller's RabbitMQ or Erlang settings, nor systemd's socket
        # (the start script would then exec the VM and notify systemd).
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_")) and k != "NOTIFY_SOCKET"
        }
        d = self.directory
        env.update(
            HOME=str(d),  # the Erlang cookie
            ERL_EPMD_PORT=str(self.epmd_port),
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(d / "mnesia"),
            RABBITMQ_LOG_BASE=str(d / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(d / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(d / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(d / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(d / "rabbitmq-env.conf"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    async def _start_epmd(self, deadline: float) -> None:
        if self.epmd is not None and self.epmd.poll() is None:
            return
        exe = find_binary("epmd", "erlang-base")
        with (self.directory / "epmd.out").open("ab") as out:
            self.epmd = subprocess.Popen(
                [exe, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        while not accepts(self.epmd_port):
            if self.epmd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"epmd did not start:\n{_tail(self.directory / 'epmd.out')}")
            await asyncio.sleep(0.02)

    async def start(self, timeout: float = RABBIT_START_TIMEOUT) -> str:
        """Start the node; return its URL once aio-pika connects. Again after ``stop()``
        or ``kill()``: same ports, same node name and Mnesia directory."""
        if self.process is not None:
            raise RuntimeError(f"RabbitMQ on {self.url} is already running")
        # The real start script: the wrapper in /usr/sbin would switch users as root.
        exe = find_binary(
            "rabbitmq-server", "rabbitmq-server", "/usr/lib/rabbitmq/bin/rabbitmq-server"
        )
        if Path(exe).resolve().name == "rabbitmq-script-wrapper":
            exe = str(Path(exe).resolve().with_name("rabbitmq-server"))
        self._write_files()
        began = time.monotonic()
        deadline = began + timeout
        _RUNNING.add(self)
        await self._start_epmd(deadline)
        with (self.directory / "rabbitmq.out").open("ab") as out:
            self.process = subprocess.Popen(
                [exe],
                cwd=self.directory,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        while not await self._answers():
            if self.process.poll() is not None:
                code = self.process.returncode
                self.kill()
                raise RuntimeError(f"rabbitmq-server exited ({code}) at start:\n{self._output()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"RabbitMQ did not answer within {timeout:.0f}s:\n{self._output()}"
                )
            await asyncio.sleep(0.1)
        self.started_in = time.monotonic() - began
        return self.url

    def _output(self) -> str:
        return f"{_tail(self.directory / 'rabbitmq.out')}\n{_tail(self.log)}"

    async def _answers(self) -> bool:
        if not accepts(self.port):
            return False
        try:
            connection = await aio_pika.connect(self.url, timeout=2)
        except Exception:
            return False
        await connection.close()
        return True

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[AbstractRobustConnection]:
        """An aio-pika (robust) connection to this node, closed at the end."""
        connection = await aio_pika.connect_robust(self.url, timeout=5)
        try:
            yield connection
        finally:
            await connection.close()

    async def declare(self, exchange: str, type_: str, queue: str, binding_key: str) -> None:
        """A durable exchange of ``type_`` ("direct", "topic", "fanout"…), a durable
        queue, and a binding between them."""
        async with self.client() as connection:
            channel = await connection.channel()
            ex = await channel.declare_exchange(exchange, type_, durable=True)
            q = await channel.declare_queue(queue, durable=True)
            await q.bind(ex, routing_key=binding_key)

    async def messages(self, queue: str) -> list[AbstractIncomingMessage]:
        """Take every message in ``queue`` (basic.get, no ack): afterwards it is empty."""
        async with self.client() as connection:
            channel = await connection.channel()
            q = await channel.declare_queue(queue, passive=True)
            found: list[AbstractIncomingMessage] = []
            while (message := await q.get(no_ack=True, fail=False)) is not None:
                found.append(message)
            return found

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the start script (it stops the node cleanly and waits for it), then
        stop epmd; SIGKILL whatever has not exited within ``timeout``."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            pids = descendants(proc.pid)
            proc.terminate()
            if await _wait_exit(proc, timeout):
                deadline = time.monotonic() + timeout
                while any(alive(p) for p in pids) and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the node — its process group and its helpers in sessions of their
        own — and its epmd, and wait until none of them is left."""
        proc, self.process = self.process, None
        epmd, self.epmd = self.epmd, None
        _RUNNING.discard(self)
        pids: set[int] = set()
        for p in (proc, epmd):
            if p is None:
                continue
            pids |= descendants(p.pid) | {p.pid}
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for p in (proc, epmd):
            if p is not None:
                p.wait()
        deadline = time.monotonic() + STOP_TIMEOUT
        while left := [pid for pid in pids if alive(pid)]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes of {self.nodename} outlived SIGKILL: {left}")
            time.sleep(0.01)

    async def restart(self, timeout: float = RABBIT_START_TIMEOUT) -> str:
        """Stop it if it runs, and start it again on the same ports and data."""
        await self.stop()
        return await self.start(timeout)


def accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
