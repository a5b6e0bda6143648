"""The Redis wire: the batches it encodes read back as the scripts' arguments, replies
(nested, errors) come back as redis-py would give them, and its own connection reaches
the server a client is set up for — a Unix socket, credentials, a database, a client
name, TLS."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import hiredis
import pytest
import redis.exceptions
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from redis.asyncio import Redis

from relay.errors import RedisUnavailableError
from relay.store import scripts, wire
from relay.store.embedded import EmbeddedRedis, free_port
from relay.store.script_pipe import ScriptPipeline

# Each item is a key the script SETs (and answers 1 for): a test finds where it went.
SCRIPT = """
local out = {}
for i = 1, #ARGV do redis.call('SET', ARGV[i], 'set'); out[i] = 1 end
return out
"""


def parse(parts: list[bytes]) -> list[bytes]:
    """A command as written, read back as its arguments (as Redis reads it)."""
    reader = hiredis.Reader()
    reader.feed(b"".join(parts))
    found = reader.gets()
    assert isinstance(found, list)
    assert reader.gets() is False  # exactly one command
    return found


def test_an_ingest_batch_reads_back_as_ingest_lua_takes_it() -> None:
    route = wire.IngestRoute(
        event_ttl_ms=90_000,
        jobs=[wire.IngestJob("crm", 60_000, ""), wire.IngestJob("chat", 61_000, "chat")],
    )
    item = wire.IngestItem(
        tenant="acme",
        event_id="evt_1",
        header=b"0002 0000000000001 webhook - 16\n",
        event_type=b"message.received",
        body=b'{"x": "\r\n$5"}',  # RESP-looking bytes in a body are just bytes
        chat="c9",
        route=route,
        webhook=True,
    )
    filtered = wire.IngestRoute(90_000, [wire.IngestJob("crm", 60_000, "")], ["chat", "x"])
    other = item._replace(tenant="beta", event_id="evt_2", chat="", webhook=False, route=filtered)
    batch = wire.IngestBatch("relay", "arq:queue", "arq:job:", 1024, 5000)([item, other])
    args = parse(wire.Script(scripts.script("ingest").source).call(batch))
    assert args[:3] == [b"EVALSHA", scripts.script("ingest").sha.encode(), b"0"]
    event = [b"90000", b"2", b"crm", b"60000", b"", b"chat", b"61000", b"chat", b"0"]
    kept = [b"90000", b"1", b"crm", b"60000", b"", b"2", b"chat", b"x"]  # 2 filtered out
    assert args[3:] == [
        *(b"relay", b"arq:queue", b"arq:job:", b"1024", b"5000"),
        *(b"1", b"acme"),  # the tenants whose webhooks came
        b"2",
        *(b"acme", b"evt_1", item.header + item.event_type + item.body, b"c9", *event),
        *(b"beta", b"evt_2", item.header + item.event_type + item.body, b"", *kept),
    ]
    assert batch.nargs == len(args) - 3


def test_a_finish_batch_reads_back_as_finish_batch_lua_takes_it() -> None:
    ok = wire.FinishItem(
        job_id="relay:acme:crm:e1",
        tenant="acme",
        sink="crm",
        event_id="e1",
        chat="",
        token="t.1",
        outcome="ok",
        delay_ms=0,
        status=200,
        error="",
        effect="success",
        gone_url="",
        dead_class="",
        hold=False,
        fields=(),
    )
    dead = ok._replace(
        outcome="dead", status=None, error="boom", dead_class="exhausted", hold=True
    )._replace(fields=("event_id", "e1", "class", "exhausted"))
    batch = wire.FinishBatch(
        "relay", "arq:queue", "[5,0.5,60000]", 30_000, 120_000, 10_000, "w.f", 10_000, 5
    )([ok, dead])
    args = parse(wire.Script(scripts.script("finish_batch").source).call(batch))
    head = [
        b"relay",
        b"arq:queue",
        b"[5,0.5,60000]",
        b"30000",
        b"120000",
        b"10000",
        b"w.f.1",
        b"10000",
        b"5",
        b"1",  # the event log keeps copies
        b"2",
    ]
    common = [b"relay:acme:crm:e1", b"acme", b"crm", b"e1", b"", b"t.1"]
    assert args[3:] == [
        *head,
        *common,
        *(b"ok", b"0", b"200", b"", b"success", b"", b"", b"skip", b"0", b"", b""),
        *(b"", b"", b"", b"0"),  # no handoff, no reserve; no dead-letter fields
        *common,
        *(b"dead", b"0", b"", b"boom", b"success", b"", b"exhausted", b"hold", b"0", b"", b""),
        *(b"", b"", b""),
        b"4",
        *(b"event_id", b"e1", b"class", b"exhausted"),
    ]
    assert batch.nargs == len(args) - 3


@pytest.mark.parametrize(
    ("reply", "kind", "text"),
    [
        ("NOSCRIPT No matching script.", redis.exceptions.NoScriptError, "No matching script."),
        (
            "READONLY You can't write against a read only replica.",
            redis.exceptions.ReadOnlyError,
            "You can't write against a read only replica.",
        ),
        ("OOM command not allowed", redis.exceptions.OutOfMemoryError, "command not allowed"),
        ("LOADING Redis is loading", redis.exceptions.BusyLoadingError, "Redis is loading"),
        (
            "WRONGPASS invalid username-password pair",
            redis.exceptions.AuthenticationError,
            "invalid username-password pair",
        ),
        ("MISCONF no disk", redis.exceptions.ResponseError, "MISCONF no disk"),
        ("ERR unknown command", redis.exceptions.ResponseError, "ERR unknown command"),
        (
            "ERR max number of clients reached",
            redis.exceptions.ConnectionError,
            "max number of clients reached",
        ),
    ],
)
def test_error_replies_become_the_exceptions_redis_py_raises(
    reply: str, kind: type[Exception], text: str
) -> None:
    found = wire.reply_error(reply)
    assert type(found) is kind
    assert str(found) == text


# Per item: 0 for an odd one, else {item, ''} — the shape of finish_batch.lua's reply.
NESTED = """
local out = {}
for i = 1, #ARGV do
  if tonumber(ARGV[i]) % 2 == 1 then out[i] = 0 else out[i] = {ARGV[i], ''} end
end
return out
"""


async def test_nested_replies_reach_their_callers_as_they_are(redis: Redis) -> None:
    pipe: ScriptPipeline[str] = ScriptPipeline(redis, NESTED, wire.pack, timeout=5)
    got = await asyncio.gather(*(pipe.call(str(n)) for n in range(6)))
    assert got == [[b"0", b""], 0, [b"2", b""], 0, [b"4", b""], 0]
    await pipe.drain()


@pytest.fixture
async def tcp_redis(tmp_path: Path) -> AsyncIterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis", port=free_port(), appendfsync="everysec")
    await server.start()
    yield server
    await server.stop()


async def test_the_wire_authenticates_selects_its_database_and_names_itself(
    tcp_redis: EmbeddedRedis,
) -> None:
    admin: Redis = Redis.from_url(tcp_redis.url)
    await admin.acl_setuser(
        "relay", enabled=True, passwords=["+s3cret"], keys="*", commands=["+@all"]
    )
    client: Redis = Redis.from_url(
        f"redis://relay:s3cret@127.0.0.1:{tcp_redis.port}/3", client_name="relay-ingest"
    )
    wrong: Redis = Redis.from_url(f"redis://relay:nope@127.0.0.1:{tcp_redis.port}/3")
    try:
        pipe: ScriptPipeline[str] = ScriptPipeline(client, SCRIPT, wire.pack, timeout=5)
        assert await pipe.call("k") == 1
        clients = await admin.client_list()
        assert any(c["name"] == "relay-ingest" and c["user"] == "relay" for c in clients)
        await pipe.drain()
        assert await client.get("k") == b"set"  # in database 3
        assert await admin.get("k") is None  # not in 0

        refused: ScriptPipeline[str] = ScriptPipeline(wrong, SCRIPT, wire.pack, timeout=5)
        with pytest.raises(RedisUnavailableError, match="AuthenticationError"):
            await refused.call("never")
    finally:
        for c in (admin, client, wrong):
            await c.aclose()


async def test_the_wire_reaches_redis_on_a_unix_socket() -> None:
    directory = Path(tempfile.mkdtemp(prefix="wire", dir="/tmp"))  # a short socket path
    server = EmbeddedRedis(directory / "r", appendfsync="everysec")
    try:
        url = await server.start()
        assert url.startswith("unix://")
        client: Redis = Redis.from_url(url)
        pipe: ScriptPipeline[str] = ScriptPipeline(client, SCRIPT, wire.pack, timeout=5)
        assert await pipe.call("u") == 1
        await pipe.drain()
        assert await client.get("u") == b"set"
        await client.aclose()
    finally:
        await server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signed for 127.0.0.1 (with its key)."""
    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            builder = builder.add_extension(san, critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("wire test CA", ca_key, "wire test CA", ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    server = cert("127.0.0.1", key, "wire test CA", ca_key, ca=False)
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


async def test_the_wire_speaks_tls_as_the_client_is_set_up_to(tmp_path: Path) -> None:
    ca, cert, key = _certificates(tmp_path)
    tls_port = free_port()
    server = EmbeddedRedis(
        tmp_path / "redis",
        port=free_port(),
        appendfsync="everysec",
        extra=(
            "--tls-port",
            str(tls_port),
            "--tls-cert-file",
            str(cert),
            "--tls-key-file",
            str(key),
            "--tls-ca-cert-file",
            str(ca),
            "--tls-auth-clients",
            "no",
        ),
    )
    await server.start()
    url = f"rediss://127.0.0.1:{tls_port}/2"
    client: Redis = Redis.from_url(url, ssl_ca_certs=str(ca), ssl_check_hostname=True)
    untrusting: Redis = Redis.from_url(url, socket_connect_timeout=2)  # the system's CAs
    try:
        pipe: ScriptPipeline[str] = ScriptPipeline(client, SCRIPT, wire.pack, timeout=5)
        assert await pipe.call("t") == 1
        await pipe.drain()
        assert await client.get("t") == b"set"  # in database 2, over TLS
        refused: ScriptPipeline[str] = ScriptPipeline(untrusting, SCRIPT, wire.pack, timeout=5)
        with pytest.raises(RedisUnavailableError, match="SSLCertVerificationError"):
            await refused.call("never")
    finally:
        await client.aclose()
        await untrusting.aclose()
        await server.stop()
