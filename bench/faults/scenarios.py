"""The fault scenarios. Each runs a fresh relay (:class:`~bench.faults.stack.Stack`), puts
``n`` events through it while something breaks, lets it settle and counts.

Durations follow ``n`` and ``rate``: the load lasts ``n / rate`` seconds and faults are
spread over it, so a small run is a short one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.faults import conditions, pauses
from bench.faults.harness import (
    API_SECRET,
    TENANT,
    WEBHOOK_SECRET,
    backlog,
    dead_letters,
    during,
    envelope,
    spread,
)
from bench.faults.stack import Result, Stack, event_ids


@dataclass(frozen=True)
class Run:
    n: int
    rate: float
    workdir: Path
    mount: bool = True  # scenario 9 may mount a tmpfs (else it fills maxmemory)

    @property
    def load_s(self) -> float:
        return self.n / self.rate

    @property
    def settle_timeout(self) -> float:
        return 120.0 + self.n / 50


Scenario = Callable[[Run, Result], Awaitable[None]]


def _inherited(log: Path) -> str:
    """The most a starting worker found held by others: "in progress/leases"."""
    best = (0, 0)
    with contextlib.suppress(OSError):
        for line in log.read_text(errors="replace").splitlines():
            if "deliveries in progress elsewhere" not in line:
                continue
            with contextlib.suppress(ValueError, KeyError):
                words = json.loads(line)["msg"].split()
                found = (int(words[2]), int(words[8]))
                best = max(best, found)
    return f"{best[0]}/{best[1]}"


async def worker_kills(run: Run, res: Result) -> None:
    """1. The worker SIGKILLed every few seconds under load, restarted each time."""
    stack = Stack(run.workdir)
    try:
        await stack.start()
        ids = event_ids("wk", run.n)

        async def kill() -> None:
            await stack.restart_worker()
            res.restarts += 1

        await during(stack.chert.run(ids, run.rate), spread(run.load_s, 3.0), kill)
        settle = await stack.settle(stack.chert.stats.acked, run.settle_timeout)
        stack.account(res, stack.chert.stats.acked, settle)
        res.notes["inherited_max"] = _inherited(stack.worker.log)
    finally:
        await stack.close()


async def serve_kills(run: Run, res: Result) -> None:
    """2. ``serve`` SIGKILLed mid-burst, restarted."""
    stack = Stack(run.workdir)
    try:
        await stack.start()
        ids = event_ids("sv", run.n)

        async def kill() -> None:
            await stack.restart_serve()
            res.restarts += 1

        times = [run.load_s / 3, 2 * run.load_s / 3]
        await during(stack.chert.run(ids, run.rate), times, kill)
        settle = await stack.settle(stack.chert.stats.acked, run.settle_timeout)
        stack.account(res, stack.chert.stats.acked, settle)
    finally:
        await stack.close()


async def _redis_outage(run: Run, res: Result, *, kill: bool) -> None:
    stack = Stack(run.workdir)
    try:
        await stack.start()
        ids = event_ids("rk" if kill else "rt", run.n)

        async def outage() -> None:
            if kill:
                stack.redis.kill()
            else:
                await stack.redis.stop()
            await asyncio.sleep(1.0)  # down for a moment, under load
            await stack.redis.start()
            res.restarts += 1

        await during(stack.chert.run(ids, run.rate), [run.load_s / 3], outage)
        settle = await stack.settle(stack.chert.stats.acked, run.settle_timeout)
        stack.account(res, stack.chert.stats.acked, settle)
    finally:
        await stack.close()


async def redis_sigterm(run: Run, res: Result) -> None:
    """3. Redis SIGTERMed and restarted under load."""
    await _redis_outage(run, res, kill=False)


async def redis_sigkill(run: Run, res: Result) -> None:
    """4. Redis SIGKILLed, restarted from its AOF."""
    await _redis_outage(run, res, kill=True)


async def sink_flapping(run: Run, res: Result) -> None:
    """5. The sink flaps: 503 and 200 in alternating phases for a while."""
    stack = Stack(run.workdir)
    phase = max(1.0, min(5.0, run.load_s / 6))
    start = time.monotonic()
    flapping_until = start + run.load_s + 2 * phase

    def status() -> int:
        now = time.monotonic()
        if now >= flapping_until:
            return 200
        return 503 if int((now - start) / phase) % 2 == 0 else 200

    stack.sink.status = status
    try:
        await stack.start()
        start = time.monotonic()
        flapping_until = start + run.load_s + 2 * phase
        await stack.chert.run(event_ids("fl", run.n), run.rate)
        await asyncio.sleep(max(0.0, flapping_until - time.monotonic()))
        settle = await stack.settle(stack.chert.stats.acked, run.settle_timeout)
        stack.account(res, stack.chert.stats.acked, settle)
        res.notes["phase_s"] = phase
        res.notes["sink_requests"] = stack.sink.requests
    finally:
        await stack.close()


async def outage_then_replay(run: Run, res: Result) -> None:
    """6. The sink down past its max_age, then ``chert-relay dlq replay --all``."""
    stack = Stack(run.workdir)
    max_age = 5.0
    stack.sink.status = lambda: 503
    try:
        await stack.start(sink={"max_age": max_age})
        await stack.chert.run(event_ids("dl", run.n), run.rate)
        acked = stack.chert.stats.acked
        # Every acked event must end as a dead letter before the sink comes back.
        deadline = time.monotonic() + run.settle_timeout
        while await dead_letters(stack.client) < len(acked) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        res.notes["dead_lettered"] = await dead_letters(stack.client)
        stack.sink.status = lambda: 200
        began = time.monotonic()
        out = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "relay",
                "--config",
                str(stack.config),
                "dlq",
                "replay",
                "--all",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        res.notes["replay_exit"] = out.returncode
        res.notes["replay_said"] = (out.stderr.strip().splitlines() or [""])[-1][:160]
        res.notes["replay_s"] = round(time.monotonic() - began, 1)
        settle = await stack.settle(acked, run.settle_timeout)
        res.notes["dead_letters_after"] = await dead_letters(stack.client)
        stack.account(res, acked, settle)
    finally:
        await stack.close()


async def duplicate_storm(run: Run, res: Result) -> None:
    """7. Each event sent 5 times at once, some copies signed afresh with a new timestamp."""
    stack = Stack(run.workdir)
    try:
        await stack.start()

        async def five(event_id: str) -> None:
            body = envelope(event_id)
            copies = [
                stack.chert.send(event_id, body=body, skew=-k if k % 2 else 0) for k in range(5)
            ]
            await asyncio.gather(*copies)

        await stack.chert.run(event_ids("ds", run.n), run.rate, five)
        settle = await stack.settle(stack.chert.stats.acked, run.settle_timeout)
        stack.account(res, stack.chert.stats.acked, settle)
        res.notes["copies_sent"] = 5 * run.n
    finally:
        await stack.close()


async def webhooks_stop(run: Run, res: Result) -> None:
    """8. Chert's webhooks stop mid-run (the simulator's faults API): polling brings the rest."""
    from relay.simulator import SimTenant, Simulator

    stack = Stack(run.workdir)
    sim = Simulator([SimTenant(slug=TENANT, api_secret=API_SECRET, webhook_secret=WEBHOOK_SECRET)])
    await sim.start(host="127.0.0.1", port=0)
    try:
        poll = {
            "mode": "fallback",
            "interval": 0.5,
            "lapse_after": 3.0,
            "reconcile_every": 30.0,
            "overlap": 30.0,
            "page_size": 200,
        }
        await stack.start(poll=poll, api_url=sim.base_url)
        sim.tenants[TENANT].webhook_url = stack.webhook_url
        logged: list[str] = []
        stop_at = run.n // 3
        async with aiohttp.ClientSession() as http:
            start = time.monotonic()
            for i in range(run.n):
                if i == stop_at:
                    async with http.patch(
                        f"{sim.url}/_sim/faults", json={"webhooks_enabled": False}
                    ) as resp:
                        assert resp.status == 200, resp.status
                delay = start + i / run.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                logged += [r["event_id"] for r in sim.emit(TENANT)]
        pushed = sum(1 for a in sim.webhook_attempts if a.status and 200 <= a.status < 300)
        settle = await stack.settle(set(logged), run.settle_timeout)
        # What Chert logged is what it holds the relay to: everything must arrive.
        stack.account(res, set(logged), settle)
        res.notes["webhooks_acked"] = pushed
        res.notes["status_counts"] = {}
    finally:
        await stack.close()
        await sim.stop()


async def disk_full(run: Run, res: Result) -> None:
    """9. Redis' disk fills up (a small tmpfs), then space returns."""
    base = run.workdir
    base.mkdir(parents=True, exist_ok=True)
    mnt = base / "tmpfs"
    mnt.mkdir(exist_ok=True)
    # 8 MiB, plus room for the AOF of the half of the load that comes after the space
    # returns (about 3 KiB an event, with its job and the delivery's record).
    size_mib = 8 + (run.n * 3) // 1024
    if not run.mount:
        res.notes["mount"] = "not asked for (--no-mount); maxmemory used"
        await _maxmemory_full(run, res)
        return
    mounted = await asyncio.to_thread(
        subprocess.run,
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        res.notes["mount"] = f"not possible ({mounted.stderr.strip()[:80]}); maxmemory used"
        await _maxmemory_full(run, res)
        return
    res.notes["mount"] = f"tmpfs {size_mib}m"
    stack = Stack(base, redis_dir=mnt / "redis")
    try:
        await stack.start()
        used = shutil.disk_usage(mnt)
        ballast = mnt / "ballast"
        # Leave ~128 KB: the disk fills early in the first half of the load.
        _fill(ballast, max(0, used.free - 128 * 1024))
        ids = event_ids("df", run.n)
        half = len(ids) // 2
        refused_before = 0
        # First half: until the disk is full, and on while it is.
        await stack.chert.run(ids[:half], run.rate)
        statuses = dict(stack.chert.stats.statuses)
        refused_before = statuses.get("503", 0) + statuses.get("error", 0)
        res.notes["redis_died"] = not stack.redis.alive()
        # Space returns; Redis' supervisor starts it again whenever it has stopped.
        ballast.unlink()
        supervisor = asyncio.create_task(_supervise(stack, res))
        try:
            await stack.chert.run(ids[half:], run.rate)
            settle = await stack.settle(stack.chert.stats.acked, run.settle_timeout)
        finally:
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
        stack.account(res, stack.chert.stats.acked, settle)
        res.notes["refused_while_full"] = refused_before
        res.duplicates_allowed = bool(res.notes["redis_died"])
    finally:
        await stack.close()
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(mnt)], check=False)


async def _supervise(stack: Stack, res: Result) -> None:
    """Start Redis again whenever it has exited, as systemd's ``Restart=`` would."""
    while True:
        if not stack.redis.alive():
            stack.redis.reap()
            await stack.redis.start()
            res.restarts += 1
        await asyncio.sleep(0.2)


def _fill(path: Path, size: int) -> None:
    chunk = b"\0" * (1 << 20)
    with path.open("wb") as f:
        left = size
        while left > 0:
            n = min(left, len(chunk))
            with contextlib.suppress(OSError):
                f.write(chunk[:n])
            left -= n


async def _maxmemory_full(run: Run, res: Result) -> None:
    stack = Stack(run.workdir / "mm")
    try:
        await stack.start()
        info = await stack.client.info("memory")
        await stack.client.config_set("maxmemory", int(info["used_memory"]) + 512 * 1024)
        ids = event_ids("mm", run.n)
        half = len(ids) // 2
        await stack.chert.run(ids[:half], run.rate)
        statuses = dict(stack.chert.stats.statuses)
        res.notes["refused_while_full"] = statuses.get("503", 0)
        await stack.client.config_set("maxmemory", 0)
        await stack.chert.run(ids[half:], run.rate)
        settle = await stack.settle(stack.chert.stats.acked, run.settle_timeout)
        stack.account(res, stack.chert.stats.acked, settle)
    finally:
        await stack.close()


async def sink_down_backlog(run: Run, res: Result) -> None:
    """10. The sink down for 60 s at 200 events/s (scaled: n / 200 s): backlog, drain, RSS."""
    stack = Stack(run.workdir)
    rate = 200.0
    stack.sink.status = lambda: 503
    try:
        await stack.start()
        await asyncio.sleep(1.0)
        rss_before = stack.worker.rss_kib()
        await stack.chert.run(event_ids("bl", run.n), rate)
        acked = stack.chert.stats.acked
        await asyncio.sleep(1.0)
        size = await backlog(stack.client)
        rss_down = stack.worker.rss_kib()
        stack.sink.status = lambda: 200
        began = time.monotonic()
        settle = await stack.settle(acked, run.settle_timeout)
        drain_s = time.monotonic() - began
        stack.account(res, acked, settle)
        res.notes.update(
            down_s=round(run.n / rate, 1),
            backlog=size,
            drain_per_s=round(res.delivered / drain_s, 1) if drain_s > 0 else None,
            worker_rss_mib_before=round((rss_before or 0) / 1024, 1),
            worker_rss_mib_during=round((rss_down or 0) / 1024, 1),
            worker_rss_mib_after=round((stack.worker.rss_kib() or 0) / 1024, 1),
        )
    finally:
        await stack.close()


SCENARIOS: dict[str, tuple[str, Scenario, bool]] = {
    # key: (title, run, duplicates allowed: a relay process or Redis crashed or stalled,
    # or the sink answered after its timeout)
    "1": ("worker SIGKILL every 3 s under load", worker_kills, True),
    "2": ("serve SIGKILL mid-burst, restarted", serve_kills, True),
    "3": ("Redis SIGTERM + restart under load", redis_sigterm, True),
    "4": ("Redis SIGKILL, restart from AOF", redis_sigkill, True),
    "5": ("sink flapping 503/200", sink_flapping, False),
    "6": ("sink down past max_age, dlq replay --all", outage_then_replay, False),
    "7": ("duplicate storm: 5 copies, some re-signed", duplicate_storm, False),
    "8": ("webhooks stopped mid-run, polling fallback", webhooks_stop, False),
    "9": ("Redis disk full, then space returns", disk_full, False),
    "10": ("sink down n/200 s at 200 events/s", sink_down_backlog, False),
    "11": ("worker paused 15 s (of 2), sink timeout 30 s", pauses.worker_pause_long, True),
    "12": (
        "worker paused 9.5 s, 12 s (of 2), sink timeout 10 s",
        pauses.worker_pause_default_timeout,
        True,
    ),
    "13": ("serve paused 15 s under load", pauses.serve_pause, False),
    "14": ("Redis paused 10 s under load", pauses.redis_pause, True),
    "15": ("Redis full, sink back while full", conditions.full_memory_recovery, False),
    "16": ("sink added, serve reloaded 10 s first", conditions.reload_serve_first, False),
    "17": ("worker clock 10 min behind (of 2)", conditions.worker_clock_behind, False),
    "18": ("worker clock 10 min ahead (of 2)", conditions.worker_clock_ahead, False),
    "19": ("20% of answers after the sink timeout", conditions.late_answers, True),
    "20": ("ordered sinks, worker paused 15 s", pauses.ordered_worker_pause, True),
    "21": ("ordered sinks, worker SIGKILL every 3 s", pauses.ordered_worker_kills, True),
    "22": ("sink paused past max_age, worker killed", conditions.paused_sink, False),
    "23": ("paced and filtered sinks, worker SIGKILL + pause", conditions.paced_and_filtered, True),
}


async def run_one(key: str, run: Run) -> Result:
    title, fn, dups = SCENARIOS[key]
    res = Result(scenario=key, title=title, sent=run.n, duplicates_allowed=dups)
    limit = 2 * run.settle_timeout + 300  # a hang in the suite fails the scenario
    try:
        await asyncio.wait_for(fn(run, res), limit)
    except TimeoutError:
        res.error = f"the scenario did not end within {limit:g}s"
    except Exception as e:
        res.error = f"{type(e).__name__}: {e}"[:200]
    return res


__all__ = ["SCENARIOS", "Run", "run_one"]
