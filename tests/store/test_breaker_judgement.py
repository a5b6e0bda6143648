"""The breaker's judgement (``lua/lib/breaker.lua``), driven with chosen times: a failure
*rate* over a window opens it, not a run of consecutive failures; only the half-open
probe's answer closes or re-opens it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from redis.asyncio import Redis

from relay.store import scripts

PROBE = Path(__file__).parent / "lua" / "breaker_probe.lua"
WINDOW = 30_000
COOLDOWN = 1_000
KEY = "chert-relay:breaker:acme:s"
T0 = 1_800_000_000_000 // WINDOW * WINDOW  # the start of a bucket


class Breaker:
    """One breaker hash, driven through the Lua functions with chosen times."""

    def __init__(
        self, redis: Redis, min_failures: int = 5, rate: float = 0.5, key: str = KEY
    ) -> None:
        self._redis = redis
        self.key = key
        self._rule = json.dumps([min_failures, rate, WINDOW])
        self._source = "\n".join([scripts.library("breaker"), PROBE.read_text()])

    async def _call(self, *args: object) -> object:
        return await self._redis.eval(self._source, 1, self.key, *args)  # type: ignore[arg-type]

    async def record(self, now: int, effect: str, job: str = "j") -> str:
        got = await self._call("record", now, job, effect, self._rule, COOLDOWN, 86_400_000)
        return got.decode() if isinstance(got, bytes) else str(got)

    async def batch(self, now: int, effects: list[tuple[str, str]]) -> list[str]:
        """Record ``effects`` (job, effect) in one call, through a tally, as a finish
        batch does."""
        args = ("batch", now, "", json.dumps(effects), self._rule, COOLDOWN, 86_400_000)
        got = await self._call(*args)
        assert isinstance(got, list)
        return [c.decode() if isinstance(c, bytes) else str(c) for c in got]

    async def check(self, now: int, job: str = "j") -> str:
        got = await self._call("check", now, job)
        assert isinstance(got, list)
        return str(got[0].decode())

    async def take_probe(self, now: int, job: str) -> None:
        await self._call("take_probe", now, job)

    async def state(self) -> bytes | None:
        return await self._redis.hget(self.key, "s")


@pytest.mark.parametrize(
    "start",
    [T0 + 10_000, T0 - 20],  # within a bucket; across a bucket's end (two before, three after)
)
async def test_a_sink_failing_every_attempt_opens_at_the_minimum_of_failures(
    redis: Redis, start: int
) -> None:
    b = Breaker(redis)
    changes = [await b.record(start + i * 10, "failure") for i in range(5)]
    assert changes == ["", "", "", "", "open 5 5"]
    assert await b.state() == b"o"
    assert await b.check(start + 100) == "open"


async def test_timeouts_of_a_minority_ending_together_never_open_it(redis: Redis) -> None:
    # Every fifth request answers too late, and their timeouts end together: in finish
    # order, runs of 8 failures after 32 successes, for 5 windows. A run of consecutive
    # failures would have opened it at the first run; a rate of 20% never does.
    b = Breaker(redis)
    now = T0 + 1_000
    for _ in range(25):
        for effect in ["success"] * 32 + ["failure"] * 8:
            assert await b.record(now, effect) == ""
            now += 150
    assert await b.state() is None


async def test_a_majority_of_failures_opens_it(redis: Redis) -> None:
    b = Breaker(redis)
    now, changes = T0 + 1_000, []
    for effect in ["success", "failure", "failure"] * 4:
        changes.append(await b.record(now, effect))
        now += 100
    # the 5th failure is the 8th attempt: 5 of 8 failed
    assert changes[7] == "open 5 8"
    assert changes[:7] == [""] * 7


async def test_the_window_forgets_what_it_no_longer_covers(redis: Redis) -> None:
    b = Breaker(redis)
    for i in range(4):
        assert await b.record(T0 + 1_000 + i, "failure") == ""
    # Two windows on, those four no longer count.
    assert await b.record(T0 + 2 * WINDOW + 1_000, "failure") == ""
    # Three more beside it; then one 3 s into the next bucket: the four of the bucket
    # before count for the share of it the window still covers (0.9: 3.6), and with
    # this one that rounds to 5.
    for i in range(3):
        assert await b.record(T0 + 2 * WINDOW + 1_100 + i, "failure") == ""
    assert await b.record(T0 + 3 * WINDOW + 3_000, "failure") == "open 5 5"


async def test_only_the_probes_answer_closes_or_reopens_it(redis: Redis) -> None:
    b = Breaker(redis)
    now = T0 + 1_000
    for i in range(5):
        await b.record(now + i, "failure", job=f"j{i}")
    assert await b.state() == b"o"
    # Open: attempts that were in flight end, either way, and change nothing.
    assert await b.record(now + 10, "success", job="late1") == ""
    assert await b.record(now + 11, "failure", job="late2") == ""
    assert await b.state() == b"o"
    # After the cooldown one job becomes the probe; the others wait.
    after = now + 4 + COOLDOWN
    assert await b.check(after, "p1") == "probe"
    await b.take_probe(after, "p1")
    assert await b.check(after + 1, "other") == "half"
    assert await b.record(after + 2, "success", job="late3") == ""
    assert await b.state() == b"h"
    # The probe fails: open again, for another cooldown.
    assert await b.record(after + 100, "failure", job="p1") == "reopen"
    assert await b.state() == b"o"
    assert await b.check(after + 101, "p2") == "open"
    again = after + 100 + COOLDOWN
    assert await b.check(again, "p2") == "probe"
    await b.take_probe(again, "p2")
    # The next probe succeeds: closed, with a fresh window (its own success only).
    assert await b.record(again + 50, "success", job="p2") == "close"
    assert await b.state() is None
    fields = await redis.hmget(KEY, ["cf", "cs", "pf", "ps"])
    assert fields == [b"0", b"1", b"0", b"0"]
    for i in range(4):
        assert await b.record(again + 100 + i, "failure") == ""


BATCHES = [
    # successes only, then a minority of failures among them: it stays closed
    ([["success"] * 6, ["success", "failure", "success", "success", "failure", "success"]], None),
    # opened in the middle of a batch, with a success after that the open breaker ignores
    (
        [
            ["failure", "success", "failure", "failure"],
            ["success", "failure", "failure", "success"],
        ],
        b"o",
    ),
    ([["success", "failure"] * 3, ["failure"] * 3 + ["success"] * 3], b"o"),
]


@pytest.mark.parametrize(("batches", "state"), BATCHES)
async def test_a_batch_counts_its_successes_once_and_judges_as_one_at_a_time(
    redis: Redis, batches: list[list[str]], state: bytes | None
) -> None:
    # A finish batch counts a closed breaker's successes once, at the end of its call;
    # every change and every count must be what recording them one by one gives.
    tallied = Breaker(redis, key=KEY + ":tallied")
    one = Breaker(redis, key=KEY + ":one")
    now = T0 + WINDOW - 2_000  # the second batch falls in the next bucket
    for effects in batches:
        jobs = [(f"j{now}.{n}", e) for n, e in enumerate(effects)]
        got = await tallied.batch(now, jobs)
        expected = [await one.record(now, e, job=j) for j, e in jobs]
        assert got == expected
        assert await redis.hgetall(tallied.key) == await redis.hgetall(one.key)
        assert await redis.pttl(tallied.key) > 0
        now += 3_000
    assert await tallied.state() == state


async def test_a_batch_writes_a_closed_breakers_successes_once(redis: Redis) -> None:
    tallied = Breaker(redis, key=KEY + ":tallied")
    await redis.config_resetstat()
    assert await tallied.batch(T0 + 1_000, [(f"j{n}", "success") for n in range(8)]) == [""] * 8
    stats = await redis.info("commandstats")
    assert stats["cmdstat_hset"]["calls"] == 1
    assert await redis.hmget(tallied.key, ["cf", "cs"]) == [b"0", b"8"]
