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
        """Hash: body, type, ts (Chert time), src, at (ingest ms), n (jobs created)."""
        return f"{self.prefix}:ev:{tenant}:{event_id}"

    def last_webhook(self, tenant: str) -> str:
        """Unix ms of the tenant's last verified webhook (any relay instance)."""
        return f"{self.prefix}:lastwh:{tenant}"
