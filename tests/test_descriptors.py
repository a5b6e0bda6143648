"""Enough file descriptors at start-up, a warning when there cannot be, and one line —
not thousands — when the process runs out anyway."""

from __future__ import annotations

import asyncio
import logging
import resource
from pathlib import Path

import pytest

from relay.descriptors import LoopErrors
from tests.support.serve import serve


def limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit")


async def serve_with_limits(
    tmp_path: Path, redis_url: str, soft: int, hard: int
) -> tuple[str, int]:
    """``serve`` started under the given open-file limits: its log once it is up, and
    its soft limit then."""
    async with serve(tmp_path, redis_url, {}, nofile=(soft, hard)) as s:
        assert s.proc.pid is not None
        return s.log, limits(s.proc.pid)[0]


async def test_the_soft_limit_is_raised_to_the_hard_one(tmp_path: Path, redis_url: str) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"this machine's hard open-file limit is {hard}")
    log, soft = await serve_with_limits(tmp_path, redis_url, 256, 4096)
    assert soft == 4096
    assert "open-file limit" not in log


async def test_a_hard_limit_below_the_need_is_said_once(tmp_path: Path, redis_url: str) -> None:
    log, soft = await serve_with_limits(tmp_path, redis_url, 128, 512)
    assert soft == 512
    lines = [line for line in log.splitlines() if "open-file limit" in line]
    assert len(lines) == 1
    assert "WARNING" in lines[0]
    assert "the open-file limit is 512 (hard 512), below the 1256 descriptors" in lines[0]


def test_accept_failures_are_one_line_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    handler = LoopErrors(interval=3600)
    loop = asyncio.new_event_loop()
    try:
        error = OSError(24, "Too many open files")
        with caplog.at_level(logging.ERROR):
            for _ in range(1000):
                handler(loop, {"message": LoopErrors.ACCEPT, "exception": error})
            handler(loop, {"message": "something else went wrong"})
    finally:
        loop.close()
    accept = [r for r in caplog.records if "cannot accept a connection" in r.getMessage()]
    assert len(accept) == 1
    assert "Too many open files" in accept[0].getMessage()
    others = [r for r in caplog.records if "something else went wrong" in r.getMessage()]
    assert len(others) == 1  # anything else still logged as asyncio would
