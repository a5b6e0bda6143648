"""Delivery state read from Redis at scrape time: queue depth and age, dead letters,
breakers, gone, paused and paced sinks.

Registered on the metrics registry by the worker role. Prometheus scrapes run in a
thread (``relay.admin.app``), so this reads with a blocking client and a short timeout;
a Redis that does not answer leaves these families out of that scrape (logged), and
``chert_relay_delivery_state_readable`` — always exported by a worker — says which:
1 when the read worked, 0 when it did not. Its absence means no worker is scraped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import cast

import redis
import redis.exceptions
from prometheus_client.core import GaugeMetricFamily

from relay.delivery import breaker
from relay.keys import Keys
from relay.metrics import PREFIX, RedisStateCollector
from relay.store.deadletters import CLASSES

log = logging.getLogger(__name__)


class DeliveryCollector(RedisStateCollector):
    """Queue depth, stored dead letters and breaker states, read from Redis per scrape."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        p = PREFIX
        cfg = self.config
        keys = Keys(cfg.redis.key_prefix)
        q = keys.queue
        pairs = [(t.slug, s.name) for t in cfg.tenants for s in t.sinks]
        ordered = [(t.slug, s.name) for t in cfg.tenants for s in t.sinks if s.ordering != "none"]
        try:
            seconds, micros = cast(tuple[int, int], self._client.time())  # Redis' clock
            now = int(seconds) + int(micros) / 1e6
            with self._client.pipeline(transaction=False) as pipe:
                pipe.zcount(q, "-inf", int(now * 1000))
                pipe.zcount(q, f"({int(now * 1000)}", "+inf")
                pipe.zrange(q, 0, 0, withscores=True)
                for t in cfg.tenants:
                    pipe.hgetall(keys.dead_letter_counts(t.slug))
                for tenant, sink in pairs:
                    pipe.get(keys.sink_gone(tenant, sink))
                for tenant, sink in ordered:
                    pipe.zcard(keys.held_chats(tenant, sink))
                    pipe.zrange(keys.held_chats(tenant, sink), 0, 0, withscores=True)
                for tenant, sink in pairs:
                    pipe.zcard(keys.waiting(tenant, sink))
                for tenant, sink in pairs:
                    pipe.exists(keys.paused(tenant, sink))
                pipe.info("memory")
                pipe.zcard(keys.event_log_index)
                pipe.get(keys.event_log_bytes)
                *found, log_records, log_bytes = pipe.execute()
            states = breaker.states_sync(self._client, keys, pairs)
            paced = {(t.slug, s.name): s.rate for t in cfg.tenants for s in t.sinks if s.rate}
            pace_found = _read_paces(self._client, keys, list(paced))
        except (redis.exceptions.RedisError, OSError) as e:
            log.warning("metrics: could not read delivery state from Redis: %s", e)
            yield _readable(0)
            return
        yield _readable(1)
        memory = found[-1]
        yield GaugeMetricFamily(
            f"{p}_event_log_records",
            "Events recorded in the event log (kept for event_log.retention).",
            value=int(log_records),
        )
        yield GaugeMetricFamily(
            f"{p}_event_log_bytes",
            "Redis memory the event log's records take, as Redis counts it; they go "
            "oldest first past event_log.max_memory.",
            value=int(log_bytes or 0),
        )
        yield GaugeMetricFamily(
            f"{p}_redis_memory_used_bytes",
            "Memory Redis uses (INFO memory used_memory): at redis_maxmemory_bytes Redis "
            "refuses new events (503) while deliveries drain.",
            value=float(memory.get("used_memory", 0)),
        )
        yield GaugeMetricFamily(
            f"{p}_redis_maxmemory_bytes",
            "Redis' maxmemory (0: no limit set).",
            value=float(memory.get("maxmemory", 0)),
        )
        ready, scheduled, oldest = found[0], found[1], found[2]
        yield GaugeMetricFamily(f"{p}_queue_ready_jobs", "Delivery jobs due now.", value=ready)
        yield GaugeMetricFamily(
            f"{p}_queue_scheduled_jobs",
            "Delivery jobs due at a later time (retries).",
            value=scheduled,
        )
        age = 0.0
        if oldest and oldest[0][1] <= now * 1000:
            age = max(0.0, now - oldest[0][1] / 1000)
        yield GaugeMetricFamily(
            f"{p}_queue_oldest_ready_age_seconds",
            "How long the longest-waiting due job has been due.",
            value=age,
        )
        dl = GaugeMetricFamily(
            f"{p}_dead_letters", "Stored dead letters by class.", labels=["tenant", "class"]
        )
        for i, t in enumerate(cfg.tenants):
            counts = found[3 + i]
            for cls in CLASSES:
                dl.add_metric([t.slug, cls], int(counts.get(cls.encode(), 0)))
        yield dl
        gone_found = found[3 + len(cfg.tenants) : 3 + len(cfg.tenants) + len(pairs)]
        held_at = 3 + len(cfg.tenants) + len(pairs)
        held_found = found[held_at : held_at + 2 * len(ordered)]
        waiting_at = held_at + 2 * len(ordered)
        waiting_found = found[waiting_at : waiting_at + len(pairs)]
        paused_found = found[waiting_at + len(pairs) : -1]
        waiting = GaugeMetricFamily(
            f"{p}_deliveries_waiting",
            "Deliveries set aside until their sink can take them (a free slot of its "
            "concurrency, or its breaker letting them through); not in the queue.",
            labels=["tenant", "sink"],
        )
        for pair, n in zip(pairs, waiting_found, strict=True):
            waiting.add_metric(list(pair), int(n))
        yield waiting
        paused = GaugeMetricFamily(
            f"{p}_sink_paused",
            "1 while an operator has paused the sink (chert-relay sinks pause): nothing is "
            "sent to it, and its deliveries wait without expiring.",
            labels=["tenant", "sink"],
        )
        for pair, n in zip(pairs, paused_found, strict=True):
            paused.add_metric(list(pair), int(n))
        yield paused
        st = GaugeMetricFamily(
            f"{p}_breaker_state",
            "Each sink's circuit breaker: 0 closed, 1 half-open, 2 open.",
            labels=["tenant", "sink"],
        )
        gone = GaugeMetricFamily(
            f"{p}_sink_gone",
            "1 while a sink's URL is marked gone (it answered 410).",
            labels=["tenant", "sink"],
        )
        url = {(t.slug, s.name): s.url for t in cfg.tenants for s in t.sinks}
        for pair, marked in zip(pairs, gone_found, strict=True):
            st.add_metric(list(pair), states[pair])
            gone.add_metric(
                list(pair), 1 if marked is not None and marked.decode() == url[pair] else 0
            )
        yield st
        yield gone
        yield from _held_chats(ordered, held_found, now)
        yield from _paces(paced, pace_found, now)


def _read_paces(
    client: redis.Redis, keys: Keys, paced: list[tuple[str, str]]
) -> list[list[bytes | None]]:
    """Each paced sink's last promised turn and Retry-After hold (``lua/lib/rate.lua``);
    no read at all when no sink has a ``rate``."""
    if not paced:
        return []
    with client.pipeline(transaction=False) as pipe:
        for tenant, sink in paced:
            pipe.hmget(keys.rate(tenant, sink), ["w", "u"])
        return cast(list[list[bytes | None]], pipe.execute())


def _paces(
    paced: dict[tuple[str, str], float], found: list[list[bytes | None]], now: float
) -> Iterator[GaugeMetricFamily]:
    """Each paced sink's pace now, and how long a delivery put off now waits its turn."""
    limit = GaugeMetricFamily(
        f"{PREFIX}_sink_rate_limit_per_second",
        "A sink's pace (its rate): deliveries it may be sent per second, shared by every "
        "worker; 0 while a Retry-After it answered holds them all back.",
        labels=["tenant", "sink"],
    )
    wait = GaugeMetricFamily(
        f"{PREFIX}_sink_rate_wait_seconds",
        "How far ahead a paced sink's turns are promised: about how long a delivery put "
        "off for its rate now waits (times the rate: about how many wait for a turn).",
        labels=["tenant", "sink"],
    )
    for (pair, rate), (tail, hold) in zip(paced.items(), found, strict=True):
        held = hold is not None and float(hold) / 1000 > now
        limit.add_metric(list(pair), 0.0 if held else rate)
        ahead = float(tail) / 1000 - now if tail is not None else 0.0
        wait.add_metric(list(pair), max(0.0, ahead))
    yield limit
    yield wait


def _held_chats(
    ordered: list[tuple[str, str]], found: list[object], now: float
) -> Iterator[GaugeMetricFamily]:
    """Chats a dead letter holds (``on_dead_letter = "hold"``), per ordered sink."""
    held = GaugeMetricFamily(
        f"{PREFIX}_ordered_chats_held",
        "Chats of an ordered sink whose later events wait on a dead letter (hold).",
        labels=["tenant", "sink"],
    )
    oldest = GaugeMetricFamily(
        f"{PREFIX}_ordered_chat_held_oldest_seconds",
        "How long the longest-held chat of an ordered sink has been waiting.",
        labels=["tenant", "sink"],
    )
    for i, pair in enumerate(ordered):
        count, first = found[2 * i], found[2 * i + 1]
        held.add_metric(list(pair), int(count))  # type: ignore[call-overload]
        since = first[0][1] / 1000 if first else now  # type: ignore[index]
        oldest.add_metric(list(pair), max(0.0, now - since))
    yield held
    yield oldest


def _readable(value: int) -> GaugeMetricFamily:
    return GaugeMetricFamily(
        f"{PREFIX}_delivery_state_readable",
        "1 when this worker read the delivery state (queue, dead letters, breakers) from "
        "Redis for this scrape, 0 when it could not.",
        value=value,
    )
