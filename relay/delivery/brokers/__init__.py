"""Broker sinks: Redis Streams, NATS JetStream and RabbitMQ, beside HTTP.

One publisher per broker sink (:mod:`.redis_stream`, :mod:`.jetstream`, :mod:`.amqp`),
made on the sink's first delivery and kept until a reload changes how it connects; each
answers an attempt with an :class:`~relay.delivery.sink_client.Answer` whose verdict
says delivered, retry or refused (:mod:`.message`). The client libraries of NATS and
AMQP are optional extras, imported only when such a sink exists (the configuration
refuses one whose extra is missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from relay.config import Config, SinkConfig
from relay.delivery.brokers.message import Message
from relay.delivery.sink_client import Answer

log = logging.getLogger(__name__)


class Publisher(Protocol):
    async def publish(self, sink: SinkConfig, msg: Message, timeout: float) -> Answer: ...

    async def close(self) -> None: ...


PublisherKey = tuple[str, ...]


def publisher_key(tenant: str, sink: SinkConfig) -> PublisherKey:
    """What a publisher is made from: a reload that changes none of it keeps the
    publisher (and its connection)."""
    password = "" if sink.password is None else sink.password.get()
    return (
        tenant, sink.name, sink.kind, sink.url, password, sink.exchange or "",
        str(sink.concurrency), str(sink.timeout),
    )  # fmt: skip


def make_publisher(tenant: str, sink: SinkConfig) -> Publisher:
    where = f"{tenant}/{sink.name}"
    if sink.kind == "redis-stream":
        from relay.delivery.brokers.redis_stream import RedisStreamPublisher

        return RedisStreamPublisher(sink)
    if sink.kind == "nats":
        from relay.delivery.brokers.jetstream import JetStreamPublisher

        return JetStreamPublisher(sink, where)
    if sink.kind == "amqp":
        from relay.delivery.brokers.amqp import AmqpPublisher

        return AmqpPublisher(sink, where)
    raise ValueError(f"not a broker sink: {sink.kind}")


class Brokers:
    """The publishers of one process's broker sinks."""

    def __init__(self) -> None:
        self._publishers: dict[PublisherKey, Publisher] = {}
        self._closing: set[asyncio.Task[None]] = set()

    async def publish(self, tenant: str, sink: SinkConfig, msg: Message, timeout: float) -> Answer:
        key = publisher_key(tenant, sink)
        publisher = self._publishers.get(key)
        if publisher is None:
            publisher = self._publishers[key] = make_publisher(tenant, sink)
        return await publisher.publish(sink, msg, timeout)

    def forget(self, config: Config) -> None:
        """Close, in the background, the publishers ``config`` no longer has."""
        keep = {publisher_key(t.slug, s) for t in config.tenants for s in t.sinks if s.is_broker}
        for key in [k for k in self._publishers if k not in keep]:
            task = asyncio.get_running_loop().create_task(self._publishers.pop(key).close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        publishers, self._publishers = list(self._publishers.values()), {}
        for p in publishers:
            with contextlib.suppress(Exception):
                await p.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
