"""Scenarios of hard conditions rather than crashes: Redis at ``maxmemory`` while the
sink comes back, a sink added by a reload that reaches ``serve`` before the worker, a
worker whose clock is ten minutes off, a sink that answers a share of requests
after its timeout, and paced and filtered sinks under worker kills and a pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sys
import time
from typing import TYPE_CHECKING, cast

from bench.faults.harness import (
    PREFIX,
    TENANT,
    backlog,
    dead_letters,
    deliveries_by_outcome,
    during,
    log_count,
    pause,
    skewed_clock,
    spread,
    wait_log,
)
from bench.faults.pauses import QUIET_S
from bench.faults.stack import Result, Stack, event_ids
from relay.keys import Keys

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from bench.faults.scenarios import Run

RELOADED = "configuration reloaded"
PAUSE_S = 6.0  # scenario 23's worker pause


async def full_memory_recovery(run: Run, res: Result) -> None:
    """15. Redis at ``maxmemory`` (``noeviction``) with the sink down; the sink comes back
    while Redis is still full: the backlog must drain and webhooks be accepted again
    without anyone raising ``maxmemory``."""
    stack = Stack(run.workdir)
    down = True
    first_ok: float | None = None

    def status() -> int:
        nonlocal first_ok
        if down:
            return 503
        if first_ok is None:
            first_ok = time.monotonic()
        return 200

    stack.sink.status = status
    try:
        await stack.start()
        info = await stack.client.info("memory")
        # Room for a backlog whose draining frees enough to take webhooks again, beyond
        # what Redis takes for itself once the relay runs (scripts loaded, buffers).
        headroom = 1024 * 1024 + run.n * 256
        await stack.client.config_set("maxmemory", int(info["used_memory"]) + headroom)
        # The load fills Redis (the sink refusing every delivery); what comes after is
        # refused (503, three times each).
        await stack.chert.run(event_ids("fm", run.n), run.rate)
        acked = stack.chert.stats.acked
        refused = stack.chert.stats.statuses.get("503", 0)
        res.notes.update(
            headroom_kib=headroom // 1024,
            acked_before_full=len(acked),
            refused_while_full=refused,
            backlog_while_full=await backlog(stack.client),
        )
        if not refused:
            res.broken.append("Redis never filled up: no webhook was refused")
        # The sink comes back; Redis is left full. A new webhook probes every 0.5 s.
        bound = 20.0 + run.n / 100
        back = time.monotonic()
        down = False
        accepted_at: float | None = None
        probes = accepted = 0
        next_probe = back
        while time.monotonic() - back < bound:
            if time.monotonic() >= next_probe:
                probes += 1
                next_probe += 0.5
                # Accepted again: from the first probe acked after which none was refused
                # (one probe slipping in between refusals is no recovery).
                if await stack.chert.probe(f"chert:msg:fm-probe-{probes:05d}"):
                    accepted += 1
                    accepted_at = accepted_at or time.monotonic()
                else:
                    accepted_at = None
            if accepted_at is not None and not stack.missing(acked):
                with contextlib.suppress(Exception):
                    if await backlog(stack.client) == 0:
                        break
            await asyncio.sleep(0.1)
        done = time.monotonic()
        stack.account(res, acked, done - back)
        res.notes.update(
            bound_s=round(bound, 1),
            sink_back_to_first_delivery_s=_since(back, first_ok),
            sink_back_to_webhooks_accepted_s=_since(back, accepted_at),
            probes_accepted=f"{accepted}/{probes}",
            maxmemory_raised=False,
        )
        if accepted_at is None:
            res.broken.append(f"webhooks not accepted again within {bound:.0f}s, Redis full")
        if res.lost:
            # Only to tell stuck from gone: the guarantee is the figures above.
            stuck = stack.missing(acked)
            await stack.client.config_set("maxmemory", 0)
            res.notes["maxmemory_raised"] = True
            await stack.settle(acked, 30.0, quiet=QUIET_S)
            res.notes["delivered_once_maxmemory_raised"] = len(stuck - stack.missing(acked))
    finally:
        await stack.close()


def _since(start: float, moment: float | None) -> float | None:
    return None if moment is None else round(moment - start, 1)


async def reload_serve_first(run: Run, res: Result) -> None:
    """16. A sink added to the configuration, ``serve`` reloaded (SIGHUP) 10 s before the
    worker: every event taken in after ``serve``'s reload reaches the new sink, and
    nothing is dead-lettered."""
    stack = Stack(run.workdir, sinks=2)
    gap, tail = 10.0, 3.0
    try:
        await stack.start(configured=1)
        ids = event_ids("rl", run.n)
        before, after = ids[: run.n // 4], ids[run.n // 4 :]
        await stack.chert.run(before, run.rate)
        stack.rewrite_config(configured=2)
        seen = log_count(stack.serve.log, RELOADED)
        stack.serve.send_signal(signal.SIGHUP)
        await wait_log(stack.serve.log, RELOADED, seen + 1)
        # What serve takes in from now on goes to both sinks.
        sent_after: set[str] = set(after)

        async def worker_reload() -> None:
            await asyncio.sleep(gap)
            seen = log_count(stack.worker.log, RELOADED)
            stack.worker.send_signal(signal.SIGHUP)
            await wait_log(stack.worker.log, RELOADED, seen + 1)

        rate = len(after) / max(gap + tail, len(after) / run.rate)
        await asyncio.gather(stack.chert.run(after, rate), worker_reload())
        acked = stack.chert.stats.acked
        expect = {"s2": acked & sent_after}
        settle = await stack.settle(acked, run.settle_timeout, expect=expect, quiet=QUIET_S)
        stack.account(res, acked, settle, expect=expect)
        counts = await cast(
            "Awaitable[dict[bytes, bytes]]",
            stack.client.hgetall(Keys(PREFIX).dead_letter_counts(TENANT)),
        )
        dead = {k.decode(): int(v) for k, v in counts.items() if int(v)}
        res.notes.update(serve_ahead_s=gap, after_serve_reload=len(expect["s2"]), dead_letters=dead)
        if dead:
            res.broken.append(f"dead letters after a reload: {dead}")
    finally:
        await stack.close()


async def _skewed_worker(run: Run, res: Result, offset_s: int, tag: str) -> None:
    """Two workers, the second with its clock ``offset_s`` off; the sink's ``concurrency``
    4, its answers 20-80 ms, so that the cap is in play."""
    cap = 4
    stack = Stack(run.workdir, workers=2, skewed=skewed_clock(offset_s))
    stack.sink.delay = lambda: random.uniform(0.02, 0.08)
    rate = min(run.rate, 60.0)  # about what the sink takes at its cap
    try:
        await stack.start(sink={"concurrency": cap})
        await stack.chert.run(event_ids(tag, run.n), rate)
        acked = stack.chert.stats.acked
        settle = await stack.settle(acked, run.settle_timeout, quiet=QUIET_S)
        stack.account(res, acked, settle)
        normal, skewed = [await deliveries_by_outcome(a) for a in stack.worker_admins]
        res.notes.update(
            clock_offset_s=offset_s,
            rate=rate,
            delivered_by_worker={"in_time": normal["delivered"], "skewed": skewed["delivered"]},
            max_concurrent=stack.sink.max_active,
            concurrency=cap,
        )
        if not skewed["delivered"]:
            res.broken.append(f"the worker {offset_s:+d}s off delivered nothing")
        if stack.sink.max_active > cap:
            res.broken.append(
                f"the sink saw {stack.sink.max_active} requests at once, its concurrency {cap}"
            )
    finally:
        await stack.close()


async def worker_clock_behind(run: Run, res: Result) -> None:
    """17. A second worker whose clock is 10 minutes behind (libfaketime)."""
    await _skewed_worker(run, res, -600, "cb")


async def worker_clock_ahead(run: Run, res: Result) -> None:
    """18. A second worker whose clock is 10 minutes ahead (libfaketime)."""
    await _skewed_worker(run, res, 600, "ca")


async def late_answers(run: Run, res: Result) -> None:
    """19. A partly late sink: 20 % of answers come 1 s after the sink's timeout (2 s),
    the rest at once. Counts how often the breaker (the relay's default of 5
    consecutive failures; cooldown 2 s) opened."""
    stack = Stack(run.workdir)
    timeout = 2.0
    late = 0

    def delay() -> float:
        nonlocal late
        if random.random() < 0.2:
            late += 1
            return timeout + 1.0
        return 0.0

    stack.sink.delay = delay
    opened = 0
    # The watcher stops at this flag, not by cancelling it: a cancel that lands inside
    # a Redis command can be taken by the client, and the loop would then run forever.
    stop = asyncio.Event()

    async def watch(key: str) -> None:
        """Count the breaker's openings: each open state with a new reopen time."""
        nonlocal opened
        seen: bytes | None = None
        while not stop.is_set():
            with contextlib.suppress(Exception):
                state, until = await cast(
                    "Awaitable[list[bytes | None]]", stack.client.hmget(key, ["s", "u"])
                )
                if state == b"o" and until != seen:
                    opened += 1
                    seen = until
            await asyncio.sleep(0.1)

    try:
        await stack.start(
            sink={"timeout": timeout, "concurrency": 128}, worker={"breaker_failures": 5}
        )
        watcher = asyncio.ensure_future(watch(Keys(PREFIX).breaker(TENANT, stack.sink.name)))
        try:
            await stack.chert.run(event_ids("la", run.n), run.rate)
            acked = stack.chert.stats.acked
            settle = await stack.settle(acked, run.settle_timeout, quiet=QUIET_S)
        finally:
            stop.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(watcher, return_exceptions=True), 10)
        stack.account(res, acked, settle)
        res.notes.update(
            breaker_opened=opened,
            late_answers=late,
            sink_requests=stack.sink.requests,
            sink_timeout_s=timeout,
        )
    finally:
        await stack.close()


async def _relay_cli(stack: Stack, *args: str) -> int:
    """``chert-relay --config … ARGS`` as the operator runs it; its exit code."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "--config", str(stack.config), *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    return await asyncio.wait_for(proc.wait(), 60)


async def paused_sink(run: Run, res: Result) -> None:
    """22. The sink paused (``chert-relay sinks pause``) a third of the way in, for
    longer than its ``max_age`` (5 s), the worker SIGKILLed and restarted while it is
    paused; then ``sinks resume``: nothing reaches the sink while it is paused, and then
    every event does — none dead-lettered, none expired."""
    stack = Stack(run.workdir)
    max_age = 5.0
    ids = event_ids("pz", run.n)
    third = max(1, run.n // 3)
    try:
        await stack.start(sink={"max_age": max_age})
        await stack.chert.run(ids[:third], run.rate)
        sink = ("--tenant", TENANT, "--sink", "s")
        res.notes["pause_exit"] = await _relay_cli(stack, "sinks", "pause", *sink)
        await asyncio.sleep(1)  # attempts in flight when it was paused finish as they would
        paused_at = sum(stack.sink.delivered.values())
        await stack.chert.run(ids[third:], run.rate)
        await asyncio.sleep(max_age + 1)  # past the deadline of every event taken in
        await stack.restart_worker()  # the pause is in Redis: it outlives the worker
        await stack.ready()
        await asyncio.sleep(2)  # the new worker's sweeps see the paused sink
        while_paused = sum(stack.sink.delivered.values()) - paused_at
        res.notes["delivered_while_paused"] = while_paused
        res.notes["resume_exit"] = await _relay_cli(stack, "sinks", "resume", *sink)
        acked = stack.chert.stats.acked
        settle = await stack.settle(acked, run.settle_timeout, quiet=QUIET_S)
        dead = await dead_letters(stack.client)
        res.notes["dead_letters"] = dead
        if while_paused:
            res.broken.append(f"{while_paused} deliveries reached the sink while it was paused")
        if dead:
            res.broken.append(f"{dead} dead letters: a paused sink's deliveries must not expire")
        if res.notes["pause_exit"] or res.notes["resume_exit"]:
            res.broken.append("chert-relay sinks pause/resume failed")
        stack.account(res, acked, settle)
        res.restarts = 1
    finally:
        await stack.close()


PACED_LOAD_S = 15.0  # scenario 23's load lasts at least this long: kills, a pause, kills
EVEN = [{"event_id": {"$endsWith": d}} for d in "02468"]  # the filtered sink takes these


async def paced_and_filtered(run: Run, res: Result) -> None:
    """23. Beside a plain sink, one paced at 0.6 of the load's rate (``rate``: its
    deliveries wait for their turns, put back in the queue or set aside) and one whose
    ``filter`` takes only events whose id ends in an even digit; the load lasts at
    least 15 s, the worker SIGKILLed every 3 s, and paused (SIGSTOP) 6 s instead at the
    middle moment. Every sink gets every event it takes — the filtered one no other —
    with no dead letter, and the event log agrees."""
    stack = Stack(run.workdir, sinks=3)
    try:
        load_s = max(PACED_LOAD_S, run.load_s)
        rate = run.n / load_s
        pace = f"{max(1, int(rate * 0.6))}/s"
        per_sink = {"s2": {"rate": pace}, "s3": {"filter": {"$or": EVEN}}}
        await stack.start(per_sink=per_sink)
        ids = event_ids("pf", run.n)
        moments = spread(load_s, 3.0)
        acts = iter(range(len(moments)))

        async def fault() -> None:
            if next(acts) == len(moments) // 2:
                await pause(stack.worker.pid, PAUSE_S)
                res.notes["paused_s"] = PAUSE_S
            else:
                await stack.restart_worker()
                res.restarts += 1

        await during(stack.chert.run(ids, rate), moments, fault)
        acked = stack.chert.stats.acked
        even = {e for e in acked if e[-1] in "02468"}
        expect = {"s3": even}
        settle = await stack.settle(acked, run.settle_timeout, expect=expect, quiet=QUIET_S)
        stack.account(res, acked, settle, expect=expect)
        stray = [e for e in stack.sinks[2].delivered if e not in even]
        dead = await dead_letters(stack.client)
        res.notes.update(paced=pace, filtered_in=len(even), stray=len(stray), dead_letters=dead)
        if stray:
            res.broken.append(f"the filtered sink got {len(stray)} event(s) it does not take")
        if dead:
            res.broken.append(f"{dead} dead letter(s)")
    finally:
        await stack.close()
