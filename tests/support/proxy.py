"""A real forward proxy for the tests: Debian's tinyproxy on 127.0.0.1, on a free port,
with its own configuration (Basic auth when asked) and a log the test reads."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

from relay.store.embedded import free_port
from tests.support.common import wait_for
from tests.support.tools import tool

_REQUEST = re.compile(r"Request \(file descriptor \d+\): (\S+ \S+)")


class TinyProxy:
    """tinyproxy running in the foreground; ``requests()`` are the request lines it took
    (``POST http://…`` forwarded, ``CONNECT host:port`` tunnelled), in order."""

    def __init__(self, directory: Path, user: str | None = None, password: str | None = None):
        self.directory = directory
        self.port = free_port()
        self.log = directory / "tinyproxy.log"
        self.url = f"http://127.0.0.1:{self.port}"
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 30",
            f'LogFile "{self.log}"',
            "LogLevel Connect",
            "MaxClients 64",
            "Allow 127.0.0.1",
        ]  # no ConnectPort line: CONNECT to any port (the sinks' are random)
        if user is not None and password is not None:
            lines.append(f"BasicAuth {user} {password}")
        directory.mkdir(parents=True, exist_ok=True)
        self.conf = directory / "tinyproxy.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self._proc: asyncio.subprocess.Process | None = None

    def requests(self) -> list[str]:
        if not self.log.exists():
            return []
        return _REQUEST.findall(self.log.read_text(errors="replace"))

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def start(self) -> TinyProxy:
        out = (self.directory / "tinyproxy.out").open("wb")
        self._proc = await asyncio.create_subprocess_exec(
            tool("tinyproxy"), "-d", "-c", str(self.conf), stdout=out, stderr=out
        )
        out.close()
        await wait_for(self._listening, 10)
        return self

    async def _listening(self) -> bool:
        assert self._proc is not None
        if self._proc.returncode is not None:
            raise AssertionError(
                f"tinyproxy exited: {(self.directory / 'tinyproxy.out').read_text()}"
            )
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        writer.close()
        await writer.wait_closed()
        return True

    async def stop(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await self._proc.wait()
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()


@contextlib.asynccontextmanager
async def tinyproxy(
    directory: Path, user: str | None = None, password: str | None = None
) -> AsyncIterator[TinyProxy]:
    proxy = await TinyProxy(directory, user, password).start()
    try:
        yield proxy
    finally:
        await proxy.stop()
