"""systemd's notify protocol: readiness, status, stopping and the watchdog.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a Unix datagram socket, ``@``
for the abstract namespace) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` (and
``WATCHDOG_PID``). The service sends ``READY=1`` once Redis is checked and every
listener is bound, ``STATUS=…`` lines with a one-line summary, ``STOPPING=1`` when it
starts draining, and ``WATCHDOG=1`` from a task on its event loop, so a loop that is
blocked stops the pings and systemd restarts the process. Outside systemd (no
``NOTIFY_SOCKET``) every call does nothing.

The protocol is a datagram of ``KEY=value`` lines (``sd_notify(3)``); no library
needed. The variables are removed from the environment once read, so child processes
(the embedded redis-server) do not notify in the relay's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Talks to systemd if it asked to be told; otherwise a no-op."""

    def __init__(self, env: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        found = {k: env.pop(k, None) for k in _VARS}
        self.address: str | None = None
        path = found["NOTIFY_SOCKET"]
        if path and (path.startswith("/") or path.startswith("@")):
            self.address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog_interval: float | None = None
        usec, pid = found["WATCHDOG_USEC"], found["WATCHDOG_PID"]
        ours = not pid or (pid.isdigit() and int(pid) == os.getpid())
        if self.address and usec and usec.isdigit() and int(usec) > 0 and ours:
            # Half the timeout, as sd_watchdog_enabled(3) advises.
            self.watchdog_interval = int(usec) / 2_000_000
        self._sock: socket.socket | None = None
        self._warned = False
        self._warned_full = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines (``ready=1`` → ``READY=1``); False if it failed."""
        if self.address is None:
            return False
        text = "\n".join(f"{k.upper()}={v}" for k, v in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never block the event loop: a listener that stopped reading (its queue
                # full) costs this message, not the daemon.
                self._sock.setblocking(False)
            self._sock.sendto(text.encode(), self.address)
        except BlockingIOError:
            if not self._warned_full:
                log.warning(
                    "systemd's notify socket %s is not being read; notifications are dropped "
                    "while it is full",
                    self.address.lstrip("\0"),
                )
                self._warned_full = True
            return False
        except OSError as e:
            if not self._warned:
                log.warning("cannot notify systemd at %s: %s", self.address.lstrip("\0"), e)
                self._warned = True
            return False
        return True

    def ready(self, status: str) -> None:
        self.send(ready=1, status=status, mainpid=os.getpid())

    def status(self, status: str) -> None:
        self.send(status=status)

    def stopping(self, status: str = "draining") -> None:
        self.send(stopping=1, status=status)

    async def watchdog(self) -> None:
        """Ping the watchdog from the event loop until cancelled (nothing to do if off)."""
        if self.watchdog_interval is None:
            return
        log.info("systemd watchdog: pinging every %.1fs", self.watchdog_interval)
        while True:
            self.send(watchdog=1)
            await asyncio.sleep(self.watchdog_interval)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
