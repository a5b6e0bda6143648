"""The ``nats`` sink: a NATS JetStream publish of each event to the sink's ``subject``.

The JetStream ``PubAck`` is the acknowledgement: the stream that captures the subject
has stored the message. Which stream that is, and its storage and replicas, are the
operator's (the relay never creates one). The event id goes as ``Nats-Msg-Id``: inside
the stream's duplicate window a second publish of the event (a crash-retry, a resend)
is acknowledged as a duplicate and adds no message. With ``ordering = "chat"`` the
subject is ``<subject>.<chat>`` (the stream captures ``<subject>.>``).

Retried: no connection (each attempt connects again if it must), a timeout, no stream
answering for the subject (JetStream answers so while it restarts, too) and JetStream's
own 5xx errors (a full stream that discards new messages, say). Refused for good:
authorization, a message over the server's ``max_payload`` and JetStream's 4xx errors
(a message over the stream's ``max_msg_size``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import nats.errors
import nats.js.errors
from nats.aio.client import Client

from relay.config import SinkConfig
from relay.delivery.brokers.message import CHAT_HEADER, Clock, Message, keyed
from relay.delivery.sink_client import Answer, scrub

log = logging.getLogger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"


class JetStreamPublisher:
    """Publishes one sink's events over a NATS connection of its own."""

    def __init__(self, sink: SinkConfig, where: str) -> None:
        self._sink = sink
        self._where = where  # "tenant/sink", for the log
        self._nc: Client | None = None
        self._lock = asyncio.Lock()
        self._closing = False
        self._last_error: Exception | None = None  # what the client last reported

    async def _connection(self, timeout: float) -> Client:
        async with self._lock:
            if self._nc is not None and not self._nc.is_closed:
                return self._nc
            nc = Client()
            try:
                await nc.connect(**self._options(timeout))
            except BaseException:
                # a connect refused after the socket opened (credentials) leaves it open
                with contextlib.suppress(Exception):
                    await nc.close()
                raise
            self._nc = nc
            return nc

    def _options(self, timeout: float) -> dict[str, Any]:
        sink = self._sink
        url = sink.url
        options: dict[str, Any] = {}
        if sink.password is not None:
            parts = urlsplit(url)
            host = parts.netloc.rpartition("@")[2]
            url = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
            if parts.username:
                options.update(user=parts.username, password=sink.password.get())
            else:
                options["token"] = sink.password.get()
        return {
            "servers": [url],
            "name": "chert-relay",
            "connect_timeout": max(1, int(timeout)),
            # A lost connection closes the client; the next attempt connects again (so
            # that a broker that is down answers "refused" at once, not a timeout).
            "allow_reconnect": False,
            "max_reconnect_attempts": 1,  # with 0 or -1, a first connect never gives up
            "reconnect_time_wait": 0,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            **options,
        }

    async def _on_error(self, e: Exception) -> None:
        self._last_error = e
        log.debug("nats sink %s: %s", self._where, scrub(f"{type(e).__name__}: {e}", self._sink))

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning(
                "nats sink %s: connection lost; the next attempt connects again", self._where
            )

    async def publish(self, sink: SinkConfig, msg: Message, timeout: float) -> Answer:
        clock = Clock()
        assert sink.subject is not None  # the config requires it
        subject = keyed(sink.subject, msg.chat) if sink.ordering == "chat" else sink.subject
        headers = dict(msg.headers)
        headers[MSG_ID_HEADER] = msg.event_id
        if msg.chat is not None:
            headers[CHAT_HEADER] = msg.chat
        try:
            async with asyncio.timeout(timeout):
                nc = await self._connection(timeout)
                ack = await nc.jetstream().publish(
                    subject, msg.body, timeout=timeout, headers=headers
                )
        except (TimeoutError, nats.errors.TimeoutError):
            return clock.timeout(timeout)
        except nats.js.errors.NoStreamResponseError:
            return clock.retry("nack", f"no JetStream stream answers for subject {subject}")
        except nats.js.errors.APIError as e:
            text = scrub(f"JetStream answered {e.code}: {e.description}", sink)
            if e.code is not None and 400 <= e.code < 500:
                return clock.reject(text)
            return clock.retry("nack", text)
        except nats.errors.MaxPayloadError as e:
            return clock.reject(scrub(f"over the server's max_payload: {e}", sink))
        except (nats.errors.AuthorizationError, nats.errors.InvalidUserCredentialsError) as e:
            return clock.reject(scrub(f"NATS refused the credentials: {e}", sink))
        except nats.errors.NoServersError:
            why = self._last_error
            text = f"could not connect: {type(why).__name__}: {why}" if why else "could not connect"
            return clock.retry("connection", scrub(text, sink))
        except (nats.errors.Error, OSError) as e:
            if "authorization violation" in str(e).lower():  # at connect: a plain Error
                return clock.reject(scrub(f"NATS refused the credentials: {e}", sink))
            return clock.retry("connection", scrub(f"{type(e).__name__}: {e}", sink))
        said = f"stream {ack.stream} seq {ack.seq}"
        return clock.ok(said + (" (a duplicate: already in the stream)" if ack.duplicate else ""))

    async def close(self) -> None:
        self._closing = True
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            try:
                async with asyncio.timeout(2.0):
                    await nc.close()
            except (TimeoutError, nats.errors.Error, OSError) as e:
                log.debug("nats sink %s: close: %s", self._where, e)
