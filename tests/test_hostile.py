"""The hostile-input suite (bench/hostile) at CI size: a few thousand generated hostile
requests at a real ``chert-relay serve``; the published run (docs/hostile-input.md)
sends 100,000."""

from __future__ import annotations

from pathlib import Path

from bench.hostile.run import run, table
from bench.hostile.target import Limits

REQUESTS = 3000
SEED = 20260524


def test_no_hostile_request_is_accepted_and_the_relay_stays_up(tmp_path: Path) -> None:
    report = run(REQUESTS, SEED, tmp_path, Limits(max_connections=64))
    summary = table(report) + "\n" + report.differences.text() + "\n" + "\n".join(report.failures)
    total = report.total
    assert total.requests >= REQUESTS, summary
    assert total.wrongly_accepted == 0, summary
    assert report.crashes == 0, summary
    assert total.valid_after_refused == 0, summary
    assert total.unexpected == 0, summary
    assert report.differences.unexplained() == [], summary
    assert not report.anomalies, summary
    assert not report.failures, summary
    # Memory stays bounded (the crowds, pipelines and unread answers included).
    assert report.rss_peak_kib - report.rss_before_kib < 64 * 1024, summary
