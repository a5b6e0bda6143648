"""The broker servers the suite starts (tests/support/brokers.py), against the real
nats-server and RabbitMQ: they start, take messages, keep them across a kill and a
restart, and leave nothing behind. Then one test per client-library behaviour that the
relay's publishers map to outcomes, as that module's docstring writes them down."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from collections.abc import Awaitable, Callable

import aio_pika
import nats
import nats.errors
import nats.js.errors
import pytest
from aio_pika import DeliveryMode, Message
from aio_pika.exceptions import (
    AMQPConnectionError,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    DeliveryError,
    ProbableAuthenticationError,
    PublishError,
)
from aiormq.abc import DeliveredMessage
from nats.aio.client import Client as NatsClient
from nats.js.api import StorageType
from pamqp.commands import Basic

from relay.store.embedded import free_port
from tests.support.brokers import (
    NatsServer,
    RabbitServer,
    accepts,
    alive,
    descendants,
    find_binary,
)
from tests.support.common import wait_for

MakeNats = Callable[..., Awaitable[NatsServer]]
MakeRabbit = Callable[[], Awaitable[RabbitServer]]


def unique(prefix: str) -> str:
    """A stream, exchange or queue name of the test's own on a shared server."""
    return f"{prefix}-{secrets.token_hex(4)}"


def test_a_missing_server_binary_fails_naming_the_debian_package():
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install nats-server\)"):
        find_binary("nats-server-that-is-not-there", "nats-server")


# --- NATS JetStream --------------------------------------------------------------------


async def test_jetstream_answers_a_repeated_msg_id_as_a_duplicate(nats_server: NatsServer):
    stream = unique("DEDUPE")
    await nats_server.add_stream(stream, [f"{stream}.>"])
    async with nats_server.client() as nc:
        js = nc.jetstream()
        first = await js.publish(f"{stream}.a", b"one", headers={"Nats-Msg-Id": "evt-1"})
        again = await js.publish(f"{stream}.a", b"one", headers={"Nats-Msg-Id": "evt-1"})
    assert (first.stream, first.seq, first.duplicate) == (stream, 1, None)
    assert (again.stream, again.seq, again.duplicate) == (stream, 1, True)
    [msg] = await nats_server.messages(stream)
    assert (msg.subject, msg.data, msg.seq) == (f"{stream}.a", b"one", 1)
    assert msg.headers["Nats-Msg-Id"] == "evt-1"


async def test_a_file_stream_keeps_its_messages_across_a_kill(make_nats_server: MakeNats):
    server = await make_nats_server()
    port = server.port
    await server.add_stream("KEPT", ["kept.>"], storage=StorageType.FILE)
    async with server.client() as nc:
        ack = await nc.jetstream().publish("kept.x", b"payload", headers={"Nats-Msg-Id": "m-1"})
        server.kill()  # at once after the PubAck, as a crash would
    assert ack.seq == 1
    await server.restart()
    assert server.port == port
    [msg] = await server.messages("KEPT")
    assert (msg.subject, msg.data) == ("kept.x", b"payload")
    assert msg.headers["Nats-Msg-Id"] == "m-1"


async def test_nats_connect_refused_raises_no_servers():
    refused: list[Exception] = []

    async def error_cb(e: Exception) -> None:
        refused.append(e)

    with pytest.raises(nats.errors.NoServersError, match="no servers available"):
        await nats.connect(
            f"nats://127.0.0.1:{free_port()}",
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=0,
            error_cb=error_cb,
        )
    # one try and one retry; the refusals themselves only reach error_cb
    assert [type(e) for e in refused] == [ConnectionRefusedError, ConnectionRefusedError]


async def test_nats_connect_with_zero_reconnect_attempts_retries_forever():
    refused: list[Exception] = []

    async def error_cb(e: Exception) -> None:
        refused.append(e)

    with pytest.raises(asyncio.TimeoutError):
        async with asyncio.timeout(1):
            await nats.connect(
                f"nats://127.0.0.1:{free_port()}",
                allow_reconnect=False,
                max_reconnect_attempts=0,
                reconnect_time_wait=0.05,
                error_cb=error_cb,
            )
    assert len(refused) > 2


async def test_nats_auth_failure_at_connect_is_a_plain_error(make_nats_server: MakeNats):
    server = await make_nats_server(user="relay", password="right")
    seen: list[Exception] = []

    async def error_cb(e: Exception) -> None:
        seen.append(e)

    # A Client() closed afterwards: nats.connect() raising here would leave the
    # socket open (a ResourceWarning once the loop is gone).
    nc = NatsClient()
    try:
        with pytest.raises(nats.errors.Error) as caught:
            await nc.connect(
                server.url,
                **server.options(password="wrong", allow_reconnect=False, error_cb=error_cb),
            )
    finally:
        await nc.close()
    assert type(caught.value) is nats.errors.Error  # not AuthorizationError
    assert str(caught.value) == "nats: 'Authorization Violation'"
    # error_cb had the same Error, and sometimes a ConnectionResetError after it (the
    # server drops the socket)
    assert seen[0] is caught.value
    assert all(isinstance(e, ConnectionResetError) for e in seen[1:])
    seen.clear()

    with pytest.raises(nats.errors.NoServersError):
        await nats.connect(
            server.url, **server.options(password="wrong", reconnect_time_wait=0, error_cb=error_cb)
        )
    assert "Authorization Violation" in str(seen[0])
    async with server.client() as nc:
        assert nc.is_connected


async def test_publish_to_a_subject_no_stream_captures(nats_server: NatsServer):
    async with nats_server.client() as nc:
        with pytest.raises(nats.js.errors.NoStreamResponseError):
            await nc.jetstream().publish(unique("nostream"), b"x", timeout=10)


async def test_publish_without_a_puback_times_out(nats_server: NatsServer):
    subject = unique("silent")
    async with nats_server.client() as nc:
        await nc.subscribe(subject)  # takes the message, never answers
        await nc.flush()
        with pytest.raises(nats.errors.TimeoutError) as caught:
            await nc.jetstream().publish(subject, b"x", timeout=0.2)
    assert isinstance(caught.value, asyncio.TimeoutError)


async def test_publish_over_max_payload(nats_server: NatsServer):
    stream = unique("BIG")
    await nats_server.add_stream(stream, [f"{stream}.>"])
    async with nats_server.client() as nc:
        js = nc.jetstream()
        assert nc.max_payload == 1024 * 1024
        with pytest.raises(nats.errors.MaxPayloadError):
            await js.publish(f"{stream}.x", b"x" * (nc.max_payload + 1))
        ack = await js.publish(f"{stream}.x", b"x" * nc.max_payload)  # still usable
    assert ack.seq == 1


async def test_publish_naming_another_stream(nats_server: NatsServer):
    stream = unique("MINE")
    await nats_server.add_stream(stream, [f"{stream}.>"])
    async with nats_server.client() as nc:
        with pytest.raises(nats.js.errors.BadRequestError) as caught:
            await nc.jetstream().publish(f"{stream}.x", b"x", stream="SOMEONE-ELSE")
    e = caught.value
    assert (e.code, e.err_code, e.description) == (400, 10060, "expected stream does not match")


async def test_publish_while_the_server_is_down(make_nats_server: MakeNats):
    server = await make_nats_server()
    await server.add_stream("DOWN", ["down.>"])
    async with server.client(max_reconnect_attempts=-1, reconnect_time_wait=0.05) as nc:
        js = nc.jetstream()
        server.kill()
        await wait_for(lambda: nc.is_reconnecting, 10)
        with pytest.raises(nats.errors.TimeoutError):
            await js.publish("down.x", b"x", timeout=0.5)
        await server.restart()
        await wait_for(lambda: nc.is_connected, 10)
        ack = await js.publish("down.x", b"y")
    assert ack.stream == "DOWN"

    async with server.client(allow_reconnect=False) as nc:
        server.kill()
        await wait_for(lambda: nc.is_closed, 10)
        with pytest.raises(nats.errors.ConnectionClosedError):
            await nc.jetstream().publish("down.x", b"z")


# --- RabbitMQ --------------------------------------------------------------------------


async def test_a_confirmed_persistent_publish_is_in_the_queue(rabbit_server: RabbitServer):
    exchange, queue = unique("events"), unique("sink")
    await rabbit_server.declare(exchange, "topic", queue, "message.*")
    async with rabbit_server.client() as connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        ex = await channel.get_exchange(exchange)
        confirm = await ex.publish(
            Message(b'{"id": 1}', delivery_mode=DeliveryMode.PERSISTENT, message_id="evt-1"),
            routing_key="message.received",
        )
    assert isinstance(confirm, Basic.Ack)
    [msg] = await rabbit_server.messages(queue)
    assert (msg.body, msg.message_id, msg.routing_key) == (
        b'{"id": 1}',
        "evt-1",
        "message.received",
    )
    assert msg.delivery_mode == DeliveryMode.PERSISTENT
    assert await rabbit_server.messages(queue) == []


async def test_an_unroutable_mandatory_publish_raises(rabbit_server: RabbitServer):
    exchange, queue = unique("events"), unique("sink")
    await rabbit_server.declare(exchange, "direct", queue, "bound")
    async with rabbit_server.client() as connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        ex = await channel.get_exchange(exchange)
        with pytest.raises(PublishError) as caught:
            await ex.publish(Message(b"lost"), routing_key="unbound", mandatory=True)
        assert not channel.is_closed
        assert isinstance(await ex.publish(Message(b"ok"), routing_key="bound"), Basic.Ack)
    e = caught.value
    assert isinstance(e, DeliveryError)
    assert isinstance(e.frame, Basic.Return)
    assert (e.frame.reply_code, e.frame.reply_text) == (312, "NO_ROUTE")
    assert (e.frame.exchange, e.frame.routing_key) == (exchange, "unbound")
    assert e.args == ("NO_ROUTE", "unbound")
    assert e.message is not None
    assert e.message.body == b"lost"
    assert e.message.delivery is e.frame


async def test_an_unroutable_publish_without_on_return_raises(rabbit_server: RabbitServer):
    """The trap: without ``on_return_raises`` the returned message is the publish's
    result; without ``mandatory`` the broker drops it and confirms."""
    exchange, queue = unique("events"), unique("sink")
    await rabbit_server.declare(exchange, "direct", queue, "bound")
    async with rabbit_server.client() as connection:
        channel = await connection.channel(publisher_confirms=True)
        ex = await channel.get_exchange(exchange)
        returned = await ex.publish(Message(b"lost"), routing_key="unbound", mandatory=True)
        dropped = await ex.publish(Message(b"lost"), routing_key="unbound", mandatory=False)
    assert isinstance(returned, DeliveredMessage)
    assert isinstance(returned.delivery, Basic.Return)
    assert isinstance(dropped, Basic.Ack)
    assert await rabbit_server.messages(queue) == []


async def test_a_publish_to_a_missing_exchange_closes_the_channel(rabbit_server: RabbitServer):
    exchange, queue = unique("events"), unique("sink")
    await rabbit_server.declare(exchange, "direct", queue, "k")
    missing = unique("missing")
    async with rabbit_server.client() as robust:
        connection = await aio_pika.connect(rabbit_server.url)
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            ghost = await channel.get_exchange(missing, ensure=False)
            with pytest.raises(ChannelNotFoundEntity) as caught:
                await ghost.publish(Message(b"x"), routing_key="k")
            assert caught.value.args == (f"NOT_FOUND - no exchange '{missing}' in vhost '/'",)
            assert channel.is_closed
            assert not connection.is_closed
            with pytest.raises(ChannelInvalidStateError):
                await ghost.publish(Message(b"x"), routing_key="k")
            fresh = await connection.channel(publisher_confirms=True, on_return_raises=True)
            ex = await fresh.get_exchange(exchange)
            assert isinstance(await ex.publish(Message(b"ok"), routing_key="k"), Basic.Ack)
        finally:
            await connection.close()

        # A robust connection's channel is reopened by aio-pika shortly after.
        channel = await robust.channel(publisher_confirms=True, on_return_raises=True)
        ghost = await channel.get_exchange(missing, ensure=False)
        with pytest.raises(ChannelNotFoundEntity):
            await ghost.publish(Message(b"x"), routing_key="k")
        await wait_for(lambda: not channel.is_closed, 10)
        ex = await channel.get_exchange(exchange)
        assert isinstance(await ex.publish(Message(b"ok"), routing_key="k"), Basic.Ack)


async def test_amqp_connect_refused():
    with pytest.raises(AMQPConnectionError) as caught:
        await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{free_port()}/", timeout=5)
    assert isinstance(caught.value, ConnectionError)
    assert caught.value.args[0] == 111  # ECONNREFUSED, then the socket's text


async def test_amqp_wrong_password(rabbit_server: RabbitServer):
    url = rabbit_server.url.replace("guest:guest", "guest:wrong")
    with pytest.raises(ProbableAuthenticationError) as caught:
        await aio_pika.connect(url, timeout=10)
    assert caught.value.args[0].startswith("ACCESS_REFUSED - Login was refused")


async def test_a_persistent_message_survives_a_kill(make_rabbit_server: MakeRabbit):
    server = await make_rabbit_server()
    ports = (server.port, server.dist_port, server.epmd_port)
    await server.declare("kept", "direct", "kept-q", "k")
    plain = await aio_pika.connect(server.url)
    lost: list[BaseException | None] = []
    plain.close_callbacks.add(lambda _sender, exc: lost.append(exc))
    try:
        async with server.client() as connection:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            ex = await channel.get_exchange("kept")
            for i in range(20):
                message = Message(f"m{i}".encode(), delivery_mode=DeliveryMode.PERSISTENT)
                await ex.publish(message, routing_key="k")
            server.kill()  # at once after the last confirm, as a crash would

        # A plain connection the broker dropped does not say it is closed: only
        # ``connected`` and the close callbacks tell, and it never opens a channel again.
        await wait_for(lambda: not plain.connected.is_set(), 10)
        assert not plain.is_closed
        assert len(lost) == 1
        assert isinstance(lost[0], AMQPConnectionError)
        with pytest.raises(RuntimeError, match="closed") as caught:
            await plain.channel()
        assert type(caught.value) is RuntimeError

        await server.restart()
        assert (server.port, server.dist_port, server.epmd_port) == ports
        found = await server.messages("kept-q")
        assert [m.body for m in found] == [f"m{i}".encode() for i in range(20)]
        with pytest.raises(RuntimeError, match="closed"):
            await plain.channel()  # the broker is back; this connection is not
    finally:
        await plain.close()
    assert plain.is_closed


async def test_each_node_has_its_own_epmd_and_a_kill_leaves_nothing(
    rabbit_server: RabbitServer, make_rabbit_server: MakeRabbit
):
    server = await make_rabbit_server()
    assert server.epmd_port != rabbit_server.epmd_port
    for node in (rabbit_server, server):
        names = subprocess.run(
            [find_binary("epmd", "erlang-base"), "-port", str(node.epmd_port), "-names"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        [registered] = [line for line in names.splitlines() if line.startswith("name ")]
        assert registered == f"name {node.nodename.split('@')[0]} at port {node.dist_port}"

    assert server.process is not None
    assert server.epmd is not None
    pids = descendants(server.process.pid) | {server.process.pid, server.epmd.pid}
    beams = [p for p in pids if "beam" in _comm(p)]
    assert beams  # the VM runs under the start script
    server.kill()
    assert not [p for p in pids if alive(p)]
    for port in (server.port, server.dist_port, server.epmd_port):
        assert not accepts(port)
    async with rabbit_server.client() as connection:  # the other node runs on
        assert not connection.is_closed


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""
