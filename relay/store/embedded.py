"""The embedded default: a private ``redis-server`` under the state directory.

Started with AOF on (``appendfsync always``: every acknowledged event is on disk
before the answer), ``noeviction``, no RDB snapshots, and a Unix socket only (no
TCP port unless asked), so a single machine needs no Redis of its own to run the
relay safely. The same class starts the test suite's servers on free TCP ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path

from redis.asyncio import Redis

from relay.config import Config
from relay.errors import (
    EmbeddedRedisError,
    EmbeddedRedisInUseError,
    ForeignStateError,
    RedisServerMissingError,
    StateDirError,
)

log = logging.getLogger(__name__)

_MAX_UNIX_PATH = 100  # sun_path is 108 bytes on Linux; keep a margin


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedRedis:
    """A ``redis-server`` child process with its data in ``directory``."""

    def __init__(
        self,
        directory: Path,
        *,
        binary: str = "redis-server",
        port: int | None = None,
        appendfsync: str = "always",
        extra: Sequence[str] = (),
    ) -> None:
        self.directory = directory.resolve()
        self.binary = binary
        self.port = port
        self.appendfsync = appendfsync
        self.extra = tuple(extra)  # more redis-server options (tests: --replicaof …)
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self._lock: int | None = None  # the data directory's lock, held while it runs

    def _argv(self, exe: str, sock: Path | None) -> list[str]:
        argv = [
            exe,
            "--dir",
            str(self.directory),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--maxmemory-policy",
            "noeviction",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.directory / "redis.log"),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "yes",
        ]
        if sock is not None:
            argv += ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
        else:
            argv += ["--port", str(self.port)]
        return argv + list(self.extra)

    async def start(self, timeout: float = 15.0) -> str:
        """Start the server, wait until it answers, and return its URL."""
        exe = shutil.which(self.binary)
        if exe is None:
            raise RedisServerMissingError(
                f"{self.binary!r} was not found on PATH (the embedded default needs it); "
                "install Redis (Debian: apt-get install redis-server) or set [redis] url"
            )
        self._make_directory()
        if self._lock is not None and (self.process is None or self.process.poll() is not None):
            self._forget()  # it exited on its own, and no stop() came
        # The lock first: a server that runs is never touched (its socket not removed
        # while it loads its AOF or stalls, nor a second one started beside it).
        self._lock = self._take_lock()
        try:
            sock: Path | None = self.directory / "redis.sock"
            if self.port is None and len(str(sock)) > _MAX_UNIX_PATH:
                self.port = free_port()
            if self.port is not None:
                sock = None
                self.url = f"redis://127.0.0.1:{self.port}/0"
            else:
                assert sock is not None
                if sock.exists() and await self.answers(f"unix://{sock}"):
                    raise self._in_use()  # one an earlier build started, unlocked
                with contextlib.suppress(FileNotFoundError):
                    sock.unlink()
                self.url = f"unix://{sock}"
            self.process = subprocess.Popen(
                self._argv(exe, sock),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,  # a Ctrl-C meant for the relay does not reach it first
                pass_fds=(self._lock,),  # the server holds the lock too, as long as it runs
            )
        except BaseException:
            self._unlock()
            raise
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                said = self._log_tail()
                self._forget()
                raise EmbeddedRedisError(f"redis-server exited at start-up: {said}")
            if await self.answers(self.url):
                log.info("embedded redis-server started (pid %d) at %s", self.process.pid, self.url)
                return self.url
            await asyncio.sleep(0.02)
        await self.stop()
        raise EmbeddedRedisError(f"redis-server did not answer within {timeout:.0f}s")

    def _make_directory(self) -> None:
        """Create the data directory (and the state directory above it) and check that
        it can be written, so that a read-only state_dir is named as such."""
        probe = self.directory / ".write-test"
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise StateDirError(
                f"the state directory {self.directory.parent} cannot be written "
                f"({self.directory}: {e.strerror or e})"
            ) from None

    def _take_lock(self) -> int:
        """Lock the data directory (``redis.lock``, ``flock``), or raise
        :class:`EmbeddedRedisInUseError`: two servers on one AOF would each write it as
        their own. The socket alone cannot tell (a state directory whose path is too long
        for a socket puts the server on a TCP port, which nothing records). The server
        inherits the lock, so one left running by a killed relay still holds it."""
        path = self.directory / "redis.lock"
        try:  # never through a link planted there
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StateDirError(f"cannot open {path}: {e.strerror or e}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StateDirError(f"{path} is not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._in_use() from None
        return fd

    def _in_use(self) -> EmbeddedRedisInUseError:
        return EmbeddedRedisInUseError(
            f"a redis-server is already running on {self.directory} (another relay's, or "
            "one a stopped relay left): is another relay using this state_dir? Set [redis] "
            "url to share one Redis."
        )

    def _unlock(self) -> None:
        fd, self._lock = self._lock, None
        if fd is not None:
            os.close(fd)  # the lock goes once the server's copy is closed too (it exited)

    def _forget(self) -> None:
        """Let go of a server that has exited: its pipe closed, its lock released."""
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None
        self._unlock()

    def _log_tail(self) -> str:
        parts = []
        if self.process is not None and self.process.stderr is not None:
            with contextlib.suppress(OSError, ValueError):
                parts.append(self.process.stderr.read().decode(errors="replace"))
        with contextlib.suppress(OSError):
            lines = (self.directory / "redis.log").read_text(errors="replace").splitlines()
            parts += lines[-5:]
        return " | ".join(p.strip() for p in parts if p.strip()) or "no output"

    @staticmethod
    async def answers(url: str) -> bool:
        client: Redis = Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(await client.ping())
        except Exception:
            return False
        finally:
            await client.aclose()

    async def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the server (it fsyncs its AOF and exits) and wait for it."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            self._forget()
            return
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if proc.poll() is None:
            log.error("redis-server did not stop within %.0fs; killing it", timeout)
            proc.kill()
            proc.wait()
        self._forget()
        log.info("embedded redis-server stopped")

    def kill(self) -> None:
        """Stop it at once, as a crash would (tests)."""
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._forget()


def _not_root_on_anothers(state_dir: Path) -> None:
    """Refuse (:class:`ForeignStateError`) to start, as root, a server on a state another
    user owns — the state directory or its ``redis`` data directory, each as named (a
    link that user made is not followed to a directory of root's): the systemd units'
    dynamic user's state, with an operator's ``dlq`` as root while the relay is stopped,
    or ``sudo chert-relay run`` on it. Root's server would leave root's files there,
    which the relay's own server could then not write, and follow any link that user
    planted. (As that user it could not reach a state under ``/var/lib/private``, which
    only root may enter.)"""
    if os.geteuid() != 0:
        return
    for path in (state_dir, state_dir / "redis"):
        try:
            owner = os.lstat(path).st_uid
        except OSError:
            continue
        if owner != 0:
            raise ForeignStateError(
                f"the relay's state at {path} belongs to uid {owner}, and this process "
                "runs as root: run the relay as that user (its commands then use its "
                "Redis, as root too), or run this as that user"
            )


async def open_redis_url(
    config: Config, stack: AsyncExitStack, *, share_running: bool = False
) -> str:
    """The Redis URL to use: ``[redis] url``, or else the embedded server under
    ``state_dir``, started now and stopped when ``stack`` closes.

    ``share_running``: a short-lived command (``backfill``, ``dlq``) uses the embedded
    server of a relay already running on the same ``state_dir`` instead of refusing.
    """
    if config.redis.url is not None:
        return config.redis.url.get()
    embedded = EmbeddedRedis(config.relay.state_dir / "redis", binary=config.redis.server_binary)
    sock = embedded.directory / "redis.sock"
    if share_running and sock.exists() and await EmbeddedRedis.answers(f"unix://{sock}"):
        return f"unix://{sock}"
    _not_root_on_anothers(config.relay.state_dir)
    url = await embedded.start()
    stack.push_async_callback(embedded.stop)
    return url
