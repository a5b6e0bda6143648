"""The configured sinks by (tenant, name), and the limits a claim checks for each.

Built once per configuration (the deliverer's :meth:`~relay.delivery.deliverer.
Deliverer.set_config`): a job's sink is looked up in a dict instead of by scanning the
tenants, and ``take.lua`` gets every sink's limits as one JSON argument made once —
the jitters of its waits are drawn there, per job.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from relay.config import Config, SinkConfig
from relay.delivery import heartbeat


class SinkTable:
    """Every configured sink, and the claim limits of each (whether it can be tried)."""

    def __init__(self, config: Config, usable: Callable[[SinkConfig], bool]) -> None:
        # the in-flight lease, renewed by the heartbeat while the attempt runs
        lease_ms = int(heartbeat.HOLD_S * 1000)
        self._sinks = {(t.slug, s.name): s for t in config.tenants for s in t.sinks}
        limits = {
            pair: [
                int(s.max_age * 1000),
                s.max_attempts,
                s.concurrency,
                lease_ms,
                s.url,
                1 if usable(s) else 0,
                rate_interval_ms(s),
            ]
            for pair, s in self._sinks.items()
        }
        # take.lua's `sinks`: a job of an unusable sink is only peeked at, one of a sink
        # not in it put off (this worker's reload may be on the way)
        self.claim_limits = _json({f"{t}\n{n}": lim for (t, n), lim in limits.items()})
        # finish_batch.lua's `chain`: one usable sink's claim limits
        self._limits = {pair: _json(lim) for pair, lim in limits.items() if lim[5]}
        # sweep.lua's `sinks`: the slots each sink's waiting deliveries may fill
        self.caps = _json({f"{t}:{n}": s.concurrency for (t, n), s in self._sinks.items()})

    def get(self, tenant: str, name: str) -> SinkConfig | None:
        return self._sinks.get((tenant, name))

    def reservable(self, tenant: str, name: str) -> bool:
        """Whether the sink's deliveries may be claimed ahead (:mod:`relay.delivery.
        reserves`): not an ordered sink (a chat's next event waits for its finish) nor a
        paced one (its turns are the pace's)."""
        sink = self._sinks.get((tenant, name))
        return sink is not None and sink.ordering == "none" and sink.rate is None

    def claim_limit(self, tenant: str, name: str) -> str:
        """The claim limits of one usable sink (JSON, as in :attr:`claim_limits`); ""
        for a sink not configured here or not usable."""
        return self._limits.get((tenant, name), "")

    def cap(self, tenant: str, name: str) -> int:
        """The sink's concurrency; 0 for a sink not configured here."""
        found = self._sinks.get((tenant, name))
        return 0 if found is None else found.concurrency


def rate_interval_ms(sink: SinkConfig) -> float:
    """The ms between two starts of ``sink``'s deliveries at its ``rate``; 0 if it has
    none (``lua/lib/rate.lua``)."""
    return 0 if sink.rate is None else round(1000 / sink.rate, 6)


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))
