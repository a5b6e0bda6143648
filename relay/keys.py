"""Names of the relay's own Redis keys (arq's are in ``relay.queue``).

The ingest script (``ingest.lua``) builds the same names; keep the two in step.
"""

from __future__ import annotations


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def seen(self, tenant: str, event_id: str) -> str:
        """Dedupe marker for one event, with the dedupe TTL."""
        return f"{self.prefix}:seen:{tenant}:{event_id}"

    def event(self, tenant: str, event_id: str) -> str:
        """The stored event, a string shared by its deliveries (:mod:`relay.stored_event`)."""
        return f"{self.prefix}:ev:{tenant}:{event_id}"

    def last_webhook(self, tenant: str) -> str:
        """Unix ms of the tenant's last verified webhook (any relay instance)."""
        return f"{self.prefix}:lastwh:{tenant}"

    def watermark(self, tenant: str) -> str:
        """The poller's watermark: unix seconds (float) of the newest ``created_at`` ingested."""
        return f"{self.prefix}:poll:wm:{tenant}"

    def poll_lease(self, tenant: str) -> str:
        """Lease naming the one relay instance that polls ``tenant`` (token, with expiry)."""
        return f"{self.prefix}:poll:lease:{tenant}"

    # --- delivery (relay.delivery, relay.breaker, relay.deadletters) -----------------

    def attempts(self, tenant: str, sink: str, event_id: str) -> str:
        """Hash: one (event, sink) delivery's attempts, deadline, next due time, last error."""
        return f"{self.prefix}:att:{tenant}:{sink}:{event_id}"

    def breaker(self, tenant: str, sink: str) -> str:
        """Hash: a sink's circuit breaker (state, consecutive failures, open until, probe)."""
        return f"{self.prefix}:brk:{tenant}:{sink}"

    def inflight(self, tenant: str, sink: str) -> str:
        """Sorted set: job ids delivering to a sink now, scored by lease expiry (ms)."""
        return f"{self.prefix}:inflight:{tenant}:{sink}"

    def sink_gone(self, tenant: str, sink: str) -> str:
        """The sink URL that answered 410 Gone (deliveries to it dead-letter at once)."""
        return f"{self.prefix}:gone:{tenant}:{sink}"

    def dead_letters(self, tenant: str) -> str:
        """Sorted set of a tenant's dead letters (``sink:event_id``) by dead-letter time (ms)."""
        return f"{self.prefix}:dl:{tenant}"

    def dead_letter(self, tenant: str, sink: str, event_id: str) -> str:
        """Hash: one dead letter (class, status, error, attempts, times, type)."""
        return f"{self.prefix}:dle:{tenant}:{sink}:{event_id}"

    def dead_letter_counts(self, tenant: str) -> str:
        """Hash: the tenant's stored dead letters by class."""
        return f"{self.prefix}:dlc:{tenant}"
