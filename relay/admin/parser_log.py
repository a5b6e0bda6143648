"""What the admin listener logs when aiohttp's parser refuses a request.

aiohttp's server logs every such request at error level with its traceback, and the
exception's text quotes the request's bytes — up to the whole head when its lines end
in a bare LF, ``Authorization`` header included. So a scan of the admin port would
flood the log with tracebacks and could write a token into it. This filter, on the
logger the admin runner is given, turns each into one warning line (the reason and
the remote address, never the bytes), throttled like webhook refusals. A handler
failing (a bug) still gets its traceback.
"""

from __future__ import annotations

import logging

from aiohttp.http import HttpProcessingError

from relay.edge.http_types import refusal
from relay.logs import Throttle

LOGGER = "relay.admin.http"


class ParserRefusals(logging.Filter):
    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self._throttle = Throttle(interval=interval)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        reason, _ = refusal(exc)
        suppressed = self._throttle.allow(reason)
        if suppressed is None:
            return False
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
        record.msg = (
            "admin listener: refused a request the HTTP parser could not read: %s, remote=%s%s"
        )
        record.args = (
            reason,
            remote,
            f" ({suppressed} more like it since the last line)" if suppressed else "",
        )
        record.exc_info = record.exc_text = None
        if record.levelno > logging.WARNING:  # a refusal is not an error of the relay's
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def admin_server_logger() -> logging.Logger:
    """The logger for the admin runner (``web.AppRunner(..., logger=…)``), filtered."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(f, ParserRefusals) for f in logger.filters):
        logger.addFilter(ParserRefusals())
    return logger
