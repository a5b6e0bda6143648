"""One take meeting a backlog, script by script (``lua/take.lua`` with ``lib/claim.lua``
and ``lib/wait.lua``): once a sink is found full, the take sets the rest of its
deliveries aside reading only what each delivery's own claim must still check — its
deadline, its attempts, when it is due, a slot reserved for it — and records for each
what a claim always did: its deadline, its place in line, why it waits."""

from __future__ import annotations

from redis.asyncio import Redis

from relay.delivery.limits import SinkTable
from relay.delivery.steps import ASIDE_PER_TAKE, Defer, Ended, Go, Parked, Steps
from relay.keys import Keys
from tests.support.common import TENANT
from tests.support.delivery import config_with, ingest, runtime, sink_conf

KEYS = Keys("chert-relay")
URL = "http://127.0.0.1:9/"
MAX_AGE_MS = 3_600_000


async def test_a_take_sets_a_full_sinks_backlog_aside_and_still_checks_each_delivery(
    redis: Redis, redis_url: str
) -> None:
    cfg = config_with(
        redis_url,
        [
            sink_conf("s", URL, concurrency=3, max_attempts=5, max_age="1h"),
            sink_conf("t", URL, concurrency=100),
        ],
    )
    ids = [f"b{i:02d}" for i in range(20)]
    await ingest(runtime(redis, cfg), ids)
    s_job = {i: KEYS.job_id(TENANT, "s", i) for i in ids}
    att = {i: KEYS.attempts(TENANT, "s", i) for i in ids}
    now_ms = int((await redis.time())[0]) * 1000
    # b05 was handed a slot by the waiting set (a lease of its own in the in-flight set)
    await redis.zadd(KEYS.inflight(TENANT, "s"), {s_job["b05"]: now_ms + 60_000})
    # b07 was tried and is past its deadline; b09 used up its attempts; b11 is not due
    await redis.hset(att["b07"], mapping={"a": 1, "dl": now_ms - 1, "first": now_ms - 5})
    await redis.hset(att["b09"], mapping={"a": 5, "dl": now_ms + MAX_AGE_MS, "first": 1})
    await redis.hset(att["b11"], mapping={"dl": now_ms + MAX_AGE_MS, "due": now_ms + 30_000})
    # the backlog of s and, interleaved, the deliveries of t: read in queue order
    jobs = [j for i in ids for j in (s_job[i], KEYS.job_id(TENANT, "t", i))]
    scores = {i: await redis.zscore(KEYS.queue, s_job[i]) for i in ids}
    steps = Steps(redis, KEYS, cfg.worker)
    taken, _, _ = await steps.take(jobs, SinkTable(cfg, lambda _: True).claim_limits, 100, 10_000)

    got = {t.ref.event_id: t.claim for t in taken if t.ref.sink == "s"}
    assert [i for i in ids if isinstance(got[i], Go)] == ["b00", "b01", "b05"]
    ended = {i: c.reason for i, c in got.items() if isinstance(c, Ended)}
    assert ended == {"b07": "expired", "b09": "exhausted"}
    assert {i: c.reason for i, c in got.items() if isinstance(c, Defer)} == {"b11": "not_due"}
    parked = {i: c.reason for i, c in got.items() if isinstance(c, Parked)}
    aside = [i for i in ids if i in parked]
    assert aside == [i for i in ids if i not in {"b00", "b01", "b05", "b07", "b09", "b11"}]
    assert set(parked.values()) == {"busy"}
    # the other sink's deliveries were not held up by the full one
    assert all(isinstance(t.claim, Go) for t in taken if t.ref.sink == "t")
    assert len([t for t in taken if t.ref.sink == "t"]) == len(ids)

    # each set-aside delivery waits in line in queue order, out of the queue, and holds
    # its first claim's deadline (ingest time + max_age), place and reason
    line = [m.decode() for m in await redis.zrange(KEYS.waiting(TENANT, "s"), 0, -1)]
    assert line == [s_job[i] for i in aside]
    assert await redis.smembers(KEYS.waiting_sinks) == {f"{TENANT}:s".encode()}
    for i in aside:
        assert await redis.zscore(KEYS.queue, s_job[i]) is None
        rec = {k.decode(): v.decode() for k, v in (await redis.hgetall(att[i])).items()}
        ingested = int(await redis.getrange(KEYS.event(TENANT, i), 5, 17))
        assert int(rec["dl"]) == ingested + MAX_AGE_MS
        assert float(rec["ps"]) == scores[i]
        assert rec["pr"] == "busy"
        assert "a" not in rec  # no attempt counted
        assert await redis.ttl(KEYS.job(s_job[i])) == -1  # kept while it waits
    # three slots, three leases: the reserved one taken over, none added past the cap
    assert await redis.zcard(KEYS.inflight(TENANT, "s")) == 3


async def test_a_take_sets_aside_a_bounded_share_and_still_takes_other_sinks_jobs(
    redis: Redis, redis_url: str
) -> None:
    """A backlog larger than one take sets aside is set aside over several takes, each a
    short call; the jobs a take passes over stay in the queue as they were, and the
    other sinks' jobs in the same read, even those behind the backlog, are taken — as is
    one of the backlog's sink that was handed a slot."""
    cfg = config_with(
        redis_url,
        [sink_conf("s", URL, concurrency=2), sink_conf("t", URL, concurrency=100)],
    )
    backlog = [f"b{i:03d}" for i in range(ASIDE_PER_TAKE + 20)]
    fresh = ["n0", "n1"]
    await ingest(runtime(redis, cfg), [*backlog, *fresh])
    s_job = {i: KEYS.job_id(TENANT, "s", i) for i in backlog}
    scores = {i: await redis.zscore(KEYS.queue, s_job[i]) for i in backlog}
    # one far down the backlog was handed a slot by the waiting set: a lease of its own
    handed = backlog[ASIDE_PER_TAKE + 10]
    now_ms = int((await redis.time())[0]) * 1000
    await redis.zadd(KEYS.inflight(TENANT, "s"), {s_job[handed]: now_ms + 60_000})
    # the read: the backlog of s first, t's new deliveries behind it
    jobs = [s_job[i] for i in backlog] + [KEYS.job_id(TENANT, "t", i) for i in fresh]
    steps = Steps(redis, KEYS, cfg.worker)
    limits = SinkTable(cfg, lambda _: True).claim_limits

    taken, _, more = await steps.take(jobs, limits, 100, 10_000)
    assert more  # it passed over some of s's jobs
    got = {t.ref.event_id: t.claim for t in taken if t.ref.sink == "s"}
    # the free slot, and the one handed over, past the bound
    assert [i for i in backlog if isinstance(got.get(i), Go)] == ["b000", handed]
    aside = [i for i in backlog if isinstance(got.get(i), Parked)]
    assert aside == backlog[1 : ASIDE_PER_TAKE + 1]  # in queue order, as many as one take does
    passed = [i for i in backlog[ASIDE_PER_TAKE + 1 :] if i != handed]
    assert not any(i in got for i in passed)
    for i in passed:  # untouched: in the queue at its place, nothing recorded
        assert await redis.zscore(KEYS.queue, s_job[i]) == scores[i]
        assert await redis.exists(KEYS.attempts(TENANT, "s", i)) == 0
    # t's jobs, behind the backlog in the read, went in this same take
    assert {t.ref.event_id for t in taken if t.ref.sink == "t" and isinstance(t.claim, Go)} == {
        *fresh
    }

    # the next take sets the rest aside, behind the first ones in line
    left = [s_job[i] for i in passed]
    taken, _, more = await steps.take(left, limits, 100, 10_000)
    assert not more
    assert all(isinstance(t.claim, Parked) for t in taken)
    line = [m.decode() for m in await redis.zrange(KEYS.waiting(TENANT, "s"), 0, -1)]
    assert line == [s_job[i] for i in backlog[1:] if i != handed]
    assert await redis.zcard(KEYS.inflight(TENANT, "s")) == 2
