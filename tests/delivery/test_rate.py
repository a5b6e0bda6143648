"""A sink's ``rate`` (``lua/lib/rate.lua``): a backlog goes to the sink at its pace,
one pace shared by every worker; waiting for a turn does not use up ``max_age``; a
Retry-After from a paced sink holds every delivery back until the time it names.

The pace is checked where the sink sees it: the arrival times it records. The limiter
lets at most ``rate * w + burst`` deliveries start in any window of ``w`` seconds, the
burst being 1 + max(1, rate * 0.05 s) (README: "A sink's pace")."""

from __future__ import annotations

import time
from pathlib import Path

from redis.asyncio import Redis

from relay.keys import Keys
from relay.runtime import Runtime
from relay.store.backlog import waiting
from relay.store.deadletters import DeadLetterStore, Filter
from tests.delivery.test_clock_skew import skewed
from tests.delivery.test_ordering import ingest_chats
from tests.support.common import TENANT, wait_for
from tests.support.delivery import (
    Behaviour,
    Received,
    Sink,
    config_with,
    drained,
    ingest,
    metric_sum,
    runtime,
    sink_conf,
    sinks,
    worker,
    worker_process,
)

KEYS = Keys("chert-relay")


def burst(rate: float) -> int:
    return 1 + max(1, int(rate * 0.05))


def allowed(rate: float) -> int:
    """The most arrivals the sink may see in one second: the limiter's bound on starts
    (rate + burst), and one more for the way from a start to the sink — a request can
    take up to one interval longer to arrive than the next one's."""
    return int(rate) + burst(rate) + 1


def most_in_a_window(times: list[float], window: float) -> int:
    """The most arrivals in any ``window`` seconds (a window opening at each arrival)."""
    times = sorted(times)
    return max(sum(1 for u in times[i:] if u - t < window) for i, t in enumerate(times))


def _rate_metric(rt: Runtime, name: str) -> float:
    return metric_sum(rt.metrics, f"chert_relay_sink_rate_{name}", sink="s")


async def test_a_backlog_goes_to_the_sink_at_its_rate(redis: Redis, redis_url: str) -> None:
    async with sinks(Sink()) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, rate="5/s", concurrency=8)])
        rt = runtime(redis, cfg)
        ids = [f"r{i:02d}" for i in range(20)]
        await ingest(rt, ids)
        async with worker(rt):
            # the metrics show the pace, and how far ahead turns are promised
            await wait_for(lambda: _rate_metric(rt, "wait_seconds") > 0, 10)
            assert _rate_metric(rt, "limit_per_second") == 5
            await wait_for(lambda: len(s.received) >= len(ids), 30)
            await wait_for(lambda: drained(redis), 10)
            await wait_for(lambda: _rate_metric(rt, "wait_seconds") == 0, 10)
        assert sorted(s.ids()) == ids  # each once
        times = [r.at for r in s.received]
        assert most_in_a_window(times, 1.0) <= allowed(5)
        # the whole backlog was not sent at once: it went a turn at a time
        waits = metric_sum(rt.metrics, "chert_relay_delivery_waits_total", reason="rate")
        assert waits >= len(ids) - burst(5)
        assert metric_sum(rt.metrics, "chert_relay_delivery_waits_total", reason="busy") == 0


async def test_two_worker_processes_share_one_rate(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    async with sinks(Sink()) as (s,):
        sink_list = [sink_conf("s", s.url, rate="10/s", concurrency=8)]
        rt = runtime(redis, config_with(redis_url, sink_list))
        ids = [f"p{i:02d}" for i in range(40)]
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        async with (
            worker_process(tmp_path / "a", redis_url, sink_list),
            worker_process(tmp_path / "b", redis_url, sink_list),
        ):
            await ingest(rt, ids)
            await wait_for(lambda: len(s.received) >= len(ids), 60)
            await wait_for(lambda: drained(redis), 10)
        assert sorted(s.ids()) == ids  # each once
        # one pace for both: a pace of each worker's own would let twice as many by
        assert most_in_a_window([r.at for r in s.received], 1.0) <= allowed(10)


async def test_waiting_for_a_turn_does_not_use_up_max_age(redis: Redis, redis_url: str) -> None:
    # 20 deliveries at 10/s take about 2 s, four times max_age: none may expire for it.
    async with sinks(Sink()) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, rate="10/s", max_age=0.5)])
        rt = runtime(redis, cfg)
        ids = [f"m{i:02d}" for i in range(20)]
        await ingest(rt, ids)
        async with worker(rt):
            await wait_for(lambda: len(set(s.ids())) == len(ids), 30)
            await wait_for(lambda: drained(redis), 10)
        assert sorted(s.ids()) == ids
        assert await DeadLetterStore(redis, cfg).find(Filter()) == []
        assert most_in_a_window([r.at for r in s.received], 1.0) <= allowed(10)


def busy_once(said: list[float], retry_after: str) -> Behaviour:
    """A sink's first answer 429 with ``Retry-After`` (its time in ``said``), then 200s."""

    def reply(_s: Sink, r: Received) -> tuple[int, dict[str, str]]:
        if not said:
            said.append(r.at)
            return 429, {"Retry-After": retry_after}
        return 200, {}

    return reply


async def test_a_retry_after_holds_a_paced_sink_back_until_the_time_it_names(
    redis: Redis, redis_url: str
) -> None:
    said: list[float] = []
    async with sinks(Sink(busy_once(said, "2"))) as (s,):
        # one in flight at a time: no request can be on its way while the 429 is answered
        cfg = config_with(
            redis_url, [sink_conf("s", s.url, rate="10/s", concurrency=1)], retry_backoff=0.05
        )
        rt = runtime(redis, cfg)
        ids = [f"h{i:02d}" for i in range(10)]
        await ingest(rt, ids)
        async with worker(rt):
            await wait_for(lambda: bool(said), 10)
            # while the hold lasts, the sink's pace reads 0
            await wait_for(lambda: _rate_metric(rt, "limit_per_second") == 0, 10)
            await wait_for(lambda: len(set(s.ids())) == len(ids), 30)
            await wait_for(lambda: drained(redis), 10)
            assert _rate_metric(rt, "limit_per_second") == 10
        after = [r.at - said[0] for r in s.received[1:]]
        # nothing before the time it named (Redis' clock counts whole ms: 2 ms of slack)
        assert min(after) >= 2.0 - 0.002, after
        assert most_in_a_window([r.at for r in s.received[1:]], 1.0) <= allowed(10)


async def test_a_sink_without_a_rate_is_not_held_by_a_retry_after(
    redis: Redis, redis_url: str
) -> None:
    async with sinks(Sink(busy_once([], "30"))) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, concurrency=1)])
        rt = runtime(redis, cfg)
        await ingest(rt, ["a", "b", "c"])
        async with worker(rt):
            # the others go on at once; only the delivery answered 429 waits
            await wait_for(lambda: len(s.received) >= 3, 20)
        assert await redis.exists(KEYS.rate(TENANT, "s")) == 0


async def test_a_deep_backlog_waits_set_aside_and_a_reload_to_a_higher_rate_reaches_it(
    redis: Redis, redis_url: str
) -> None:
    async with sinks(Sink()) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, rate="5/s")])
        rt = runtime(redis, cfg)
        ids = [f"d{i:02d}" for i in range(40)]
        await ingest(rt, ids)
        async with worker(rt) as role:
            # turns are promised two seconds ahead at most: the rest waits set aside
            await wait_for(lambda: waiting(redis, KEYS), 10)
            await wait_for(lambda: len(s.received) >= 3, 10)
            reloaded = len(s.received)
            role.reload(config_with(redis_url, [sink_conf("s", s.url, rate="100/s")]))
            await wait_for(lambda: len(s.received) >= len(ids), 30)
            await wait_for(lambda: drained(redis), 10)
        assert sorted(s.ids()) == ids  # none lost, none twice
        before = [r.at for r in s.received[:reloaded]]
        after = [r.at for r in s.received[reloaded:]]
        assert most_in_a_window(before, 1.0) <= allowed(5)
        # at 5/s no second could see more than allowed(5); at the new rate one does
        assert most_in_a_window(after, 1.0) > allowed(5)
        assert most_in_a_window(after, 1.0) <= allowed(100)


async def test_an_ordered_paced_sink_keeps_each_chats_order(redis: Redis, redis_url: str) -> None:
    async with sinks(Sink()) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, rate="10/s", ordering="chat")])
        rt = runtime(redis, cfg)
        chats = ["c1", "c2", "c3"]
        await ingest_chats(rt, chats, 8)
        async with worker(rt):
            await wait_for(lambda: len(s.received) >= 24, 30)
            await wait_for(lambda: drained(redis), 10)
        got: dict[str, list[int]] = {c: [] for c in chats}
        for r in s.received:
            got[r.event_id.split(":")[1]].append(int(r.event_id.rsplit(":", 1)[1]))
        assert got == {c: list(range(8)) for c in chats}  # each once, in order
        assert most_in_a_window([r.at for r in s.received], 1.0) <= allowed(10)


async def test_a_worker_with_a_skewed_clock_keeps_the_shared_pace(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    # Turns and tokens are Redis' clock: a worker 10 minutes ahead neither takes turns
    # early nor finds every turn long past (which would let the backlog go at once).
    async with sinks(Sink()) as (s,):
        sink_list = [sink_conf("s", s.url, rate="10/s")]
        rt = runtime(redis, config_with(redis_url, sink_list))
        ids = [f"k{i:02d}" for i in range(30)]
        async with (
            worker_process(tmp_path, redis_url, sink_list, env=skewed("+600s")),
            worker(rt),
        ):
            await ingest(rt, ids)
            await wait_for(lambda: len(s.received) >= len(ids), 60)
            await wait_for(lambda: drained(redis), 10)
        assert sorted(s.ids()) == ids
        assert most_in_a_window([r.at for r in s.received], 1.0) <= allowed(10)


async def test_a_reload_to_a_lower_rate_holds_at_once(redis: Redis, redis_url: str) -> None:
    async with sinks(Sink()) as (s,):
        cfg = config_with(redis_url, [sink_conf("s", s.url, rate="20/s")])
        rt = runtime(redis, cfg)
        ids = [f"l{i:02d}" for i in range(24)]
        await ingest(rt, ids)
        async with worker(rt) as role:
            await wait_for(lambda: len(s.received) >= 4, 10)
            role.reload(config_with(redis_url, [sink_conf("s", s.url, rate="5/s")]))
            reloaded = time.monotonic()
            await wait_for(lambda: len(s.received) >= len(ids), 30)
            await wait_for(lambda: drained(redis), 10)
        assert sorted(s.ids()) == ids  # none lost, none twice
        # turns promised at 20/s are checked against the new pace when they come: from a
        # moment after the reload (requests already on their way), the sink sees 5/s
        after = [r.at for r in s.received if r.at > reloaded + 0.2]
        assert len(after) >= 10
        assert most_in_a_window(after, 1.0) <= allowed(5)
