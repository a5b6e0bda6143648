"""Tenant state read from Redis at scrape time: each tenant's last webhook and poll
watermark.

Both live in Redis, shared by every relay process on it (the ingest script records the
last verified webhook; the tenant poller advances the watermark), so every process that
runs the receiver or the poller exports the same value, whichever of them saw the
webhook or polled the window. Registered by the service; Prometheus scrapes run in a
thread (``relay.admin.app``), so this reads with a blocking client and a short timeout.
A Redis that does not answer leaves these families out of that scrape (logged).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import redis
import redis.exceptions
from prometheus_client.core import GaugeMetricFamily

from relay.keys import Keys
from relay.metrics import PREFIX, RedisStateCollector

log = logging.getLogger(__name__)


class TenantStateCollector(RedisStateCollector):
    """``last_webhook_timestamp_seconds`` and ``poll_watermark_timestamp_seconds``."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        cfg = self.config
        keys = Keys(cfg.redis.key_prefix)
        slugs = [t.slug for t in cfg.tenants]
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for slug in slugs:
                    pipe.get(keys.last_webhook(slug))
                    pipe.get(keys.watermark(slug))
                found = pipe.execute()
        except (redis.exceptions.RedisError, OSError) as e:
            log.warning("metrics: could not read tenant state from Redis: %s", e)
            return
        webhook = GaugeMetricFamily(
            f"{PREFIX}_last_webhook_timestamp_seconds",
            "Unix time of the tenant's last verified webhook, by any relay on this Redis "
            "(absent until the first one).",
            labels=["tenant"],
        )
        watermark = GaugeMetricFamily(
            f"{PREFIX}_poll_watermark_timestamp_seconds",
            "The tenant's poll watermark: Chert's created_at of the newest event polling "
            "has read to (absent until the first poll window).",
            labels=["tenant"],
        )
        for i, slug in enumerate(slugs):
            raw_webhook, raw_watermark = found[2 * i], found[2 * i + 1]
            if (value := _number(raw_webhook)) is not None:
                webhook.add_metric([slug], value / 1000)  # stored in unix ms
            if (value := _number(raw_watermark)) is not None:
                watermark.add_metric([slug], value)  # stored in unix seconds
        yield webhook
        yield watermark


def _number(raw: bytes | None) -> float | None:
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        return None
