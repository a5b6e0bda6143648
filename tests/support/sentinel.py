"""A Redis deployment with replication and Sentinel on loopback ports, for tests: a
primary, its replicas and three sentinels, each a real ``redis-server`` process."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from redis.asyncio import Redis

from relay.store.embedded import EmbeddedRedis, free_port
from tests.support.common import config_dict, wait_for
from tests.support.delivery import FAST_WORKER, sink_conf
from tests.support.process import write_toml

SERVICE = "relay-test"


@dataclass
class Deployment:
    directory: Path
    primary: EmbeddedRedis
    replicas: list[EmbeddedRedis]
    sentinel_ports: list[int] = field(default_factory=list)
    sentinels: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def sentinel_addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.sentinel_ports]

    async def primary_address(self) -> str | None:
        """The primary the sentinels name now (the first that answers)."""
        for port in self.sentinel_ports:
            client: Redis = Redis(host="127.0.0.1", port=port, socket_timeout=1)
            try:
                found = await client.execute_command("SENTINEL", "get-master-addr-by-name", SERVICE)
            except Exception:  # noqa: S112 - another sentinel may answer
                continue
            finally:
                await client.aclose()
            if found:
                host, port_ = (x.decode() if isinstance(x, bytes) else str(x) for x in found)
                return f"{host}:{port_}"
        return None

    async def replicas_known(self) -> int:
        """How many replicas the first sentinel lists as up."""
        client: Redis = Redis(host="127.0.0.1", port=self.sentinel_ports[0], socket_timeout=1)
        try:
            found = await client.execute_command("SENTINEL", "replicas", SERVICE)
        finally:
            await client.aclose()
        up = 0
        for entry in found:
            fields = dict(zip(entry[::2], entry[1::2], strict=False))
            flags = fields.get(b"flags", b"").decode()
            if "s_down" not in flags and "o_down" not in flags:
                up += 1
        return up

    def relay_config(self, path: Path, sink_url: str) -> tuple[Path, int, int]:
        """A relay configuration finding the primary through the sentinels, with
        ``min_replica_acks = 1``, delivering to ``sink_url``: (file, webhook port,
        admin port)."""
        port, admin = free_port(), free_port()
        data = config_dict(sinks=[sink_conf("s", sink_url)], worker=FAST_WORKER)
        data["server"]["listen"] = f"127.0.0.1:{port}"
        data["admin"]["listen"] = f"127.0.0.1:{admin}"
        data["redis"] = {
            "sentinels": self.sentinel_addresses,
            "service_name": SERVICE,
            "min_replica_acks": 1,
            "replica_ack_timeout": "500ms",
            "startup_wait": "20s",
        }
        return write_toml(path, data), port, admin

    def node(self, address: str) -> EmbeddedRedis:
        port = int(address.rsplit(":", 1)[1])
        return next(n for n in [self.primary, *self.replicas] if n.port == port)


def _sentinel_conf(directory: Path, port: int, primary_port: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {directory}\n"
        f"logfile {directory / 'sentinel.log'}\n"
        f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2\n"
        f"sentinel down-after-milliseconds {SERVICE} 1000\n"
        f"sentinel failover-timeout {SERVICE} 5000\n"
        f"sentinel parallel-syncs {SERVICE} 1\n"
    )
    return conf


@contextlib.asynccontextmanager
async def deployment(directory: Path, replicas: int = 1) -> AsyncIterator[Deployment]:
    """Start a primary, ``replicas`` replicas (AOF, ``appendfsync always``) and three
    sentinels; stop them all at the end."""
    primary = EmbeddedRedis(directory / "primary", port=free_port())
    await primary.start()
    nodes = [
        EmbeddedRedis(
            directory / f"replica{i}",
            port=free_port(),
            extra=("--replicaof", "127.0.0.1", str(primary.port)),
        )
        for i in range(replicas)
    ]
    d = Deployment(directory, primary, nodes)
    try:
        for n in nodes:
            await n.start()
        for i in range(3):
            port = free_port()
            conf = _sentinel_conf(directory / f"sentinel{i}", port, primary.port or 0)
            d.sentinel_ports.append(port)
            d.sentinels.append(
                subprocess.Popen(
                    ["redis-server", str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in d.sentinel_ports:
            await wait_for(lambda p=port: EmbeddedRedis.answers(f"redis://127.0.0.1:{p}"), 20)
        await wait_for(lambda: d.primary_address(), 20)
        await wait_for(lambda: _replicas_synced(primary, replicas), 30)
        await wait_for(lambda: _all_see(d, replicas), 30)
        yield d
    finally:
        for proc in d.sentinels:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in d.sentinels:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for n in [primary, *nodes]:
            await n.stop()


async def _replicas_synced(primary: EmbeddedRedis, n: int) -> bool:
    client: Redis = Redis.from_url(primary.url)
    try:
        info = await client.info("replication")
    except Exception:
        return False
    finally:
        await client.aclose()
    online = [v for k, v in info.items() if k.startswith("slave") and v.get("state") == "online"]
    return len(online) >= n


async def _all_see(d: Deployment, replicas: int) -> bool:
    """Every sentinel knows the replicas and the two other sentinels (a failover needs
    a majority of them to agree)."""
    try:
        if await d.replicas_known() < replicas:
            return False
        for port in d.sentinel_ports:
            client: Redis = Redis(host="127.0.0.1", port=port, socket_timeout=1)
            try:
                state = await client.execute_command("SENTINEL", "master", SERVICE)
            finally:
                await client.aclose()
            fields = dict(zip(state[::2], state[1::2], strict=False))
            if int(fields.get(b"num-other-sentinels", 0)) < 2:
                return False
    except Exception:
        return False
    return True
