"""Retry policy: which answers are worth another attempt, and when it is due.

Retryable: no answer (connection error, timeout), 408, 425, 429 and 5xx. The wait after
failed attempt ``n`` is ``retry_backoff * 2**(n-1)`` capped at ``retry_backoff_max``, less
up to 25% jitter; a sink's ``Retry-After`` can lengthen it (up to ``retry_after_max``) but
never shorten it (``Retry-After: 0`` would otherwise burn ``max_attempts`` in moments).
A wait that would run past the delivery's deadline still leaves one last attempt just
before it, rather than none.
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass
from datetime import UTC

from relay.config import SinkConfig, WorkerConfig

RETRYABLE_STATUSES = frozenset({408, 425, 429})
LAST_TRY_MARGIN_S = 1.0  # a last attempt starts this + the sink's timeout before the deadline


def retryable(status: int | None) -> bool:
    """Whether an attempt that got ``status`` (None: no HTTP answer) may be tried again."""
    return status is None or status in RETRYABLE_STATUSES or status >= 500


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delay-seconds or an HTTP date)."""
    if not value:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff(
    attempt: int,
    base: float,
    cap: float,
    retry_after: float | None = None,
    retry_after_max: float = 3600.0,
    rand: float | None = None,
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    ``base * 2**(attempt-1)`` capped at ``cap``, less up to 25% jitter.
    A ``Retry-After`` from the sink can lengthen the wait, up to ``retry_after_max``, but
    never shortens it below that backoff.
    """
    delay = min(base * 2.0 ** min(attempt - 1, 62), cap)
    delay *= 0.75 + 0.25 * (random.random() if rand is None else rand)
    if retry_after is not None:
        return max(delay, min(max(retry_after, 0.0), retry_after_max))
    return delay


@dataclass(frozen=True, slots=True)
class NextAttempt:
    """When the next attempt is due, or why there is none."""

    due_ms: int
    delay: float  # seconds from now
    give_up: str | None  # "out of attempts" or "past max_age": no next attempt


def next_attempt(
    attempt: int,
    now_ms: int,
    deadline_ms: int,
    sink: SinkConfig,
    worker: WorkerConfig,
    retry_after: float | None,
) -> NextAttempt:
    """Schedule the attempt after failed attempt ``attempt``, within the deadline."""
    delay = backoff(
        attempt,
        worker.retry_backoff,
        worker.retry_backoff_max,
        retry_after,
        worker.retry_after_max,
    )
    due = now_ms + int(delay * 1000)
    # A wait (a long Retry-After, say) that would run past the deadline still leaves one
    # last attempt, just before it, rather than none.
    last_chance = deadline_ms - int((sink.timeout + LAST_TRY_MARGIN_S) * 1000)
    if due >= deadline_ms and last_chance > now_ms:
        due, delay = last_chance, (last_chance - now_ms) / 1000
    if attempt >= sink.max_attempts:
        return NextAttempt(due, delay, "out of attempts")
    if due >= deadline_ms:
        return NextAttempt(due, delay, "past max_age")
    return NextAttempt(due, delay, None)


def status_class(status: int | None, kind: str) -> str:
    """The ``status`` label of a delivery: ``2xx``…``5xx``, or the kind of failure."""
    return kind if status is None else f"{status // 100}xx"
