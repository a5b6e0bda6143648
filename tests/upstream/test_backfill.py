"""``backfill``: a time range from the simulator's event log through ingest, with counts."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
from pathlib import Path

import pytest
from redis.asyncio import Redis

from relay.errors import EXIT_UNAVAILABLE
from relay.ingest.envelope import from_object
from relay.ingest.ingestor import Ingestor
from relay.upstream.backfill import BackfillSummary, Progress, parse_when, run_backfill
from relay.upstream.chert_api import ChertPagingError
from tests.support.common import TENANT, WEBHOOK_SECRET, log_row, stored_event
from tests.support.upstream import (
    API_SECRET,
    enqueued,
    expected_jobs,
    paged_chert,
    relay_config,
    simulator,
    write_poll_config,
)


async def test_backfill_enqueues_what_was_never_seen_and_counts(
    redis_url: str, redis: Redis
) -> None:
    async with simulator() as sim:
        too_old = sim.emit(TENANT, count=3)
        in_range = sim.emit(TENANT, count=8) + sim.emit(TENANT, type="reaction.added", count=4)
        too_new = sim.emit(TENANT, count=2)
        config = relay_config(redis_url, sim.base_url, "off", page_size=5)
        # Five of the range already came in by webhook.
        ingestor = Ingestor(redis, config)
        for row in in_range[:5]:
            assert await ingestor.ingest(TENANT, from_object(row), "webhook")
        before = await enqueued(redis)
        tenant = config.tenant(TENANT)
        assert tenant is not None
        out = io.StringIO()
        summary = await run_backfill(
            config,
            tenant,
            since=parse_when(too_old[-1]["created_at"]),
            until=parse_when(in_range[-1]["created_at"]),
            progress=Progress(out, "backfill"),
        )
        assert (summary.seen, summary.new, summary.duplicates) == (12, 7, 5)
        assert summary.after_until == 2
        assert await enqueued(redis) == expected_jobs(in_range)
        new_jobs = (await enqueued(redis)) - before
        assert new_jobs == expected_jobs(in_range[5:])
        for r in in_range[5:]:
            stored = await stored_event(redis, r["event_id"])
            assert stored is not None
            assert stored.source == "backfill"
        for r in too_old + too_new:
            assert not await redis.exists(f"chert-relay:seen:{TENANT}:{r['event_id']}")
        assert out.getvalue().startswith("backfill: 3 rows (page 1, 3 new, 0 duplicates)\n")
        # Run again: everything is a duplicate now.
        again = await run_backfill(
            config, tenant, since=parse_when(too_old[-1]["created_at"]), until=None
        )
        assert (again.seen, again.new, again.duplicates) == (14, 2, 12)


async def test_backfill_command(redis_url: str, redis: Redis, tmp_path: Path) -> None:
    async with simulator() as sim:
        rows = sim.emit(TENANT, count=5)
        cfg = tmp_path / "relay.toml"
        write_poll_config(cfg, redis_url, sim.base_url, 30.0)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relay",
            "-c",
            str(cfg),
            "backfill",
            "--tenant",
            TENANT,
            "--since",
            "2000-01-01T00:00:00Z",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, stderr.decode()
        assert "5 rows seen, 5 new, 0 duplicates" in stdout.decode()
        assert f"backfill {TENANT}: 5 rows (page 1, 5 new, 0 duplicates)" in stderr.decode()
        assert await enqueued(redis) == expected_jobs(rows)


def test_backfill_command_rejects_bad_arguments(tmp_path: Path, redis_url: str) -> None:
    cfg = tmp_path / "relay.toml"
    write_poll_config(cfg, redis_url, "http://127.0.0.1:9/api/v1", 30.0)
    base = [sys.executable, "-m", "relay", "-c", str(cfg), "backfill"]
    cases = [
        ["--tenant", TENANT, "--since", "yesterday"],
        ["--tenant", "nobody", "--since", "2026-01-01"],
        ["--tenant", TENANT, "--since", "2026-01-02", "--until", "2026-01-01"],
    ]
    for args in cases:
        done = subprocess.run([*base, *args], capture_output=True, timeout=60, check=False)
        assert done.returncode == 2, (args, done.stderr)
        assert b"chert-relay backfill:" in done.stderr


async def test_backfill_with_a_broken_cursor_chain_fails_with_what_it_read(
    redis_url: str, redis: Redis
) -> None:
    async with paged_chert() as chert:
        read = [log_row("ev1"), log_row("ev2"), log_row("ev3")]
        chert.pages = {None: (read[:2], "c1"), "c1": (read[2:], "c1")}
        config = relay_config(redis_url, chert.base_url, "off", api={"auth": "bearer"})
        tenant = config.tenant(TENANT)
        assert tenant is not None
        summary = BackfillSummary()
        with pytest.raises(ChertPagingError, match="already given"):
            await run_backfill(
                config, tenant, since=parse_when("2026-01-01"), until=None, summary=summary
            )
    assert (summary.pages, summary.seen, summary.new) == (2, 3, 3)
    assert await enqueued(redis) == expected_jobs(read)


async def test_backfill_command_reports_a_broken_cursor_chain_as_incomplete(
    redis_url: str, redis: Redis, tmp_path: Path
) -> None:
    async with paged_chert() as chert:
        chert.pages = {None: ([log_row("ev1")], "c1"), "c1": ([log_row("ev2")], "c1")}
        cfg = tmp_path / "relay.toml"
        cfg.write_text(
            f"""
[redis]
url = "{redis_url}"
[[tenants]]
slug = "{TENANT}"
webhook_secrets = ["{WEBHOOK_SECRET}"]
[tenants.api]
base_url = "{chert.base_url}"
auth = "bearer"
signing_secret = "{API_SECRET}"
[[tenants.sinks]]
name = "all"
url = "http://127.0.0.1:9/all"
"""
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relay",
            "-c",
            str(cfg),
            "backfill",
            "--tenant",
            TENANT,
            "--since",
            "2000-01-01T00:00:00Z",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == EXIT_UNAVAILABLE, stderr.decode()
    assert "(incomplete): 2 rows seen, 2 new" in stdout.decode()
    assert "already given" in stderr.decode()
    assert "not backfilled" in stderr.decode()
