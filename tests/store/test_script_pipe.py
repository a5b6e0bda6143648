"""The pipelined script runner under the ingest path: batching, and every way Redis fails."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from relay.errors import RedisUnavailableError
from relay.store import wire
from relay.store.client import connect
from relay.store.embedded import EmbeddedRedis
from relay.store.script_pipe import ScriptPipeline

# Appends each item to a list and answers with its new length: the order Redis ran
# the items in is visible, and a batch's reply is one element per item.
SCRIPT = """
local out = {}
for i = 1, #ARGV do out[i] = redis.call('RPUSH', 'ran', ARGV[i]) end
return out
"""


def build(items: list[str]) -> wire.Packed:
    return wire.pack(items)


def pipeline(client: Redis, **kwargs: float) -> tuple[ScriptPipeline[str], list[int]]:
    sizes: list[int] = []
    options: dict[str, Any] = {"timeout": 5.0, **kwargs}
    pipe: ScriptPipeline[str] = ScriptPipeline(
        client, SCRIPT, build, observe=lambda _s, n: sizes.append(n), **options
    )
    return pipe, sizes


async def ran(client: Redis) -> list[str]:
    return [x.decode() for x in await client.lrange("ran", 0, -1)]


def in_use(pipe: ScriptPipeline[str]) -> int:
    """How many connections the pipeline holds (its own, not the client's pool's)."""
    return int(pipe.connected)


async def test_each_call_gets_its_own_reply_in_order(redis: Redis) -> None:
    pipe, _ = pipeline(redis)
    replies = await asyncio.gather(*(pipe.call(f"i{n}") for n in range(100)))
    assert sorted(replies) == list(range(1, 101))
    order = await ran(redis)
    assert sorted(order) == sorted(f"i{n}" for n in range(100))
    # Each caller got the position its own item was written at.
    assert [order[r - 1] for r in replies] == [f"i{n}" for n in range(100)]


async def test_a_burst_goes_out_in_batches_of_flush_at_while_it_is_still_arriving(
    redis: Redis,
) -> None:
    pipe, sizes = pipeline(redis, flush_at=8)
    await pipe.call("warm-up")  # the connection is held from here on
    sizes.clear()

    async def one(n: int) -> int:
        await asyncio.sleep(0)  # all 40 callers run in the same turn of the loop
        return int(await pipe.call(f"b{n}"))

    await asyncio.gather(*(one(n) for n in range(40)))
    assert sizes == [8, 8, 8, 8, 8]


async def test_drain_gives_the_connection_back_without_waiting_out_the_linger(
    redis: Redis,
) -> None:
    pipe, _ = pipeline(redis, linger=3600.0)
    calls = [asyncio.ensure_future(pipe.call(f"d{n}")) for n in range(10)]
    await asyncio.wait_for(pipe.drain(), 10)
    assert all(c.done() and not c.exception() for c in calls)
    assert in_use(pipe) == 0
    # And it is usable afterwards.
    assert await pipe.call("again") == 11


async def test_an_idle_connection_that_died_is_replaced_without_failing_a_call(
    make_redis_server: Callable[[], Awaitable[EmbeddedRedis]],
) -> None:
    server = await make_redis_server()
    client: Redis = Redis.from_url(server.url)
    try:
        pipe, _ = pipeline(client, linger=3600.0)
        assert await pipe.call("before") == 1
        server.kill()  # the pipeline still holds its (now dead) connection
        await server.start()
        # The first call after the restart succeeds: nothing was in flight, so nothing
        # needed to fail.
        assert await pipe.call("after") >= 1
        assert "after" in await ran(client)
    finally:
        await client.aclose()


async def test_redis_down_fails_calls_fast_and_they_succeed_once_it_is_back(
    make_redis_server: Callable[[], Awaitable[EmbeddedRedis]],
) -> None:
    server = await make_redis_server()
    client: Redis = Redis.from_url(server.url, socket_connect_timeout=1)
    try:
        pipe, _ = pipeline(client)
        await server.stop()
        results = await asyncio.gather(
            *(pipe.call(f"x{n}") for n in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, RedisUnavailableError) for r in results)
        assert in_use(pipe) == 0
        await server.start()
        assert await pipe.call("back") >= 1
    finally:
        await client.aclose()


async def test_a_batch_redis_refuses_fails_alone_and_the_connection_stays_usable(
    redis: Redis,
) -> None:
    pipe, _ = pipeline(redis)
    assert await pipe.call("ok") == 1
    await redis.config_set("maxmemory", 1)  # with noeviction: every write is refused (OOM)
    try:
        with pytest.raises(RedisUnavailableError):
            await pipe.call("refused")
    finally:
        await redis.config_set("maxmemory", 0)
    assert await pipe.call("ok-again") == 2
    assert await ran(redis) == ["ok", "ok-again"]


async def test_a_flushed_script_cache_is_reloaded_and_the_batch_sent_again(redis: Redis) -> None:
    pipe, _ = pipeline(redis, linger=3600.0)
    assert await pipe.call("first") == 1
    await redis.script_flush()
    # Several batches in flight meet NOSCRIPT: each is sent once more, in the same call.
    replies = await asyncio.gather(*(pipe.call(f"again{n}") for n in range(40)))
    assert sorted(replies) == list(range(2, 42))
    assert await pipe.call("reloaded") == 42
    assert sorted(await ran(redis)) == sorted(
        ["first", "reloaded", *(f"again{n}" for n in range(40))]
    )


async def test_the_first_batches_after_a_redis_restart_succeed(
    make_redis_server: Callable[[], Awaitable[EmbeddedRedis]],
) -> None:
    server = await make_redis_server()
    client: Redis = Redis.from_url(server.url)
    try:
        pipe, _ = pipeline(client, linger=3600.0)
        assert await pipe.call("before") == 1
        await server.stop()
        await server.start()  # from its AOF: the data is back, the script cache is not
        results = await asyncio.gather(*(pipe.call(f"after{n}") for n in range(50)))
        assert len(set(results)) == 50
        assert await client.script_exists(pipe.script.sha) == [True]
    finally:
        await client.aclose()


async def test_a_batch_that_meets_noscript_twice_fails(redis: Redis) -> None:
    pipe, _ = pipeline(redis, linger=3600.0)
    assert await pipe.call("first") == 1
    # A script that flushes the cache each time it is loaded cannot be reached: the
    # resend fails too, and the call gets "unavailable" rather than a loop.
    await redis.script_flush()
    pipe.script.load = wire.command("PING")  # "loading" that loads nothing
    with pytest.raises(RedisUnavailableError):
        await pipe.call("never")
    assert await ran(redis) == ["first"]


async def test_redis_down_is_logged_once_per_kind_not_once_per_batch(
    make_redis_server: Callable[[], Awaitable[EmbeddedRedis]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await make_redis_server()
    client: Redis = Redis.from_url(server.url, socket_connect_timeout=1)
    try:
        pipe, _ = pipeline(client)
        assert await pipe.call("up") == 1
        await server.stop()
        caplog.clear()
        for _ in range(30):  # 30 batches, one after another, all failing
            with pytest.raises(RedisUnavailableError):
                await pipe.call("down")
        lines = [r for r in caplog.records if "Redis unavailable" in r.getMessage()]
        assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]
    finally:
        await client.aclose()


async def test_redis_that_stops_answering_fails_the_calls_within_the_timeout(
    redis_url: str,
) -> None:
    client: Redis = Redis.from_url(redis_url)
    admin: Redis = Redis.from_url(redis_url)
    try:
        pipe, _ = pipeline(client, timeout=0.5)
        assert await pipe.call("before") == 1
        await admin.execute_command("CLIENT", "PAUSE", "3000", "WRITE")
        try:
            with pytest.raises(RedisUnavailableError, match="TimeoutError"):
                await asyncio.wait_for(pipe.call("stuck"), 5)
        finally:
            await admin.execute_command("CLIENT", "UNPAUSE")
        # The connection whose reply was lost is dropped; a new one takes over.
        assert await pipe.call("after") >= 2
    finally:
        await client.aclose()
        await admin.aclose()


async def test_batches_answered_in_time_never_time_out_however_long_the_run(
    redis: Redis,
) -> None:
    """One timer watches every batch in flight: it must follow the oldest one, not
    fire at the first batch's deadline while later batches are still on their way."""
    pipe, sizes = pipeline(redis, timeout=0.3)
    loop = asyncio.get_running_loop()
    end = loop.time() + 1.2  # four timeouts long, batches in flight throughout
    rounds = 0
    while loop.time() < end:
        calls = [pipe.call(f"r{rounds}-{i}") for i in range(8)]
        assert len(await asyncio.gather(*calls)) == 8
        rounds += 1
    assert len(await ran(redis)) == 8 * rounds == sum(sizes)


STALL_TIMEOUT = 1.0


async def _quiet_pipeline_with_a_stale_watchdog(redis: Redis) -> ScriptPipeline[str]:
    """A pipeline whose last batch was answered (no reader). A watchdog timer left armed
    from that batch would be the bug the next test guards against."""
    loop = asyncio.get_running_loop()
    for _ in range(20):  # a slow machine may need another go at the precondition
        pipe: ScriptPipeline[str] = ScriptPipeline(
            redis, SCRIPT, build, timeout=STALL_TIMEOUT, linger=3600.0
        )
        await pipe.call("warm-up")
        # Let the session settle back into its linger wait (the reader's last poke
        # wakes it once): from here the pipeline is simply idle.
        for _ in range(100):
            if pipe.state().asleep:
                break
            await asyncio.sleep(0)
        state = pipe.state()
        due = state.watchdog_at
        # (A fixed pipeline leaves no watchdog armed here: that is fine too.)
        if not state.reading and (due is None or due > loop.time() + 0.1):
            return pipe
        await pipe.drain()
    pytest.fail("could not reach the precondition (idle, no reader)")


async def test_a_loop_stall_longer_than_the_timeout_does_not_wedge_the_pipeline(
    redis: Redis,
) -> None:
    pipe = await _quiet_pipeline_with_a_stale_watchdog(redis)
    try:
        fut = pipe.submit("during-stall")
        time.sleep(STALL_TIMEOUT * 1.3)  # the event loop is held up past the call's deadline

        # The call may fail (it is overdue: RedisUnavailableError/TimeoutError) or even
        # succeed, but it must be answered; and the pipeline must work afterwards.
        done, _ = await asyncio.wait({fut}, timeout=STALL_TIMEOUT * 5)
        left = pipe.state()
        after = asyncio.ensure_future(pipe.call("after"))
        after_done, _ = await asyncio.wait({after}, timeout=STALL_TIMEOUT * 5)
        state = f"after the stall: {left}; after the later call: {pipe.state()}"
        assert done, f"the call made during the stall was never answered ({state})"
        assert after_done, f"a later call was never answered ({state})"
        if fut.exception() is not None:
            assert isinstance(fut.exception(), RedisUnavailableError)
        assert after.result() >= 2
    finally:
        # Give the connection back (bounded: a wedged pipeline would never drain).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pipe.drain(), 5)


async def _tcp_server(reply: bytes | None) -> tuple[asyncio.Server, int, list[int]]:
    """A TCP server that is not Redis: answers anything with ``reply`` (None: never)."""
    opened: list[int] = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opened.append(1)
        with contextlib.suppress(Exception):
            while await reader.read(4096):
                if reply is not None:
                    writer.write(reply)
        writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], opened


async def test_a_server_that_is_not_redis_fails_the_call_instead_of_hanging_it() -> None:
    server, port, opened = await _tcp_server(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    client = connect(f"redis://127.0.0.1:{port}", timeout=1.0)
    try:
        pipe, _ = pipeline(client, timeout=0.5)
        with pytest.raises(RedisUnavailableError):
            await asyncio.wait_for(pipe.call("x"), 10)
        assert len(opened) <= 2  # no reconnecting in a loop
        await asyncio.wait_for(pipe.drain(), 10)
    finally:
        server.close()
        await client.aclose()


async def test_getting_a_connection_counts_against_the_timeout() -> None:
    # A frozen Redis: the kernel accepts the connection, nothing ever answers. The call
    # fails at the ingest timeout (0.5 s), not at the connect timeout (60 s).
    server, port, _ = await _tcp_server(None)
    client = connect(f"redis://127.0.0.1:{port}", timeout=60.0)
    try:
        pipe, _ = pipeline(client, timeout=0.5)
        with pytest.raises(RedisUnavailableError, match="TimeoutError"):
            await asyncio.wait_for(pipe.call("x"), 30)
    finally:
        server.close()
        await client.aclose()


async def test_draining_an_idle_pipeline_does_not_cut_the_next_linger(redis: Redis) -> None:
    pipe, _ = pipeline(redis, linger=3600.0)
    await pipe.drain()  # nothing to drain, no connection held
    assert await pipe.call("a") == 1
    # No "give it back now" order may be left over for this session: it holds the
    # connection for the linger, past the turns in which such an order lets it go.
    for _ in range(5):
        await asyncio.sleep(0)
    assert in_use(pipe) == 1
    await pipe.drain()
    assert in_use(pipe) == 0


async def test_a_drained_pipeline_opens_nothing_for_callers_that_went_away(
    redis: Redis,
) -> None:
    pipe, _ = pipeline(redis)
    call = asyncio.ensure_future(pipe.call("abandoned"))
    await asyncio.sleep(0)  # the call is queued; the flush is scheduled for the next turn
    call.cancel()
    await pipe.drain()
    for _ in range(3):  # let the scheduled flush run
        await asyncio.sleep(0)
    assert not pipe.state().session  # no connection taken for nobody
    assert in_use(pipe) == 0
    assert await ran(redis) == []
