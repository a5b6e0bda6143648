"""The fault suite's own machinery (bench/faults): its verdict, what each scenario is
held to, the sink's and the clock's instruments, and a small real run.

The full suite runs every scenario at about 1,000 events in CI (``make faults-ci``, part
of ``make ci``); here one scenario at a few dozen events shows the parts fit together:
real ``serve`` and ``worker`` processes, a real redis-server, a signing load generator
and a counting sink.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from bench.faults.__main__ import table
from bench.faults.harness import CountingSink, libfaketime, skewed_clock, tcp_ports
from bench.faults.pauses import order_breaks
from bench.faults.scenarios import SCENARIOS, Run, run_one
from bench.faults.stack import Result

# Every scenario is held to 0 lost; these may deliver an event twice, as the guarantee
# allows when a process or Redis crashed or stalled with deliveries in flight, or the
# sink answered after its timeout. The rest must deliver each event exactly once.
DUPLICATES_ALLOWED = {
    "1": True,  # worker SIGKILL
    "2": True,  # serve SIGKILL
    "3": True,  # Redis SIGTERM
    "4": True,  # Redis SIGKILL
    "5": False,  # sink flapping
    "6": False,  # dlq replay
    "7": False,  # duplicate storm
    "8": False,  # polling fallback
    "9": False,  # disk full (duplicates only if Redis died: decided at run time)
    "10": False,  # sink down, backlog
    "11": True,  # worker paused 15 s, sink timeout 30 s
    "12": True,  # worker paused 9.5 s and 12 s, default sink timeout
    "13": False,  # serve paused: it holds no delivery
    "14": True,  # Redis paused
    "15": False,  # Redis at maxmemory, sink back while full
    "16": False,  # sink added, serve reloaded first
    "17": False,  # a worker's clock behind
    "18": False,  # a worker's clock ahead
    "19": True,  # answers after the sink timeout
    "20": True,  # ordered sinks, worker paused
    "21": True,  # ordered sinks, worker kills
    "22": False,  # sink paused past max_age, worker killed while nothing is in flight
    "23": True,  # paced and filtered sinks, worker SIGKILL and pause
}


def test_a_loss_or_an_unexpected_duplicate_fails_the_scenario() -> None:
    assert Result("5", "t", acked=10, delivered=10).ok
    assert not Result("5", "t", acked=10, delivered=9, lost=1).ok
    assert not Result("5", "t", acked=10, delivered=10, duplicates=1).ok
    assert Result("1", "t", acked=10, delivered=10, duplicates=3, duplicates_allowed=True).ok
    assert not Result("1", "t", acked=10, delivered=9, lost=1, duplicates_allowed=True).ok
    assert not Result("5", "t").ok  # nothing acked proves nothing
    assert not Result("5", "t", acked=10, delivered=10, error="boom").ok
    lines = table([Result("5", "sink flapping", sent=10, acked=10, delivered=10)]).splitlines()
    assert lines[0].split()[:3] == ["#", "scenario", "sent"]
    assert lines[2].split()[-1] == "ok"


async def test_a_duplicate_storm_through_real_processes_loses_and_repeats_nothing(
    tmp_path: Path,
) -> None:
    res = await run_one("7", Run(n=40, rate=100.0, workdir=tmp_path / "s7"))
    assert res.error == ""
    assert (res.acked, res.delivered, res.lost, res.duplicates) == (40, 40, 0, 0)
    assert res.ok


def test_another_broken_expectation_fails_the_scenario() -> None:
    res = Result("16", "t", acked=10, delivered=10, broken=["dead letters after a reload"])
    assert not res.ok
    lines = table([res]).splitlines()
    assert lines[2].split()[-1] == "FAIL"


def test_each_scenario_is_held_to_the_duplicates_its_fault_allows() -> None:
    assert list(SCENARIOS) == [str(k) for k in range(1, len(SCENARIOS) + 1)]
    assert {k: v[2] for k, v in SCENARIOS.items()} == DUPLICATES_ALLOWED


def _sink_with_first(*ids: str) -> CountingSink:
    sink = CountingSink()
    for event_id in ids:
        sink.first.setdefault(event_id, len(sink.first))
    return sink


def test_order_breaks_count_events_first_arriving_after_a_later_one_of_their_chat() -> None:
    # Events go round 100 chats: 0, 100 and 200 share chat c-0; 1 and 101 share c-1.
    def e(i: int) -> str:
        return f"chert:msg:op-{i:07d}"

    assert order_breaks(_sink_with_first(e(0), e(1), e(100), e(101), e(200))) == 0
    assert order_breaks(_sink_with_first(e(100), e(1), e(0), e(101), e(200))) == 1
    assert order_breaks(_sink_with_first(e(200), e(101), e(100), e(1), e(0))) == 3


async def test_the_sink_counts_requests_at_once_and_knows_whose_they_are() -> None:
    sink = CountingSink()
    sink.delay = lambda: 0.3
    await sink.start()
    try:
        async with aiohttp.ClientSession() as session:

            async def post(i: int) -> int:
                headers = {"webhook-id": f"e-{i}"}
                async with session.post(sink.url, data=b"{}", headers=headers) as resp:
                    return resp.status

            posts = [asyncio.ensure_future(post(i)) for i in range(5)]
            await asyncio.sleep(0.15)
            assert sink.active == 5
            assert sink.answering(tcp_ports(os.getpid())) == 5
            assert sink.answering({1}) == 0
            assert await asyncio.gather(*posts) == [200] * 5
        assert (sink.max_active, sink.active, sum(sink.delivered.values())) == (5, 0, 5)
        assert sorted(sink.first) == [f"e-{i}" for i in range(5)]
    finally:
        await sink.stop()


@pytest.mark.skipif(libfaketime() is None, reason="Debian's faketime is not installed")
def test_a_skewed_clock_moves_wall_time_and_leaves_timers_alone() -> None:
    probe = (
        "import asyncio, time\n"
        "async def main():\n"
        "    t = time.monotonic()\n"
        "    await asyncio.sleep(0.2)\n"
        "    print(time.time(), time.monotonic() - t)\n"
        "asyncio.run(main())\n"
    )
    for offset in (-600, 600):
        out = subprocess.run(
            [sys.executable, "-c", probe],
            env={**os.environ, **skewed_clock(offset)},
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        wall, slept = (float(v) for v in out.stdout.split())
        assert abs(wall - time.time() - offset) < 5
        assert 0.19 < slept < 2
