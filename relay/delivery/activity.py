"""What a worker's log says of its sinks, beside the per-delivery lines (at DEBUG).

- A summary per sink every :data:`SUMMARY_S` while it has activity, and once more when
  the worker stops: ``sink T/S: 1234 delivered, 5 retried, 0 dead-lettered in the last
  60s``. Dead letters are also logged one by one, as warnings.
- A warning when a sink has answered nothing — only timeouts and connection errors —
  for ``worker.sink_silence_warn`` (60 s), once per episode, and a line when it answers
  again. The silence runs from the start of the first unanswered attempt after the sink's
  last answer; it is judged as each attempt ends and every :data:`TICK_S`, so an open
  breaker (which sends a probe only every ``breaker_cooldown``) does not hide it.

Each worker process keeps its own counts (a relay with several workers logs a summary per
worker). Nothing here touches Redis.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from relay.delivery.sink_client import Answer

log = logging.getLogger(__name__)

SUMMARY_S = 60.0  # a summary per sink this often, while it has activity
TICK_S = 5.0  # how often silences are judged between attempts


@dataclass(slots=True)
class _Sink:
    delivered: int = 0
    retried: int = 0
    dead_lettered: int = 0
    answered_at: float = float("-inf")  # the last HTTP answer (monotonic)
    silent_since: float | None = None  # the first unanswered attempt since, when it began
    unanswered: int = 0  # attempts since the last answer that timed out or got no connection
    warned: bool = False

    @property
    def idle(self) -> bool:
        counted = self.delivered or self.retried or self.dead_lettered
        return not counted and self.silent_since is None


def _span(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"


def _attempts(n: int) -> str:
    return f"{n} attempt" if n == 1 else f"{n} attempts"


class SinkActivity:
    """One worker's view of its sinks: counts for the summary, and their silences."""

    def __init__(self, silence_warn: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.silence_warn = silence_warn
        self._clock = clock
        self._sinks: dict[tuple[str, str], _Sink] = {}
        self._since = clock()

    def _of(self, tenant: str, sink: str) -> _Sink:
        found = self._sinks.get((tenant, sink))
        if found is None:
            found = self._sinks[(tenant, sink)] = _Sink()
        return found

    def attempt_ended(self, tenant: str, sink: str, answer: Answer) -> None:
        """An HTTP attempt at ``tenant``/``sink`` ended with ``answer``."""
        s = self._of(tenant, sink)
        now = self._clock()
        if answer.status is not None:
            if s.warned and s.silent_since is not None:
                log.info(
                    "sink %s/%s answers again (HTTP %d) after %s without an answer (%s "
                    "timed out or failed to connect)",
                    tenant,
                    sink,
                    answer.status,
                    _span(now - s.silent_since),
                    _attempts(s.unanswered),
                )
            s.answered_at, s.silent_since, s.unanswered, s.warned = now, None, 0, False
            return
        s.unanswered += 1
        if s.silent_since is None:
            s.silent_since = max(now - answer.seconds, s.answered_at)
        self._judge(tenant, sink, s, now)

    def count(self, tenant: str, sink: str, outcome: str) -> None:
        """A delivery's outcome was recorded: ``delivered``, ``retried`` or
        ``dead-lettered`` are summed for the summary (others are ignored)."""
        s = self._of(tenant, sink)
        if outcome == "delivered":
            s.delivered += 1
        elif outcome == "retried":
            s.retried += 1
        elif outcome == "dead-lettered":
            s.dead_lettered += 1

    def _judge(self, tenant: str, sink: str, s: _Sink, now: float) -> None:
        if s.warned or s.silent_since is None or now - s.silent_since < self.silence_warn:
            return
        s.warned = True
        log.warning(
            "sink %s/%s has answered nothing for %s (%s timed out or failed to connect)",
            tenant,
            sink,
            _span(now - s.silent_since),
            _attempts(s.unanswered),
        )

    def tick(self) -> None:
        """Judge the silences; log the summary if :data:`SUMMARY_S` has passed."""
        now = self._clock()
        for (tenant, sink), s in self._sinks.items():
            self._judge(tenant, sink, s, now)
        if now - self._since >= SUMMARY_S:
            self.report()

    def report(self) -> None:
        """Log one line per sink with deliveries ended since the last report; start
        the counts afresh (and forget the sinks with nothing going on)."""
        now = self._clock()
        span, self._since = now - self._since, now
        for (tenant, sink), s in list(self._sinks.items()):
            if s.delivered or s.retried or s.dead_lettered:
                log.info(
                    "sink %s/%s: %d delivered, %d retried, %d dead-lettered in the last %s",
                    tenant,
                    sink,
                    s.delivered,
                    s.retried,
                    s.dead_lettered,
                    _span(span),
                )
                s.delivered = s.retried = s.dead_lettered = 0
            elif s.idle:
                del self._sinks[(tenant, sink)]

    async def run(self) -> None:
        """:meth:`tick` every :data:`TICK_S` until cancelled."""
        while True:
            await asyncio.sleep(TICK_S)
            self.tick()
