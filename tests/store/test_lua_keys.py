"""The Lua scripts name a delivery's keys exactly as :class:`relay.keys.Keys` does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from redis.asyncio import Redis

from relay.keys import Keys
from relay.store import scripts

PROBE = Path(__file__).parent / "lua" / "delivery_keys_probe.lua"


@pytest.mark.parametrize("chat", ["chat_9", ""])
async def test_delivery_keys_match_the_python_names(redis: Redis, chat: str) -> None:
    k = Keys("relay-x")
    tenant, sink, event_id = "acme", "crm", "evt_1"
    job_id = k.job_id(tenant, sink, event_id)
    source = "\n".join(
        [scripts.library("keys"), scripts.library("delivery_keys"), PROBE.read_text()]
    )
    raw = await redis.eval(source, 0, k.prefix, k.queue, job_id, tenant, sink, event_id, chat)
    got = json.loads(raw)
    assert got == {
        "ev": k.event(tenant, event_id),
        "attempts": k.attempts(tenant, sink, event_id),
        "breaker": k.breaker(tenant, sink),
        "inflight": k.inflight(tenant, sink),
        "gone": k.sink_gone(tenant, sink),
        "paused": k.paused(tenant, sink),
        "rate": k.rate(tenant, sink),
        "job": k.job(job_id),
        "queue": k.queue,
        "retry": k.job_retry(job_id),
        "in_progress": k.job_in_progress(job_id),
        "entry": k.dead_letter(tenant, sink, event_id),
        "index": k.dead_letters(tenant),
        "counts": k.dead_letter_counts(tenant),
        "chat": k.chat_order(tenant, sink, chat) if chat else "",
        "held": k.held_chats(tenant, sink),
        "wait": k.waiting(tenant, sink),
        "waiting": k.waiting_sinks,
        "member": f"{tenant}:{sink}",
        "att_base": k.attempts(tenant, sink, ""),
        "job_base": k.job_id(tenant, sink, ""),
        "log": k.event_log(tenant, event_id),
        "log_copy": k.event_log_copy(tenant, event_id),
        "log_member": f"{tenant}:{event_id}",
        "log_bytes": k.event_log_bytes,
        "log_index": k.event_log_index,
    }
