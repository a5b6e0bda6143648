"""The ``amqp`` sink: a RabbitMQ (AMQP 0-9-1) publish of each event to the sink's
``exchange`` with its ``routing_key``.

Each message is persistent, ``mandatory`` and published on a channel in confirm mode:
the broker's confirm is the acknowledgement. A message no queue takes (returned as
unroutable) or one the broker nacks is a failure, retried like an HTTP 5xx; so are a
lost connection and a timeout. Refused for good (a ``rejected`` dead letter with the
broker's reason): an exchange that does not exist (404), access refused (403, or the
credentials at connection), a precondition failed (406: a message over the broker's
``max_message_size``, say). The exchange and the queues bound to it are the operator's,
declared durable; the relay never declares them.

The event id is the message's ``message_id``, its type the ``type`` property, and the
metadata go as headers. With ``ordering = "chat"`` the routing key is
``<routing_key>.<chat>`` (bind ``<routing_key>.#`` on a topic exchange, or use a
consistent-hash exchange to split chats across queues).
"""

from __future__ import annotations

import asyncio
import logging
import time

import aio_pika
import aio_pika.abc
import aiormq.exceptions
from yarl import URL

from relay.config import SinkConfig
from relay.delivery.brokers.message import CHAT_HEADER, Clock, Message, keyed
from relay.delivery.sink_client import Answer, scrub

log = logging.getLogger(__name__)

_REFUSED = (
    aiormq.exceptions.ChannelNotFoundEntity,
    aiormq.exceptions.ChannelAccessRefused,
    aiormq.exceptions.ChannelPreconditionFailed,
    aiormq.exceptions.ProbableAuthenticationError,
    aiormq.exceptions.AuthenticationError,
)


class AmqpPublisher:
    """Publishes one sink's events over an AMQP connection and confirm-mode channel of
    its own, opened again after either is closed (a lost connection, a channel error)."""

    def __init__(self, sink: SinkConfig, where: str) -> None:
        self._sink = sink
        self._where = where
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()

    def _url(self) -> URL:
        url = URL(self._sink.url)
        if self._sink.password is not None:
            url = url.with_user(url.user or "guest").with_password(self._sink.password.get())
        return url

    async def _open(self, timeout: float) -> aio_pika.abc.AbstractExchange:
        async with self._lock:
            channel, exchange = self._channel, self._exchange
            if exchange is not None and channel is not None and not channel.is_closed:
                return exchange
            if self._connection is None or self._connection.is_closed:
                self._connection = None  # should the connect fail, the next one tries again
                self._connection = await aio_pika.connect(self._url(), timeout=timeout)
            self._channel = await self._connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            name = self._sink.exchange or ""
            self._exchange = (
                self._channel.default_exchange
                if name == ""
                else await self._channel.get_exchange(name, ensure=False)
            )
            return self._exchange

    async def publish(self, sink: SinkConfig, msg: Message, timeout: float) -> Answer:
        clock = Clock()
        key = sink.routing_key or ""
        if sink.ordering == "chat":
            key = keyed(key, msg.chat)
        headers: dict[str, aio_pika.abc.FieldValue] = dict(msg.headers)
        if msg.chat is not None:
            headers[CHAT_HEADER] = msg.chat
        message = aio_pika.Message(
            msg.body,
            headers=headers,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=msg.event_id,
            type=msg.event_type[:255],
            timestamp=int(time.time()),
            app_id="chert-relay",
        )
        connection = self._connection
        try:
            async with asyncio.timeout(timeout):
                exchange = await self._open(timeout)
                connection = self._connection
                await exchange.publish(message, routing_key=key, mandatory=True)
        except TimeoutError:
            self._drop(connection)
            return clock.timeout(timeout)
        except aiormq.exceptions.PublishError as e:
            return clock.retry(
                "nack", scrub(f"unroutable: no queue is bound for routing key {key!r} ({e})", sink)
            )
        except aiormq.exceptions.DeliveryError as e:
            return clock.retry("nack", scrub(f"the broker did not confirm: {e}", sink))
        except _REFUSED as e:
            return clock.reject(scrub(f"RabbitMQ refused: {_reason(e)}", sink))
        except (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError) as e:
            # (aio-pika says "closed" with a RuntimeError, and may not mark the
            # connection closed after the broker reset it: it is dropped here.)
            self._drop(connection)
            return clock.retry("connection", scrub(f"{type(e).__name__}: {_reason(e)}", sink))
        return clock.ok(f"confirmed by the broker (exchange {sink.exchange!r}, key {key!r})")

    def _drop(self, connection: aio_pika.abc.AbstractConnection | None) -> None:
        """Forget ``connection`` (if it is still the current one) and close it in the
        background: the next attempt connects again."""
        if connection is None or connection is not self._connection:
            return
        self._connection = None
        self._channel = self._exchange = None
        task = asyncio.get_running_loop().create_task(_close_quietly(connection, self._where))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        self._channel = self._exchange = None
        if connection is not None:
            await _close_quietly(connection, self._where)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


async def _close_quietly(connection: aio_pika.abc.AbstractConnection, where: str) -> None:
    try:
        async with asyncio.timeout(2.0):
            await connection.close()
    except (TimeoutError, aiormq.exceptions.AMQPError, OSError, RuntimeError) as e:
        log.debug("amqp sink %s: close: %s", where, e)


def _reason(e: BaseException) -> str:
    """The broker's words in an aiormq exception (its reply text), else its text."""
    text = " ".join(str(a) for a in e.args if isinstance(a, str | int)) or str(e)
    return text or type(e).__name__
