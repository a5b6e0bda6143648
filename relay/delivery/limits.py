"""The configured sinks by (tenant, name), and the limits a claim checks for each.

Built once per configuration (the deliverer's :meth:`~relay.delivery.deliverer.
Deliverer.set_config`): a poll's take looks each job's sink up in a dict instead of
scanning the tenants, and takes the sink's fixed limits from a tuple made once; only
the jitters are drawn per job.
"""

from __future__ import annotations

import random

from relay.config import Config, SinkConfig
from relay.delivery import heartbeat
from relay.delivery.steps import ClaimLimits


class SinkTable:
    """Every configured sink, and the fixed part of its claim limits."""

    def __init__(self, config: Config) -> None:
        w = config.worker
        self._busy_s = w.busy_defer
        self._open_s = min(w.breaker_cooldown, 5.0)
        self._half_open_s = min(w.breaker_cooldown, 1.0)
        # the in-flight lease, renewed by the heartbeat while the attempt runs
        lease_ms = int(heartbeat.HOLD_S * 1000)
        self._sinks: dict[tuple[str, str], tuple[SinkConfig, tuple[int, int, int, int, str]]]
        self._sinks = {
            (t.slug, s.name): (
                s,
                (int(s.max_age * 1000), s.max_attempts, s.concurrency, lease_ms, s.url),
            )
            for t in config.tenants
            for s in t.sinks
        }

    def get(self, tenant: str, name: str) -> SinkConfig | None:
        found = self._sinks.get((tenant, name))
        return None if found is None else found[0]

    def limits(self, tenant: str, name: str) -> ClaimLimits | None:
        """The sink's limits with fresh jitters: how long a busy or half-open deferral
        waits (1-2x the setting) and when an open breaker's deferral ends."""
        found = self._sinks.get((tenant, name))
        if found is None:
            return None
        r = random.random
        return ClaimLimits(
            *found[1],
            int(self._busy_s * (1 + r()) * 1000),
            int(r() * self._open_s * 1000),
            int(self._half_open_s * (1 + r()) * 1000),
        )
