"""Text log lines stay one line each, whatever a client, a sink or an event put in them."""

from __future__ import annotations

import logging
import sys

from relay.logs import TextFormatter, printable


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("relay.test", logging.WARNING, __file__, 1, msg, args, None)
    for k, v in extra.items():
        setattr(record, k, v)
    return record


def test_control_characters_in_a_message_cannot_forge_a_line_or_reach_the_terminal() -> None:
    hostile = "GET /x\n2026-12-07 00:00:00,000 ERROR   relay.service: forged\x1b[2J\x07"
    record = _record("refused %s", hostile, context={"path": "/ui\r\n\x9b31m"})
    line = TextFormatter().format(record)
    for control in ("\n", "\r", "\x1b", "\x07", "\x9b"):
        assert control not in line
    assert "refused GET /x\\x0a2026-12-07" in line
    assert "path=/ui\\x0d\\x0a\\x9b31m" in line
    assert record.getMessage().startswith("refused GET /x\n")  # the record itself unchanged


def test_a_traceback_still_follows_on_its_own_lines() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("failed")
        record.exc_info = sys.exc_info()
    lines = TextFormatter().format(record).splitlines()
    assert lines[0].endswith("failed")
    assert lines[-1] == "ValueError: boom"


def test_printable_leaves_ordinary_text_alone() -> None:
    text = "délivré: 200 in 41 ms — ok ✓"
    assert printable(text) == text
