"""How a delivery ends without being delivered: its dead letter, and why it ended
without an attempt (for the deliverer, :mod:`relay.delivery.deliverer`)."""

from __future__ import annotations

import logging

from relay.config import SinkConfig
from relay.delivery.heartbeat import HOLD_S
from relay.delivery.steps import Ended, Ref
from relay.store.clock import CLOCK
from relay.store.deadletters import DeadLetter, Tried


def dead_letter_of(
    ref: Ref, etype: str, cls: str, tried: Tried, status: int | None, error: str
) -> DeadLetter:
    """The dead letter of ``ref``'s delivery, dead-lettered now."""
    return DeadLetter(
        tenant=ref.tenant,
        sink=ref.sink,
        event_id=ref.event_id,
        event_type=etype,
        cls=cls,
        status=status,
        error=error,
        attempts=tried.attempts,
        first_attempt=tried.first,
        last_attempt=tried.last,
        dead_lettered_at=CLOCK.now(),
        chat=ref.chat,
    )


def why_ended(end: Ended, sink: SinkConfig) -> str:
    """Why a delivery ended without an attempt, for its dead letter."""
    if end.reason == "expired":
        held = (
            f"; {end.held_s:.1f}s waiting for the sink's concurrency cap or rate (or paused) "
            "not counted"
            if end.held_s >= 0.1
            else ""
        )
        if end.tried.attempts == 0:
            why = (
                f"past max_age ({sink.max_age:g}s) without an attempt: the sink's circuit "
                f"breaker was open (the sink kept failing){held}"
            )
        else:
            why = f"past max_age ({sink.max_age:g}s) after {end.tried.attempts} attempt(s){held}"
    else:
        why = f"out of attempts ({end.tried.attempts} of {sink.max_attempts})"
    return f"{why}; last error: {end.error}" if end.error else why


def log_stale_finish(log: logging.Logger, outcome: str, answer: int | str | None) -> None:
    """A run's finish was refused as stale: say what it was and what it means."""
    log.warning(
        "delivery outcome %r not recorded%s: this run lost its hold on the delivery "
        "(the worker was paused or its loop blocked for more than %.0fs) and another "
        "run has taken it over; the sink may receive this event more than once",
        outcome,
        "" if answer is None else f" (the sink answered {answer})",
        HOLD_S,
    )
