"""Connecting to Redis and checking that it will not lose what the relay stores."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.exceptions
from redis.asyncio import Redis

from relay.errors import RedisUnavailableError, UnsafeRedisError

log = logging.getLogger(__name__)

# Redis policies that may evict keys: every relay key has a TTL, so the volatile-*
# policies are as dangerous as the allkeys-* ones.
SAFE_POLICY = "noeviction"


def redact_url(url: str) -> str:
    """The URL without its password (in the user info or ``?password=``), for logs."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user = f"{parts.username}:***@" if parts.username else "***@"
        netloc = user + netloc.rsplit("@", 1)[1]
    query = "&".join(
        f"{k}=***" if k.lower() == "password" else (f"{k}={v}" if sep else k)
        for k, sep, v in (pair.partition("=") for pair in parts.query.split("&") if pair)
    )
    if netloc == parts.netloc and query == parts.query:
        return url  # nothing to hide: as given
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def connect(url: str, *, timeout: float = 5.0, max_connections: int = 64) -> Redis:
    """A client for ``url`` (``redis://``, ``rediss://`` or ``unix://``)."""
    client: Redis = Redis.from_url(
        url,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        max_connections=max_connections,
        health_check_interval=30,
    )
    return client


def _pool_kwargs(client: Redis) -> tuple[type[Any], dict[str, Any]]:
    pool = client.connection_pool
    return pool.connection_class, dict(pool.connection_kwargs)


def blocking_pool(client: Redis, size: int) -> redis.asyncio.BlockingConnectionPool:
    """A pool of ``size`` connections to the same server as ``client``; a caller waits
    (up to 10 s) for a free one rather than failing (the worker's ``max_jobs``)."""
    cls, kwargs = _pool_kwargs(client)
    return redis.asyncio.BlockingConnectionPool(
        connection_class=cls, max_connections=size, timeout=10, **kwargs
    )


def sync_client(client: Redis, timeout: float = 1.0) -> redis.Redis:
    """A blocking client to the same server as ``client`` (for scrape-time collectors)."""
    cls, kwargs = _pool_kwargs(client)
    sync_cls: type[Any] = redis.connection.Connection
    if cls.__name__ == "UnixDomainSocketConnection":
        sync_cls = redis.connection.UnixDomainSocketConnection
    elif cls.__name__ == "SSLConnection":
        sync_cls = redis.connection.SSLConnection
    kwargs.update(socket_timeout=timeout, socket_connect_timeout=timeout)
    kwargs.pop("redis_connect_func", None)
    pool = redis.ConnectionPool(connection_class=sync_cls, max_connections=2, **kwargs)
    return redis.Redis(connection_pool=pool)


async def _config_value(client: Redis, name: str) -> str | None:
    found = await client.config_get(name)
    for key, value in found.items():
        if (key.decode() if isinstance(key, bytes) else key) == name:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


async def check_server(client: Redis, *, require_aof: bool = False) -> list[str]:
    """Refuse a Redis that can evict keys; return warnings for softer risks.

    Raises :class:`RedisUnavailableError` if it cannot be reached, and
    :class:`UnsafeRedisError` if its settings could lose acknowledged events.
    """
    try:
        await client.ping()
    except (redis.exceptions.RedisError, OSError) as e:
        raise RedisUnavailableError(f"cannot reach Redis: {e}") from None
    warnings: list[str] = []
    try:
        policy = await _config_value(client, "maxmemory-policy")
        aof = await _config_value(client, "appendonly")
        fsync = await _config_value(client, "appendfsync")
    except redis.exceptions.ResponseError as e:
        return [
            f"cannot read Redis settings (CONFIG GET refused: {e}); make sure it runs "
            "with maxmemory-policy noeviction and appendonly yes"
        ]
    if policy is not None and policy != SAFE_POLICY:
        raise UnsafeRedisError(
            f"Redis maxmemory-policy is {policy!r}: it may evict queued events. "
            f"Set maxmemory-policy {SAFE_POLICY}."
        )
    if aof is not None and aof != "yes":
        msg = (
            "Redis has AOF off (appendonly no): events acknowledged since its last "
            "snapshot are lost if it crashes. Set appendonly yes."
        )
        if require_aof:
            raise UnsafeRedisError(msg)
        warnings.append(msg)
    elif fsync is not None and fsync != "always":
        warnings.append(
            f"Redis has appendfsync {fsync}: a machine crash can lose events acknowledged "
            "in the last second or so. appendfsync always makes every 202 durable."
        )
    return warnings


async def wait_for_redis(
    client: Redis, url: str, *, within: float, require_aof: bool = False
) -> list[str]:
    """:func:`check_server`, waiting (with backoff) up to ``within`` seconds for a Redis
    that does not answer yet — a slow boot should not trip systemd's start limit.

    Raises :class:`RedisUnavailableError` naming the URL (without credentials) once the
    time is up, and :class:`UnsafeRedisError` at once.
    """
    deadline = time.monotonic() + within
    wait, told = 0.1, False
    while True:
        try:
            return await check_server(client, require_aof=require_aof)
        except RedisUnavailableError as e:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RedisUnavailableError(
                    f"Redis at {redact_url(url)} did not answer within {within:g}s "
                    f"(redis.startup_wait): {e}"
                ) from None
            if not told:
                log.warning(
                    "Redis at %s does not answer yet (%s); waiting up to %gs",
                    redact_url(url),
                    e,
                    within,
                )
                told = True
            await asyncio.sleep(min(wait, left))
            wait = min(wait * 2, 2.0)
