"""Per-chat ordered delivery (``ordering = "chat"``): the events of one chat reach the sink
one at a time, in the order the relay took them in — across retries, timeouts, breaker
deferrals and worker crashes — while other chats go on in parallel; a dead letter skips
or holds its chat as the sink says."""

from __future__ import annotations

import asyncio
import json
import random
import signal
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from relay.ingest import envelope
from relay.keys import Keys
from relay.runtime import Runtime
from relay.store.deadletters import DeadLetter, DeadLetterStore, Filter
from tests.support.common import TENANT, metric_sample, wait_for
from tests.support.common import envelope as make_envelope
from tests.support.delivery import (
    Received,
    Sink,
    config_with,
    runtime,
    sink_conf,
    sinks,
    worker,
    worker_config_file,
)
from tests.support.process import RelayProcess

KEYS = Keys("chert-relay")


def chat_event(chat: str | None, n: int, prefix: str = "ev") -> envelope.Event:
    body = make_envelope(f"{prefix}:{chat}:{n:04d}")
    if chat is None:
        del body["data"]["chat"]
    else:
        body["data"]["chat"]["id"] = chat
    return envelope.from_object(body)


async def ingest_chats(rt: Runtime, chats: list[str], per_chat: int, prefix: str = "ev") -> None:
    """The events of every chat, taken in chat by chat order (n = 0, 1, …)."""
    for n in range(per_chat):
        await asyncio.gather(
            *(rt.ingestor.ingest(TENANT, chat_event(c, n, prefix), "webhook") for c in chats)
        )


@dataclass
class Ledger:
    """What the sink saw, per chat: every request in arrival order, and a global clock
    ticking at each arrival and at each 2xx answer, to tell which came first."""

    clock: int = 0
    requests: dict[str, list[tuple[int, int, int]]] = field(
        default_factory=lambda: defaultdict(list)
    )  # chat -> (n, arrived at, answered 2xx at or -1)

    def count(self) -> int:
        return sum(len(v) for v in self.requests.values())

    def arrive(self, got: Received) -> tuple[str, int, int]:
        self.clock += 1
        event_id = got.event_id
        chat, n = event_id.split(":")[1], int(event_id.rsplit(":", 1)[1])
        self.requests[chat].append((n, self.clock, -1))
        return chat, n, len(self.requests[chat]) - 1

    def answered(self, chat: str, index: int) -> None:
        self.clock += 1
        n, arrived, _ = self.requests[chat][index]
        self.requests[chat][index] = (n, arrived, self.clock)

    def check(self, chats: list[str], per_chat: int) -> None:
        for chat in chats:
            reqs = self.requests[chat]
            seen = [n for n, _, _ in reqs]
            assert seen == sorted(seen), f"chat {chat}: out of order: {seen}"
            ok = {n for n, _, done in reqs if done >= 0}
            assert ok == set(range(per_chat)), f"chat {chat}: missing {set(range(per_chat)) - ok}"
            for n, arrived, _ in reqs:
                if n == 0:
                    continue
                first_ok = min(done for m, _, done in reqs if m == n - 1 and done >= 0)
                assert first_ok < arrived, f"chat {chat}: {n} came before {n - 1} got a 2xx"


def flaky(ledger: Ledger, rng: random.Random, *, fail: float, hang: float = 0.0) -> Any:
    async def answer(sink: Sink, got: Received) -> tuple[int, dict[str, str]]:
        chat, _, index = ledger.arrive(got)
        roll = rng.random()
        if roll < hang:
            await asyncio.sleep(1.0)  # past the sink's timeout: the relay gives up on it
            return 200, {}
        if roll < fail:
            return 503, {}
        ledger.answered(chat, index)
        return 200, {}

    return answer


async def test_chats_arrive_in_order_through_a_sink_that_fails_30_percent(
    redis: Redis, redis_url: str
) -> None:
    ledger, rng = Ledger(), random.Random(7)
    chats = [f"c{i:03d}" for i in range(200)]
    async with sinks(Sink(flaky(ledger, rng, fail=0.3, hang=0.02))) as (s,):
        cfg = config_with(
            redis_url,
            [
                sink_conf(
                    "s", s.url, ordering="chat", concurrency=200, timeout=0.3, max_attempts=1000
                )
            ],
            max_jobs=200,
            retry_backoff=0.02,
            retry_backoff_max=0.1,
        )
        rt = runtime(redis, cfg)
        await ingest_chats(rt, chats, 50)
        async with worker(rt):
            await wait_for(lambda: _all_ok(ledger, chats, 50), 300)
    ledger.check(chats, 50)
    assert await redis.keys(KEYS.chat_order(TENANT, "s", "*")) == []  # nothing left behind


def _all_ok(ledger: Ledger, chats: list[str], per_chat: int) -> bool:
    return all(
        len({n for n, _, done in ledger.requests[c] if done >= 0}) == per_chat for c in chats
    )


async def test_other_chats_go_on_while_one_chats_request_hangs(
    redis: Redis, redis_url: str
) -> None:
    release = asyncio.Event()

    async def answer(sink: Sink, got: Received) -> tuple[int, dict[str, str]]:
        if got.event_id == "ev:stuck:0000":
            await release.wait()
        return 200, {}

    async with sinks(Sink(answer)) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, ordering="chat", timeout=30)])
        rt = runtime(redis, cfg)
        await ingest_chats(rt, ["stuck", "a", "b", "c"], 5)
        async with worker(rt):
            others = {f"ev:{c}:{n:04d}" for c in "abc" for n in range(5)}
            await wait_for(lambda: others <= set(s.ids()), 30)
            assert [i for i in s.ids() if i.startswith("ev:stuck")] == ["ev:stuck:0000"]
            release.set()
            await wait_for(lambda: len([i for i in s.ids() if "stuck" in i]) == 5, 30)
    stuck = [i for i in s.ids() if "stuck" in i]
    assert stuck == [f"ev:stuck:{n:04d}" for n in range(5)]


async def test_events_without_a_chat_are_delivered_unordered(redis: Redis, redis_url: str) -> None:
    async with sinks(Sink()) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, ordering="chat")])
        rt = runtime(redis, cfg)
        for n in range(5):
            await rt.ingestor.ingest(TENANT, chat_event(None, n), "webhook")
        # all five are in the queue at once: none waits on another
        assert await redis.zcard(KEYS.queue) == 5
        async with worker(rt):
            await wait_for(lambda: len(set(s.ids())) == 5, 20)


def reject_one(bad: str, accept: asyncio.Event) -> Any:
    async def answer(sink: Sink, got: Received) -> tuple[int, dict[str, str]]:
        if got.event_id == bad and not accept.is_set():
            return 400, {}
        return 200, {}

    return answer


@pytest.mark.parametrize("action", ["replay", "purge"])
async def test_hold_keeps_the_chat_until_its_dead_letter_is_replayed_or_purged(
    redis: Redis, redis_url: str, action: str
) -> None:
    accept = asyncio.Event()
    async with sinks(Sink(reject_one("ev:a:0001", accept))) as (s,):
        sink = sink_conf("s", s.url, ordering="chat", on_dead_letter="hold")
        cfg = config_with(redis_url, [sink])
        rt = runtime(redis, cfg)
        await ingest_chats(rt, ["a", "b"], 4)
        async with worker(rt) as role:
            b_all = {f"ev:b:{n:04d}" for n in range(4)}
            await wait_for(lambda: b_all <= set(s.ids()), 20)
            store = DeadLetterStore(redis, cfg)
            found = await wait_for(lambda: store.find(Filter(tenant=TENANT)), 20)
            assert [(d.event_id, d.chat, d.holds_chat) for d in found] == [("ev:a:0001", "a", True)]
            # a's later events wait, also one that arrives now
            await rt.ingestor.ingest(TENANT, chat_event("a", 4), "webhook")
            assert await redis.lrange(KEYS.chat_order(TENANT, "s", "a"), 0, -1) == [
                f"ev:a:{n:04d}".encode() for n in (1, 2, 3, 4)
            ]
            assert [i for i in s.ids() if i.startswith("ev:a")] == ["ev:a:0000", "ev:a:0001"]
            scraped = role.metrics.render().decode()
            assert 'chert_relay_ordered_chats_held{sink="s",tenant="acme-7a3f"} 1.0' in scraped

            def held_for() -> float:
                scraped = role.metrics.render().decode()
                return metric_sample(scraped, "chert_relay_ordered_chat_held_oldest_seconds")

            await wait_for(lambda: 0 < held_for() < 60, 10)  # since the dead letter
            # waiting behind the dead letter, nothing of the chat expires
            assert await redis.pttl(KEYS.chat_order(TENANT, "s", "a")) == -1
            assert await redis.pttl(Keys.job(KEYS.job_id(TENANT, "s", "ev:a:0002"))) == -1
            accept.set()
            if action == "replay":
                assert len((await store.replay(Filter(tenant=TENANT))).done) == 1
                expected = [f"ev:a:{n:04d}" for n in (0, 1, 1, 2, 3, 4)]
            else:
                assert len((await store.purge(Filter(tenant=TENANT))).done) == 1
                expected = [f"ev:a:{n:04d}" for n in (0, 1, 2, 3, 4)]
            await wait_for(
                lambda: len([i for i in s.ids() if i.startswith("ev:a")]) == len(expected), 20
            )
            assert [i for i in s.ids() if i.startswith("ev:a")] == expected
            scraped = role.metrics.render().decode()
            assert 'chert_relay_ordered_chats_held{sink="s",tenant="acme-7a3f"} 0.0' in scraped
            assert held_for() == 0
    assert await redis.exists(KEYS.chat_order(TENANT, "s", "a")) == 0


async def test_skip_delivers_the_rest_of_the_chat_and_a_replay_joins_its_end(
    redis: Redis, redis_url: str
) -> None:
    accept = asyncio.Event()
    async with sinks(Sink(reject_one("ev:a:0001", accept))) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, ordering="chat")])
        rt = runtime(redis, cfg)
        await ingest_chats(rt, ["a"], 4)
        async with worker(rt):
            await wait_for(lambda: "ev:a:0003" in s.ids(), 20)
            assert s.ids() == [f"ev:a:{n:04d}" for n in (0, 1, 2, 3)]
            store = DeadLetterStore(redis, cfg)
            [d] = await store.find(Filter(tenant=TENANT))
            assert (d.chat, d.holds_chat) == ("a", False)
            accept.set()
            assert len((await store.replay(Filter(tenant=TENANT))).done) == 1
            await wait_for(lambda: len(s.ids()) == 5, 20)
            assert s.ids()[-1] == "ev:a:0001"


async def test_a_replayed_event_waits_behind_what_its_chat_still_has(
    redis: Redis, redis_url: str
) -> None:
    accept, release = asyncio.Event(), asyncio.Event()

    async def answer(sink: Sink, got: Received) -> tuple[int, dict[str, str]]:
        if got.event_id == "ev:a:0000" and not accept.is_set():
            return 400, {}
        if got.event_id == "ev:a:0001":
            await release.wait()
        return 200, {}

    async with sinks(Sink(answer)) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, ordering="chat", timeout=30)])
        rt = runtime(redis, cfg)
        await ingest_chats(rt, ["a"], 3)
        async with worker(rt):
            await wait_for(lambda: "ev:a:0001" in s.ids(), 20)  # 0 dead, 1 in flight
            accept.set()
            store = DeadLetterStore(redis, cfg)
            assert len((await store.replay(Filter(tenant=TENANT))).done) == 1
            release.set()
            await wait_for(lambda: len(s.ids()) == 4, 20)
    assert s.ids() == ["ev:a:0000", "ev:a:0001", "ev:a:0002", "ev:a:0000"]


async def test_order_holds_when_workers_are_killed_again_and_again(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    ledger, rng = Ledger(), random.Random(11)
    chats = [f"k{i:02d}" for i in range(20)]
    async with sinks(Sink(flaky(ledger, rng, fail=0.3))) as (s,):
        sink = sink_conf("s", s.url, ordering="chat", max_attempts=1000, timeout=2)
        path = worker_config_file(
            tmp_path, redis_url, [sink], max_jobs=20, retry_backoff=0.02, retry_backoff_max=0.1
        )
        rt = runtime(redis, config_with(redis_url, [sink]))
        await ingest_chats(rt, chats, 20)
        kills = 0
        for proc in _workers(path):
            if _all_ok(ledger, chats, 20) or kills >= 5:
                proc.signal(signal.SIGTERM)
                await proc.wait(30)
                break
            # let it deliver a little, then kill it mid-flight
            start = ledger.count()
            await wait_for(lambda start=start: ledger.count() > start + 40, 60)
            proc.kill()
            kills += 1
        async with worker(rt):
            await wait_for(lambda: _all_ok(ledger, chats, 20), 180)
    assert kills == 5
    ledger.check(chats, 20)


def _workers(path: Path) -> Iterator[RelayProcess]:
    """Worker processes on ``path``, one after the other (no admin listener)."""
    while True:
        yield RelayProcess(path, "worker", "--admin-listen", "off").start()


def test_the_dead_letter_says_which_chat_it_holds() -> None:
    d = DeadLetter(TENANT, "s", "e", "t", "exhausted", 503, "x", 3, 1.0, 2.0, 3.0, "a", True)
    assert json.loads(json.dumps(d.to_json()))["holds_chat"] is True
