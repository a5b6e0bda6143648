"""One attempt at a sink of any kind: an HTTP POST (:mod:`relay.delivery.sink_client`)
or a broker publish (:mod:`relay.delivery.brokers`), with the same metadata and an
:class:`~relay.delivery.sink_client.Answer` either way."""

from __future__ import annotations

import aiohttp

from relay import telemetry
from relay.config import Config, SinkConfig
from relay.delivery.brokers import Brokers
from relay.delivery.brokers.message import Message, chat_of
from relay.delivery.sink_client import Answer, Request, SinkClient


class Outlet:
    """Sends attempts to every kind of sink; shared by one process's deliveries."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.http = SinkClient(session)
        self.brokers = Brokers()

    def signing_key(self, sink: SinkConfig) -> bytes | None:
        return self.http.signing_key(sink)

    def set_config(self, config: Config) -> None:
        """Decode sink secrets afresh and close the publishers of sinks a reload changed
        (call inside the running event loop)."""
        self.http.forget_keys()
        self.brokers.forget(config)

    async def send(
        self, sink: SinkConfig, req: Request, body: bytes, timeout: float, chat: str | None = None
    ) -> Answer:
        """Deliver ``body`` once; ``chat``: the event's chat when the caller knows it (an
        ordered delivery's), else read from the body for a broker sink."""
        headers = self.http.headers(sink, req, body)
        tracer = telemetry.TRACER
        if tracer is None:
            return await self._send(sink, req, body, headers, timeout, chat)
        # the attempt's span, its context in the headers (traceparent, tracestate)
        attempt = tracer.attempt(req, sink.name, sink.kind, headers)
        try:
            answer = await self._send(sink, req, body, headers, timeout, chat)
        except BaseException as e:  # cancelled (shutting down), or a fault of the relay's
            attempt.broke(e)
            raise
        return attempt.end(answer)

    async def _send(
        self,
        sink: SinkConfig,
        req: Request,
        body: bytes,
        headers: dict[str, str],
        timeout: float,
        chat: str | None,
    ) -> Answer:
        if not sink.is_broker:
            return await self.http.post(sink, body, headers, timeout)
        found = chat if chat is not None else chat_of(body)
        msg = Message(body, headers, req.event_id, req.event_type, found)
        return await self.brokers.publish(req.tenant, sink, msg, timeout)

    async def close(self) -> None:
        await self.http.close()
        await self.brokers.close()
