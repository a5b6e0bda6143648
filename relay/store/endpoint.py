"""Where the relay's Redis is, and the clients every role opens to it.

Three ways: ``[redis] url``; a Sentinel deployment (``sentinels`` + ``service_name``),
whose current primary every client finds through the sentinels — on connecting, and
again after a failover, when its connections to the old primary fail (or answer
``READONLY``: the old primary came back as a replica) and are replaced; or neither, the
embedded default (a private redis-server under ``state_dir``, :mod:`relay.store.embedded`).

redis-py's Sentinel support does the finding (``Sentinel.master_for``): the client's
connection pool asks the sentinels for the primary's address before each new connection
and drops idle connections to a primary that is no longer one.
"""

from __future__ import annotations

import asyncio
import logging
import stat
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis.asyncio
import redis.exceptions
import redis.sentinel
from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from relay.config import Config, RedisConfig
from relay.errors import RedisUnavailableError
from relay.store.client import connect, redact_url
from relay.store.embedded import open_redis_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoint:
    """A Redis URL, or a Sentinel deployment's primary (``sentinels`` not empty)."""

    url: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    service_name: str = ""
    redis_kwargs: dict[str, Any] = field(default_factory=dict)  # the data nodes'
    sentinel_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, r: RedisConfig, url: str | None) -> Endpoint:
        if not r.sentinels:
            return cls(url=url)
        node: dict[str, Any] = {"db": r.db, "ssl": r.tls}
        if r.username:
            node["username"] = r.username
        if r.password is not None:
            node["password"] = r.password.get()
        sentinel: dict[str, Any] = {"ssl": r.sentinel_tls}
        if r.sentinel_username:
            sentinel["username"] = r.sentinel_username
        if r.sentinel_password is not None:
            sentinel["password"] = r.sentinel_password.get()
        return cls(
            sentinels=tuple(r.sentinels),
            service_name=r.service_name or "",
            redis_kwargs=node,
            sentinel_kwargs=sentinel,
        )

    @property
    def is_sentinel(self) -> bool:
        return bool(self.sentinels)

    def describe(self) -> str:
        """For logs and errors: never a password."""
        if not self.is_sentinel:
            return redact_url(self.url or "")
        where = ",".join(f"{h}:{p}" for h, p in self.sentinels)
        return f"the primary of {self.service_name!r} (sentinels {where})"

    def _sentinel(self, timeout: float) -> Sentinel:
        kwargs = {
            **self.sentinel_kwargs,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
        }
        return Sentinel(list(self.sentinels), sentinel_kwargs=kwargs)  # type: ignore[no-untyped-call]

    def client(self, *, timeout: float = 5.0, max_connections: int = 64) -> Redis:
        """An asyncio client to the primary (for a URL: :func:`~relay.store.client.connect`)."""
        if not self.is_sentinel:
            return connect(self.url or "", timeout=timeout, max_connections=max_connections)
        client: Redis = self._sentinel(timeout).master_for(
            self.service_name,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            max_connections=max_connections,
            health_check_interval=30,
            **self.redis_kwargs,
        )
        return client

    def sync_client(self, timeout: float = 1.0) -> redis.Redis:
        """A blocking client to the primary, for scrape-time collectors."""
        if not self.is_sentinel:
            pool = redis.ConnectionPool.from_url(
                self.url or "",
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                max_connections=2,
            )
            return redis.Redis(connection_pool=pool)
        kwargs = {
            **self.sentinel_kwargs,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
        }
        sentinel = redis.sentinel.Sentinel(list(self.sentinels), sentinel_kwargs=kwargs)  # type: ignore[no-untyped-call]
        found: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            self.service_name,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            max_connections=2,
            **self.redis_kwargs,
        )
        return found

    async def watch_primary(
        self, changed: Callable[[str | None, str], None], *, every: float = 1.0
    ) -> None:
        """Ask the sentinels for the primary every ``every`` seconds, until cancelled, and
        call ``changed(old, new)`` when they name another (a failover; ``old`` is None
        the first time). Does nothing for a URL."""
        if not self.is_sentinel:
            return
        sentinel = self._sentinel(timeout=every)
        last: str | None = None
        unknown = False
        try:
            while True:
                try:
                    host, port = await sentinel.discover_master(self.service_name)
                except (redis.exceptions.RedisError, OSError) as e:
                    if not unknown:
                        log.warning("the sentinels know no Redis primary now: %s", e)
                        unknown = True
                else:
                    unknown = False
                    now = f"{host}:{port}"
                    if now != last:
                        changed(last, now)
                        last = now
                await asyncio.sleep(every)
        finally:
            for s in sentinel.sentinels:
                await s.aclose()


def primary_of(client: Redis) -> str | None:
    """The address a Sentinel-managed client's pool last found for the primary."""
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool) and pool.master_address is not None:
        host, port = pool.master_address
        return f"{host}:{port}"
    return None


async def open_endpoint(
    config: Config, stack: AsyncExitStack, *, share_running: bool = False
) -> Endpoint:
    """The Redis to use: ``[redis] sentinels`` or ``url``, or else the embedded server
    under ``state_dir``, started now and stopped when ``stack`` closes (see
    :func:`~relay.store.embedded.open_redis_url` for ``share_running``)."""
    if config.redis.sentinels:
        return Endpoint.from_config(config.redis, None)
    url = await open_redis_url(config, stack, share_running=share_running)
    return Endpoint.from_config(config.redis, url)


async def open_client(
    config: Config, stack: AsyncExitStack, *, share_running: bool = False
) -> tuple[Endpoint, Redis]:
    """:func:`open_endpoint` and a client to it, both closed when ``stack`` closes."""
    endpoint = await open_endpoint(config, stack, share_running=share_running)
    client = endpoint.client(timeout=config.redis.connect_timeout)
    stack.push_async_callback(close_client, client)
    return endpoint, client


def require_relay_state(config: Config) -> None:
    """For a command that works on the relay's data (``dlq``, ``events``, ``sinks``,
    ``backfill``): on the embedded default, the relay's state must be there already. A
    ``state_dir`` with no embedded Redis in it is refused (:class:`RedisUnavailableError`)
    rather than started empty. That is the relative example's ``var/chert-relay`` met from
    another working directory, or ``/var/lib/chert-relay`` (the systemd units'
    ``CHERT_RELAY__RELAY__STATE_DIR``) unknown to the shell. A command on an empty Redis
    would report no dead letters, pause nothing the relay sends, or queue events no relay
    delivers."""
    if config.redis.url is None and not config.redis.sentinels:
        data = config.relay.state_dir / "redis"
        try:
            there = stat.S_ISDIR(data.stat().st_mode)
        except (FileNotFoundError, NotADirectoryError):
            there = False
        except OSError as e:  # (not Path.is_dir(), which hides this from Python 3.14 on)
            raise RedisUnavailableError(
                f"cannot read the relay's state at {data.resolve()} ({e.strerror or e}): "
                "run this as root or as the relay's user"
            ) from None
        if not there:
            where = data.resolve()
            relative = (
                ""
                if config.relay.state_dir.is_absolute()
                else (
                    f" (relay.state_dir = {str(config.relay.state_dir)!r} is relative to the "
                    f"working directory, {Path.cwd()})"
                )
            )
            raise RedisUnavailableError(
                f"no relay state at {where}{relative}: the embedded Redis keeps the relay's "
                "data there once the relay has run. Give this command the relay's state_dir "
                "(the systemd units set CHERT_RELAY__RELAY__STATE_DIR=/var/lib/chert-relay) "
                "or its [redis] url"
            )


async def open_command_client(config: Config, stack: AsyncExitStack) -> Redis:
    """A client for a command run from an operator's shell (``dlq``, ``events``,
    ``sinks``): the relay's Redis — the running relay's embedded server shared — once it
    answers; :class:`RedisUnavailableError` if it does not, or if the relay has no state
    where this command looks (:func:`require_relay_state`)."""
    require_relay_state(config)
    _, client = await open_client(config, stack, share_running=True)
    try:
        await client.ping()
    except (redis.exceptions.RedisError, OSError) as e:
        raise RedisUnavailableError(f"cannot reach the relay's Redis: {e}") from None
    return client


async def close_client(client: Redis) -> None:
    """Close ``client``, and the sentinels' clients it found its primary with."""
    await client.aclose()
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        for s in pool.sentinel_manager.sentinels:
            await s.aclose()
