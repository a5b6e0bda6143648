"""The fault suite's own machinery (bench/faults): its verdict and a small real run.

The full suite runs every scenario at about 1,000 events in CI (``make faults-ci``, part
of ``make ci``); here one scenario at a few dozen events shows the parts fit together:
real ``serve`` and ``worker`` processes, a real redis-server, a signing load generator
and a counting sink.
"""

from __future__ import annotations

from pathlib import Path

from bench.faults.__main__ import table
from bench.faults.scenarios import Run, run_one
from bench.faults.stack import Result


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
