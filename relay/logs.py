"""Logging, configured once by the CLI: readable lines on a terminal, JSON lines otherwise.

Context (tenant, event id, sink…) is bound with :func:`bind` and added to every
record logged inside it. Never put a secret or a whole payload in a log line.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("log_context", default={})  # noqa: B039


@contextlib.contextmanager
def bind(**values: Any) -> Iterator[None]:
    """Add ``values`` to every log record emitted inside the block (task-local)."""
    token = _context.set({**_context.get(), **values})
    try:
        yield
    finally:
        _context.reset(token)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.context = _context.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "context", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with every control character (newlines, ESC, BEL, C1 codes…) written as
    ``\\xNN``: what a client, a sink or an event put in it can neither forge a line
    nor drive the terminal that shows it."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class TextFormatter(logging.Formatter):
    """One line per record (a traceback follows on its own lines), control characters
    in the message and its context escaped (:func:`printable`)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        msg, args = record.msg, record.args
        record.msg, record.args = printable(record.getMessage()), None
        try:
            line = super().format(record)
        finally:
            record.msg, record.args = msg, args
        ctx = getattr(record, "context", None)
        if ctx:
            line += " " + " ".join(f"{k}={printable(str(v))}" for k, v in ctx.items())
        return line


class Throttle:
    """Lets one log line per key through every ``interval`` seconds and counts the rest,
    so a flood of identical refusals cannot drown the log (or the disk)."""

    def __init__(
        self,
        interval: float = 10.0,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        self._next: dict[object, tuple[float, int]] = {}

    def allow(self, key: object) -> int | None:
        """``None``: stay quiet. Otherwise log now; the int is how many were suppressed."""
        now = self._clock()
        due, suppressed = self._next.get(key, (0.0, 0))
        if now < due:
            self._next[key] = (due, suppressed + 1)
            return None
        if len(self._next) >= self.max_keys and key not in self._next:
            self._next.clear()
        self._next[key] = (now + self.interval, 0)
        return suppressed

    def forget(self, key: object) -> None:
        """Let the next line for ``key`` through at once (what it stands for changed)."""
        self._next.pop(key, None)


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Set up the root logger once: ``fmt`` is ``text``, ``json`` or ``auto`` (tty → text)."""
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries' chatter stays at warning unless debugging.
    for name in ("aiohttp.access", "arq.worker", "arq.jobs"):
        logging.getLogger(name).setLevel(max(root.level, logging.WARNING))
