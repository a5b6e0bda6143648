"""Enough file descriptors at start-up, a warning when there cannot be, and one line —
not thousands — when the process runs out anyway."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from relay.descriptors import LoopErrors
from relay.store.embedded import free_port
from tests.support.common import config_dict, wait_for
from tests.support.process import write_toml


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
    listen, admin = free_port(), free_port()
    data = config_dict(redis_url=redis_url)
    data["server"]["listen"] = f"127.0.0.1:{listen}"
    data["admin"] = {"listen": f"127.0.0.1:{admin}", "worker_listen": "127.0.0.1:0"}
    config = write_toml(tmp_path / "relay.toml", data)
    log_path = tmp_path / "serve.log"

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "--log-format", "text", "-c", str(config), "serve"],
            stdout=out, stderr=out, preexec_fn=cap, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        await wait_for(lambda: "receiver listening" in log_path.read_text() or proc.poll(), 30)
        assert proc.poll() is None, log_path.read_text()
        return log_path.read_text(), limits(proc.pid)[0]
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)


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
