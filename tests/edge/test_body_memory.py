"""Bodies still arriving are bounded in total (``server.max_body_memory``), on a real
``serve`` process: a crowd holding nearly complete 1 MiB bodies cannot grow the process
past that budget, good webhooks still get in, and the process shrinks back after."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from relay.memory import keep_large_blocks_returnable
from tests.support.common import TENANT, envelope, signed, wait_for
from tests.support.serve import serve

CROWD = 200
BODY = 1 << 20


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_glibc_takes_the_fixed_threshold() -> None:
    assert keep_large_blocks_returnable()


async def test_a_crowd_of_nearly_complete_bodies_stays_within_the_budget(
    tmp_path: Path, redis_url: str
) -> None:
    budget_mib = 16
    server = {"max_body_memory": f"{budget_mib}MiB"}
    async with serve(tmp_path, redis_url, {}, server=server) as s:
        assert s.proc.pid is not None
        before = rss_mib(s.proc.pid)
        raw, headers = signed(envelope("big", pad="x" * (BODY - 2000)))
        head = (
            f"POST /webhooks/chert/{TENANT} HTTP/1.1\r\nHost: relay\r\n"
            f"Content-Length: {len(raw)}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            + "\r\n"
        ).encode()
        crowd: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        peak = before
        try:
            for _ in range(CROWD):  # each sends all but its last 10 bytes, then stalls
                reader, writer = await asyncio.open_connection("127.0.0.1", s.listen)
                crowd.append((reader, writer))
                with contextlib.suppress(ConnectionError):  # answered 503, or dropped
                    writer.write(head + raw[:-10])
                    await writer.drain()
                peak = max(peak, rss_mib(s.proc.pid))
            # Every byte sent has reached the relay (or its connection was dropped).
            await wait_for(lambda: _answered_or_held(s.log), 30)
            peak = max(peak, rss_mib(s.proc.pid))
            statuses = [await s.webhook(f"after-crowd-{i}") for i in range(5)]
        finally:
            for _, w in crowd:
                w.close()
        assert statuses == [202] * 5
        # Without the budget the crowd held 200 MiB; with it, about the budget.
        assert peak - before < budget_mib * 3, (before, peak)

        async def shrunk() -> bool:
            return rss_mib(s.proc.pid) - before < budget_mib

        await wait_for(shrunk, 30)
        assert "body_memory" in s.log or "longest-stalled" in s.log


def _answered_or_held(log: str) -> bool:
    return "body_memory" in log or "longest-stalled" in log
