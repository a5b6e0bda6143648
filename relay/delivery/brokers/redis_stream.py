"""The ``redis-stream`` sink: ``XADD`` of each event to a stream on a Redis the sink names.

The entry's fields are the message's metadata (the HTTP header names) and ``body``; with
``max_len`` the stream is trimmed to about that many entries (``MAXLEN ~``). The reply
(the entry's id) is the acknowledgement: Redis has the entry, as durably as its own
persistence settings keep it.

Retried: no connection, a timeout, and the errors Redis gives while it cannot write yet
(``OOM``, ``READONLY``, ``LOADING``, ``MISCONF``, ``BUSY`` …). Refused for good (a
``rejected`` dead letter with Redis' reason): authentication (``NOAUTH``, ``WRONGPASS``),
permissions (``NOPERM``) and a key that is not a stream (``WRONGTYPE``).
"""

from __future__ import annotations

import asyncio

import redis.exceptions
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from relay.config import SinkConfig
from relay.delivery.brokers.message import CHAT_HEADER, Clock, Message
from relay.delivery.sink_client import Answer, scrub

BODY_FIELD = "body"
_REFUSALS = ("WRONGTYPE", "NOPERM", "NOAUTH", "WRONGPASS")


class RedisStreamPublisher:
    """Adds events to one sink's stream over a connection pool of its own."""

    def __init__(self, sink: SinkConfig) -> None:
        password = None if sink.password is None else sink.password.get()
        self._client: Redis = Redis.from_url(
            sink.url,
            password=password,  # when set, it replaces the URL's
            socket_connect_timeout=sink.timeout,
            max_connections=sink.concurrency + 1,
        )

    async def publish(self, sink: SinkConfig, msg: Message, timeout: float) -> Answer:
        clock = Clock()
        fields: dict[FieldT, EncodableT] = {k: v for k, v in msg.headers.items()}
        if msg.chat is not None:
            fields[CHAT_HEADER] = msg.chat
        fields[BODY_FIELD] = msg.body
        assert sink.stream is not None  # the config requires it
        try:
            async with asyncio.timeout(timeout):
                entry = await self._client.xadd(
                    sink.stream, fields, maxlen=sink.max_len, approximate=True
                )
        except TimeoutError:
            return clock.timeout(timeout)
        except redis.exceptions.AuthenticationError as e:
            return clock.reject(scrub(f"Redis refused the credentials: {e}", sink))
        except redis.exceptions.ResponseError as e:
            text = scrub(f"Redis answered: {e}", sink)
            if str(e).startswith(_REFUSALS):
                return clock.reject(text)
            return clock.retry("nack", text)
        except (redis.exceptions.RedisError, OSError) as e:
            return clock.retry("connection", scrub(f"{type(e).__name__}: {e}", sink))
        entry_id = entry.decode() if isinstance(entry, bytes) else str(entry)
        return clock.ok(f"XADD {sink.stream} {entry_id}")

    async def close(self) -> None:
        await self._client.aclose(close_connection_pool=True)
