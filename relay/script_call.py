"""Calling one Lua script with large, pre-packed argument lists on redis-py connections.

The ingest hot path sends one ``EVALSHA`` per batch whose arguments are mostly the
same few values (tenant, sinks, TTLs) around each event's body. redis-py's generic
``pack_command`` re-encodes every argument of every call; here the caller packs each
event's arguments once, as RESP bulk strings, reusing cached fragments for the
repeated parts, and the batch is sent on a redis-py connection as one buffer. The
reply is read with redis-py's own parser (hiredis when installed), and everything
else (connections, timeouts, errors) is redis-py's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import redis.exceptions
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection


def bulk(value: bytes | str | int) -> bytes:
    """One RESP bulk string."""
    if isinstance(value, str):
        value = value.encode()
    elif isinstance(value, int):
        value = b"%d" % value
    return b"$%d\r\n%s\r\n" % (len(value), value)


def bulks(values: Sequence[bytes | str | int]) -> bytes:
    return b"".join(bulk(v) for v in values)


class ScriptCaller:
    """Runs one script with pre-packed arguments on connections from the client's pool."""

    def __init__(self, client: Redis, source: str) -> None:
        self._client = client
        self._source = source
        self._sha = hashlib.sha1(source.encode()).hexdigest().encode()  # noqa: S324 - Redis' id

    async def call(self, nargs: int, packed_args: Sequence[bytes]) -> Any:
        """``EVALSHA sha 0 <args>``: ``packed_args`` holds ``nargs`` packed bulk strings."""
        head = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n0\r\n" % (nargs + 3, self._sha)
        pool = self._client.connection_pool
        conn: AbstractConnection = await pool.get_connection()
        try:
            await conn.send_packed_command([head, *packed_args], check_health=False)
            try:
                reply = await conn.read_response()
            except redis.exceptions.NoScriptError:
                await self._client.script_load(self._source)
                await conn.send_packed_command([head, *packed_args], check_health=False)
                reply = await conn.read_response()
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)
        return reply
