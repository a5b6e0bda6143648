"""File descriptors: enough of them at start-up, and a quiet log when they run out.

Every connection — a webhook's, an admin request's, one to Redis or to a sink — is a
descriptor, and a login shell's soft limit (1,024) is below what ``server.max_connections``
(1,000) and the rest need. At start-up the soft ``RLIMIT_NOFILE`` is raised to the hard
limit (:func:`raise_open_files`), with one warning when even that is below what the
process's roles may hold. Should the process still run out, asyncio reports every failed
``accept()`` — thousands a second, each with a traceback; :class:`LoopErrors` lets one
line through every 10 s with a count of the rest.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

from relay.config import Config
from relay.logs import Throttle

log = logging.getLogger(__name__)

SPARE = 256  # descriptors beyond the connections: Redis, sinks, logs, the admin listener
_CEILING = 1 << 20  # what "unlimited" is raised to


def needed(config: Config, roles: tuple[str, ...]) -> int:
    """Descriptors the process's roles may hold at once."""
    n = SPARE
    if "receiver" in roles:
        n += config.server.max_connections
    if "worker" in roles:
        n += config.worker.max_jobs
    return n


def raise_open_files(need: int) -> str | None:
    """Raise the soft open-file limit to the hard one; a warning if it stays below
    ``need``, else None."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.debug("could not raise the open-file limit to %d: %s", target, e)
    if soft != resource.RLIM_INFINITY and soft < need:
        return (
            f"the open-file limit is {soft} (hard {hard}), below the {need} descriptors "
            "this process may need (server.max_connections, worker.max_jobs and a spare "
            f"{SPARE}): past it new connections fail. Raise it (systemd: LimitNOFILE=, "
            "a shell: ulimit -n) or lower server.max_connections"
        )
    return None


class LoopErrors:
    """The event loop's exception handler: asyncio's ``accept()`` failures (out of
    descriptors or memory) one line per ``interval`` with a count; everything else as
    asyncio would log it."""

    ACCEPT = "socket.accept() out of system resource"

    def __init__(self, interval: float = 10.0) -> None:
        self._throttle = Throttle(interval)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        if not message.startswith(self.ACCEPT):
            loop.default_exception_handler(context)
            return
        suppressed = self._throttle.allow(self.ACCEPT)
        if suppressed is None:
            return
        error = context.get("exception")
        more = f" ({suppressed} more since the last line)" if suppressed else ""
        log.error("cannot accept a connection: %s%s", error, more)
