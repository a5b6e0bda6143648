"""A paced sink's Retry-After: a sink with a ``rate`` that answers 429 or 503 with a
``Retry-After`` holds every worker's deliveries to it back until the time it names
(capped at ``worker.retry_after_max``); then its configured pace resumes, without a
burst (``lua/lib/rate.lua``). A sink without a ``rate`` is not held: the Retry-After
only puts off the next attempt of the delivery it answered (:mod:`relay.delivery.retry`).
"""

from __future__ import annotations

import logging

import redis.exceptions

from relay.config import SinkConfig, WorkerConfig
from relay.delivery.limits import rate_interval_ms
from relay.delivery.sink_client import Answer
from relay.delivery.steps import Steps

log = logging.getLogger(__name__)

HOLDING_STATUSES = (429, 503)


async def answered(
    steps: Steps, tenant: str, sink: SinkConfig, answer: Answer, worker: WorkerConfig
) -> None:
    """Hold ``sink``'s deliveries back for ``answer``'s Retry-After, if it is one that
    does (best effort: a Redis fault only loses the hold)."""
    if sink.rate is None or answer.status not in HOLDING_STATUSES or not answer.retry_after:
        return
    wait_ms = int(min(answer.retry_after, worker.retry_after_max) * 1000)
    if wait_ms <= 0:
        return
    try:
        moved = await steps.hold_pace(tenant, sink.name, wait_ms, rate_interval_ms(sink))
    except (redis.exceptions.RedisError, OSError) as e:
        log.debug("sink %s/%s: Retry-After not recorded (%s)", tenant, sink.name, e)
        return
    if moved:
        log.info(
            "sink %s/%s answered %s with Retry-After: nothing is sent to it for %.1fs, "
            "then its rate resumes",
            tenant,
            sink.name,
            answer.status,
            wait_ms / 1000,
        )
