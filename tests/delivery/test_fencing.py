"""Only the run that holds a delivery may change it. A worker paused past its hold (a VM
stun, ``docker pause``, a blocked loop) comes back believing it owns its deliveries; its
finish, retry, release, reschedule and renewal must change nothing another run owns —
at most the sink gets the event twice, never zero times."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis

from relay.config import Config
from relay.delivery.limits import SinkTable
from relay.delivery.steps import STALE, Finish, Go, Steps, Taken
from relay.keys import Keys
from relay.store.eventlog import EventLog
from tests.support.common import TENANT, wait_for
from tests.support.delivery import (
    Received,
    Sink,
    config_with,
    ingest,
    runtime,
    sink_conf,
    sinks,
    worker,
    worker_process,
)

KEYS = Keys("chert-relay")
URL = "http://127.0.0.1:9/"


def steps_for(redis: Redis, cfg: Config) -> tuple[Steps, str]:
    return Steps(redis, KEYS, cfg.worker), SinkTable(cfg, lambda _: True).claim_limits


async def take_one(steps: Steps, limits: str, job_id: str) -> Taken:
    taken, _, _ = await steps.take([job_id], limits, 10, 10_000)
    [job] = taken
    assert isinstance(job.claim, Go), job.claim
    return job


async def gone(redis: Redis, key: str) -> bool:
    return await redis.exists(key) == 0


async def expire_hold(redis: Redis, job_id: str) -> None:
    """What a pause past the hold does: the run's in-progress mark expires."""
    await redis.delete(in_progress_key_prefix + job_id)


async def stale_and_current(
    redis: Redis, redis_url: str, sink_list: list[dict[str, object]]
) -> tuple[Steps, Taken, Steps, Taken, str]:
    """Event "e" ingested; a first run of its delivery to sink "a" taken, its hold
    expired (a pause) and the delivery taken over by a second run: (the stale run's
    steps and job, the current run's, its job id)."""
    cfg = config_with(redis_url, sink_list)
    await ingest(runtime(redis, cfg), ["e"])
    job_a = KEYS.job_id(TENANT, "a", "e")
    first, limits = steps_for(redis, cfg)
    second, _ = steps_for(redis, cfg)
    stale = await take_one(first, limits, job_a)
    await expire_hold(redis, job_a)
    current = await take_one(second, limits, job_a)
    return first, stale, second, current, job_a


async def test_a_stale_ok_finish_releases_nothing(redis: Redis, redis_url: str) -> None:
    cfg = config_with(redis_url, [sink_conf("a", URL), sink_conf("b", URL)])
    rt = runtime(redis, cfg)
    await ingest(rt, ["e"])
    job_a = KEYS.job_id(TENANT, "a", "e")
    first, limits = steps_for(redis, cfg)
    second, _ = steps_for(redis, cfg)
    stale = await take_one(first, limits, job_a)
    await expire_hold(redis, job_a)
    current = await take_one(second, limits, job_a)
    assert stale.ref.token != current.ref.token
    assert await redis.get(in_progress_key_prefix + job_a) == current.ref.token.encode()

    # The stale run's finish comes in while the current run is still attempting: it
    # must not end the delivery, nor take the current run's in-flight slot or mark.
    assert await first.finish(stale.ref, Finish("ok", effect="success")) == STALE
    assert await redis.exists(KEYS.job(job_a)) == 1
    assert await redis.zscore(KEYS.inflight(TENANT, "a"), job_a) is not None
    assert await redis.get(in_progress_key_prefix + job_a) == current.ref.token.encode()

    done = await second.finish(current.ref, Finish("ok", effect="success"))
    assert done.applied
    # ...and once the current run has finished, a stale finish still changes nothing:
    # the event is kept for sink b, whose delivery still needs it.
    assert await first.finish(stale.ref, Finish("ok", effect="success")) == STALE
    assert await redis.exists(KEYS.event(TENANT, "e")) == 1
    job_b = KEYS.job_id(TENANT, "b", "e")
    taken_b = await take_one(second, limits, job_b)
    assert (await second.finish(taken_b.ref, Finish("ok", effect="success"))).applied
    assert await redis.exists(KEYS.event(TENANT, "e")) == 0  # released once per sink


async def test_a_stale_retry_resurrects_nothing(redis: Redis, redis_url: str) -> None:
    first, stale, second, current, job_a = await stale_and_current(
        redis, redis_url, [sink_conf("a", URL)]
    )
    assert (await second.finish(current.ref, Finish("ok", effect="success"))).applied

    retry = Finish("retry", delay_ms=1000, status=503, error="HTTP 503", effect="failure")
    assert await first.finish(stale.ref, retry) == STALE
    assert await first.reschedule(stale.ref, 1000) is False
    assert await first.release(stale.ref) is False
    # Nothing re-created: no queue entry for a job that is gone, no record without expiry.
    assert await redis.zscore(KEYS.queue, job_a) is None
    assert await redis.exists(KEYS.attempts(TENANT, "a", "e")) == 0
    assert await redis.exists(KEYS.job(job_a)) == 0
    assert await redis.exists(in_progress_key_prefix + job_a) == 0
    # the breaker heard only the current run's success, nothing of the stale retry
    assert await redis.hmget(KEYS.breaker(TENANT, "a"), ["cf", "cs"]) == [b"0", b"1"]


async def test_a_stale_run_renews_nothing_and_learns_it_lost_the_hold(
    redis: Redis, redis_url: str
) -> None:
    from relay.delivery.heartbeat import Heartbeat, Running

    cfg = config_with(redis_url, [sink_conf("a", URL)])
    rt = runtime(redis, cfg)
    await ingest(rt, ["e"])
    job_a = KEYS.job_id(TENANT, "a", "e")
    first, limits = steps_for(redis, cfg)
    second, _ = steps_for(redis, cfg)
    stale = await take_one(first, limits, job_a)
    inflight, brk = KEYS.inflight(TENANT, "a"), KEYS.breaker(TENANT, "a")
    running = {job_a: Running(job_a, stale.ref.token, inflight, brk)}
    beat = Heartbeat(redis, running)
    assert await beat.beat() == 1  # its own: renewed
    await expire_hold(redis, job_a)
    current = await take_one(second, limits, job_a)
    mark_ttl = await redis.pttl(in_progress_key_prefix + job_a)
    assert await beat.beat() == 0
    assert running == {}  # dropped: never renewed again
    assert await redis.get(in_progress_key_prefix + job_a) == current.ref.token.encode()
    assert await redis.pttl(in_progress_key_prefix + job_a) <= mark_ttl


async def test_a_finish_of_a_run_that_kept_its_hold_applies(redis: Redis, redis_url: str) -> None:
    cfg = config_with(redis_url, [sink_conf("a", URL)])
    rt = runtime(redis, cfg)
    await ingest(rt, ["e"])
    job_a = KEYS.job_id(TENANT, "a", "e")
    steps, limits = steps_for(redis, cfg)
    run = await take_one(steps, limits, job_a)
    forged = run.ref._replace(token=run.ref.token + "x")
    assert await steps.finish(forged, Finish("ok", effect="success")) == STALE
    assert (await steps.finish(run.ref, Finish("ok", effect="success"))).applied
    assert await redis.exists(KEYS.job(job_a), KEYS.event(TENANT, "e")) == 0


async def test_a_paused_worker_loses_no_event(redis: Redis, redis_url: str, tmp_path: Path) -> None:
    # Worker A (a real process) is frozen (SIGSTOP) with its POST of "e" to sink a in
    # flight, for longer than its hold. Worker B runs that delivery again and finishes it.
    # Then A thaws and gets a 200 for its POST too. Before deliveries were fenced, A's
    # finish released the stored event a second time: sink b's delivery, still retrying,
    # found nothing to deliver and the event was lost for b.
    held = asyncio.Event()
    answer_a = asyncio.Event()
    open_b = asyncio.Event()

    async def sink_a(s: Sink, r: Received) -> tuple[int, dict[str, str]]:
        if r.attempt == 1:
            held.set()
            await answer_a.wait()
        return 200, {}

    delivered_b: list[str] = []

    async def sink_b(s: Sink, r: Received) -> tuple[int, dict[str, str]]:
        if not open_b.is_set():
            return 503, {}
        delivered_b.append(r.event_id)
        return 200, {}

    async with sinks(Sink(sink_a), Sink(sink_b)) as (a, b):
        sink_list = [
            sink_conf("a", a.url, timeout=60),
            sink_conf("b", b.url, timeout=60, max_attempts=1000, max_age=3600),
        ]
        rt = runtime(redis, config_with(redis_url, sink_list))
        await ingest(rt, ["e"])
        async with worker_process(tmp_path, redis_url, sink_list) as proc:
            try:
                await asyncio.wait_for(held.wait(), 30)
                proc.signal(signal.SIGSTOP)
                job_a = KEYS.job_id(TENANT, "a", "e")
                async with worker(rt):
                    # B runs the delivery to a again once A's hold has expired, and ends it.
                    await wait_for(lambda: [r.attempt for r in a.received] == [1, 2], 30)
                    await wait_for(lambda: gone(redis, KEYS.job(job_a)), 10)
                    answer_a.set()  # A's POST is answered 200 while A is still frozen
                    proc.signal(signal.SIGCONT)
                    # A's finish: refused as stale (logged) — or, unfenced, applied
                    event_key = KEYS.event(TENANT, "e")
                    await wait_for(lambda: "not recorded" in proc.log or gone(redis, event_key), 30)
                    open_b.set()
                    await wait_for(lambda: delivered_b == ["e"], 30)
                    # let go once both sinks have it, and only then
                    await wait_for(lambda: gone(redis, KEYS.event(TENANT, "e")), 10)
            finally:
                answer_a.set()  # before the process is told to stop: its POST may hang
    assert "the stored event is gone" not in proc.log
    assert await redis.zcard(KEYS.dead_letters(TENANT)) == 0
    assert await redis.exists(KEYS.attempts(TENANT, "a", "e")) == 0


async def test_a_stale_drop_changes_nothing(redis: Redis, redis_url: str) -> None:
    first, stale, _, _, job_a = await stale_and_current(redis, redis_url, [sink_conf("a", URL)])
    assert await first.finish(stale.ref, Finish("drop")) == STALE
    assert await redis.exists(KEYS.job(job_a), KEYS.event(TENANT, "e")) == 2


async def test_the_event_log_keeps_a_stale_runs_attempt_but_not_its_ending(
    redis: Redis, redis_url: str
) -> None:
    # The stale run did make its request: the record shows it (marked stale — the sink
    # may have the event twice), but only the current run's finish says delivered.
    first, stale, second, current, _ = await stale_and_current(
        redis, redis_url, [sink_conf("a", URL)]
    )
    attempt = '{"ms":12,"st":200,"k":"http","err":"","x":"","src":"webhook"}'
    ok = Finish("ok", effect="success", attempt=attempt)
    assert await first.finish(stale.ref, ok) == STALE
    rec = await EventLog(redis, config_with(redis_url, [sink_conf("a", URL)])).get(TENANT, "e")
    assert rec is not None
    (a,) = rec.sinks
    assert a.state == "in_flight"  # the current run still has it
    assert [(x.n, x.status, x.stale) for x in a.attempts] == [(1, 200, True)]
    failed = '{"ms":30,"st":503,"k":"http","err":"HTTP 503","x":"","src":"webhook"}'
    retry = Finish("retry", delay_ms=60_000, status=503, attempt=failed, effect="failure")
    assert (await second.finish(current.ref, retry)).applied
    rec = await EventLog(redis, config_with(redis_url, [sink_conf("a", URL)])).get(TENANT, "e")
    assert rec is not None
    (a,) = rec.sinks
    assert a.state == "scheduled"
    assert [(x.n, x.status, x.stale) for x in a.attempts] == [(1, 200, True), (2, 503, False)]
