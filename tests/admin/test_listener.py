"""The admin listener's own bounds, on a real ``serve`` process: a connection cap, a
deadline for a request head, one for idleness — and, under a 1,024 open-file limit, a
crowd of idle admin connections no longer keeps webhooks out or floods the log."""

from __future__ import annotations

import asyncio
import contextlib
import resource
from pathlib import Path

from tests.support.common import wait_for
from tests.support.serve import serve


async def closed(reader: asyncio.StreamReader, timeout: float = 15.0) -> bytes:
    """What the server sent before closing the connection (bounded wait)."""
    return await asyncio.wait_for(reader.read(), timeout)


async def test_past_the_cap_a_connection_gets_503_and_a_freed_slot_serves_again(
    tmp_path: Path, redis_url: str
) -> None:
    async with serve(tmp_path, redis_url, {"max_connections": 4}) as s:
        held = [await asyncio.open_connection("127.0.0.1", s.admin) for _ in range(4)]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", s.admin)
            answer = await closed(reader)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 503"), answer
            assert b"too_many_connections" in answer
        finally:
            for _, w in held:
                w.close()

        # The held ones closed: the listener serves again, and counted the refusal.
        async def healthy() -> bool:
            return (await s.get("/healthz"))[0] == 200

        await wait_for(healthy, 10)
        assert await s.refusals("too_many_connections") >= 1
        assert "the admin listener is at its cap" in s.log


async def test_a_stalled_head_is_cut_and_an_idle_connection_closed(
    tmp_path: Path, redis_url: str
) -> None:
    admin = {"head_timeout": "500ms", "idle_timeout": "2s"}
    async with serve(tmp_path, redis_url, admin) as s:
        reader, writer = await asyncio.open_connection("127.0.0.1", s.admin)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nAuthor")  # then nothing
        assert await closed(reader) == b""
        writer.close()
        assert await s.refusals("head_timeout") == 1
        # A request served, then silence: closed once idle, not before its answer.
        reader, writer = await asyncio.open_connection("127.0.0.1", s.admin)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = await closed(reader)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert await s.refusals("idle_timeout") == 1
        assert await s.refusals("head_timeout") == 1


async def test_an_idle_crowd_on_the_admin_port_leaves_webhooks_answered(
    tmp_path: Path, redis_url: str
) -> None:
    """1,500 idle admin connections under an open-file limit of 1,024: before, the
    process ran out of descriptors (webhooks unanswered, a log line per failed accept);
    now past the cap each is answered 503 and closed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    async with serve(tmp_path, redis_url, {}, nofile=1024) as s:
        log_before = s.log_path.stat().st_size
        crowd: list[asyncio.StreamWriter] = []
        try:
            for _ in range(1500):
                with contextlib.suppress(OSError):
                    crowd.append((await asyncio.open_connection("127.0.0.1", s.admin))[1])
            statuses = [await s.webhook(f"crowd-{i}") for i in range(20)]
            assert statuses == [202] * 20, s.log[-2000:]
        finally:
            for w in crowd:
                w.close()
        assert await s.refusals("too_many_connections") >= 1500 - 256
        assert s.log_path.stat().st_size - log_before < 64 * 1024
