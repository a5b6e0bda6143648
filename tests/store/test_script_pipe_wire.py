"""The ingest pipeline's reply reader against odd wire shapes — a scripted RESP server,
since real Redis never splits, cuts or adds replies on demand — and the client whose
settings it connects with, left working (real Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
from collections.abc import AsyncIterator, Callable

import hiredis
import pytest
from redis.asyncio import Redis

from relay.errors import RedisUnavailableError
from relay.store import wire
from relay.store.script_pipe import ScriptPipeline

SCRIPT = """
local out = {}
for i = 1, #ARGV do out[i] = redis.call('RPUSH', 'ran', ARGV[i]) end
return out
"""
SHA = hashlib.sha1(SCRIPT.encode()).hexdigest().encode()  # noqa: S324


def build(items: list[str]) -> wire.Packed:
    return wire.pack(items)


def evalsha_reply(cmd: list[bytes]) -> bytes:
    """Each item's reply is int(item): the caller can tell its own answer."""
    items = cmd[3:]
    return b"*%d\r\n" % len(items) + b"".join(b":%d\r\n" % int(i) for i in items)


Writer = Callable[[asyncio.StreamWriter, bytes], "asyncio.Future[None] | None"]


@contextlib.asynccontextmanager
async def fake_redis(
    on_eval: Callable[[asyncio.StreamWriter, bytes], object],
) -> AsyncIterator[int]:
    """A RESP server: +OK to set-up commands, the digest to SCRIPT LOAD, and EVALSHA
    replies passed to ``on_eval(writer, reply)`` (which may split, cut, add...)."""
    tasks: set[asyncio.Task[None]] = set()

    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = hiredis.Reader()
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                parser.feed(data)
                while (cmd := parser.gets()) is not False:
                    name = cmd[0].upper()
                    if name == b"SCRIPT":
                        writer.write(b"$40\r\n" + SHA + b"\r\n")
                    elif name == b"EVALSHA":
                        r = on_eval(writer, evalsha_reply(cmd))
                        if asyncio.iscoroutine(r):
                            await r
                    else:
                        writer.write(b"+OK\r\n")
        writer.close()

    def track(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        t = asyncio.ensure_future(conn(r, w))
        tasks.add(t)
        t.add_done_callback(tasks.discard)

    server = await asyncio.start_server(track, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_replies_split_byte_by_byte_reach_their_own_callers() -> None:
    async def trickle(w: asyncio.StreamWriter, reply: bytes) -> None:
        for i in range(len(reply)):
            w.write(reply[i : i + 1])
            await w.drain()

    async with fake_redis(trickle) as port:
        client: Redis = Redis.from_url(f"redis://127.0.0.1:{port}")
        try:
            pipe: ScriptPipeline[str] = ScriptPipeline(
                client, SCRIPT, build, timeout=10, flush_at=3, max_batch=3
            )
            got = await asyncio.wait_for(
                asyncio.gather(*(pipe.call(str(n)) for n in range(50))), 30
            )
            assert got == list(range(50))
            await pipe.drain()
        finally:
            await client.aclose()


async def test_redis_closing_mid_reply_fails_every_call_in_flight_and_recovers() -> None:
    state = {"cut": True}

    def cut(w: asyncio.StreamWriter, reply: bytes) -> None:
        if state["cut"]:
            state["cut"] = False
            w.write(reply[: len(reply) // 2])
            w.close()
        else:
            w.write(reply)

    async with fake_redis(cut) as port:
        client: Redis = Redis.from_url(f"redis://127.0.0.1:{port}")
        try:
            pipe: ScriptPipeline[str] = ScriptPipeline(client, SCRIPT, build, timeout=10)
            results = await asyncio.wait_for(
                asyncio.gather(*(pipe.call(str(n)) for n in range(5)), return_exceptions=True),
                30,
            )
            assert all(isinstance(r, RedisUnavailableError) for r in results), results
            assert await asyncio.wait_for(pipe.call("7"), 30) == 7
            await pipe.drain()
            assert not pipe.connected
        finally:
            await client.aclose()


async def test_after_a_timeout_the_shared_pool_serves_other_users_correctly(
    redis_url: str,
) -> None:
    """CLIENT PAUSE past the timeout: a reply still owed on the pipeline's connection
    must never reach another user of the client (the pipeline's connection is its own,
    not one of the client's pool, whose single connection must stay correct)."""
    client: Redis = Redis.from_url(redis_url, max_connections=1)  # one pooled connection
    admin: Redis = Redis.from_url(redis_url)
    try:
        pipe: ScriptPipeline[str] = ScriptPipeline(client, SCRIPT, build, timeout=0.3, linger=0.05)
        assert await pipe.call("a") == 1
        await admin.execute_command("CLIENT", "PAUSE", "2000", "WRITE")
        try:
            with pytest.raises(RedisUnavailableError, match="TimeoutError"):
                await asyncio.wait_for(pipe.call("b"), 10)
            await asyncio.wait_for(pipe.drain(), 10)
        finally:
            await admin.execute_command("CLIENT", "UNPAUSE")
        # The single pooled connection is now someone else's: replies must be theirs.
        for n in range(20):
            await client.set(f"k{n}", f"v{n}")
            assert await client.get(f"k{n}") == f"v{n}".encode()
        assert await pipe.call("c") >= 2
        await asyncio.wait_for(pipe.drain(), 10)
        assert await client.lrange("ran", 0, -1) in ([b"a", b"c"], [b"a", b"b", b"c"])
    finally:
        await client.aclose()
        await admin.aclose()


async def test_an_unsolicited_reply_leaves_no_unretrieved_task_exception() -> None:
    def extra(w: asyncio.StreamWriter, reply: bytes) -> None:
        w.write(reply + b":999\r\n")  # one reply more than was asked for

    async with fake_redis(extra) as port:
        client: Redis = Redis.from_url(f"redis://127.0.0.1:{port}")
        loop = asyncio.get_running_loop()
        errors: list[dict[str, object]] = []
        loop.set_exception_handler(lambda _l, ctx: errors.append(ctx))
        try:
            pipe: ScriptPipeline[str] = ScriptPipeline(client, SCRIPT, build, timeout=10)
            assert await asyncio.wait_for(pipe.call("1"), 30) == 1  # its own reply
            second = await asyncio.wait_for(
                asyncio.gather(pipe.call("2"), return_exceptions=True), 30
            )
            assert second[0] == 2 or isinstance(second[0], RedisUnavailableError)
            await asyncio.wait_for(pipe.drain(), 30)
            gc.collect()
            assert [(c.get("message"), repr(c.get("exception"))) for c in errors] == []
        finally:
            await client.aclose()
            loop.set_exception_handler(None)
