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


async def _config_value(client: Redis, name: str) -> str | None:
    found = await client.config_get(name)
    for key, value in found.items():
        if (key.decode() if isinstance(key, bytes) else key) == name:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


async def check_server(
    client: Redis, *, require_aof: bool = False, min_replica_acks: int = 0, log_bytes: int = 0
) -> list[str]:
    """Refuse a Redis that can evict keys; return warnings for softer risks — among them
    an event log allowed (``log_bytes``) more than a quarter of Redis' ``maxmemory``.

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
        maxmemory = int(await _config_value(client, "maxmemory") or 0)
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
    if maxmemory and log_bytes > maxmemory // 4:
        warnings.append(
            f"event_log.max_memory ({log_bytes:,} bytes) is more than a quarter of Redis' "
            f"maxmemory ({maxmemory:,} bytes): at its cap the event log leaves less room "
            "for queued events, and Redis refuses webhooks (503) once it is full. Lower "
            "event_log.max_memory or raise maxmemory."
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
    return warnings + await replication_warnings(client, min_replica_acks)


async def replication_warnings(client: Redis, min_replica_acks: int = 0) -> list[str]:
    """Refuse a replica; warn about what replication still leaves to lose.

    The relay writes, so it must reach the primary. With ``min_replica_acks`` a webhook
    is answered 2xx only once that many replicas have its event: fewer connected now
    means 503s until they are; a replica with AOF off loses what it has on a crash; and a
    primary with ``min-replicas-to-write 0`` keeps taking writes when cut off from its
    replicas (a partition), writes a failover will discard.
    """
    try:
        info = await client.info("replication")
    except redis.exceptions.ResponseError:
        return []  # INFO refused (a managed Redis): nothing to check
    role = str(info.get("role", "master"))
    if role != "master":
        raise UnsafeRedisError(
            f"Redis is a replica (role {role}), which refuses writes: point [redis] url at "
            "the primary, or list the sentinels ([redis] sentinels, service_name)"
        )
    out: list[str] = []
    replicas = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
    if min_replica_acks > len(replicas):
        out.append(
            f"redis.min_replica_acks is {min_replica_acks} but {len(replicas)} replica(s) "
            "are connected: webhooks get 503 until enough are"
        )
    if min_replica_acks:
        try:
            to_write = await _config_value(client, "min-replicas-to-write")
        except redis.exceptions.ResponseError:
            to_write = None
        if to_write == "0":
            out.append(
                "the Redis primary has min-replicas-to-write 0: cut off from its replicas it "
                "keeps taking writes that a failover discards (the relay answers 503 for "
                "them, but set min-replicas-to-write 1 and min-replicas-max-lag 10)"
            )
    for r in replicas:
        where = f"{r.get('ip')}:{r.get('port')}"
        try:
            aof = await _replica_setting(client, str(r.get("ip")), int(r.get("port", 0)))
        except (redis.exceptions.RedisError, OSError, ValueError) as e:
            out.append(f"cannot check the replica at {where} ({e}); make sure its AOF is on")
            continue
        if aof is not None and aof != "yes":
            out.append(
                f"the replica at {where} has AOF off: events it holds are lost if it crashes "
                "before it is promoted. Set appendonly yes on every replica."
            )
    return out


async def _replica_setting(client: Redis, host: str, port: int) -> str | None:
    """A replica's ``appendonly``, asked with the primary's credentials."""
    _, kwargs = _pool_kwargs(client)
    for drop in ("host", "port", "path", "connection_pool", "redis_connect_func"):
        kwargs.pop(drop, None)
    replica = Redis(host=host, port=port, **kwargs)
    try:
        return await _config_value(replica, "appendonly")
    finally:
        await replica.aclose()


async def wait_for_redis(
    client: Redis,
    where: str,
    *,
    within: float,
    require_aof: bool = False,
    min_replica_acks: int = 0,
    log_bytes: int = 0,
) -> list[str]:
    """:func:`check_server`, waiting (with backoff) up to ``within`` seconds for a Redis
    that does not answer yet — a slow boot should not trip systemd's start limit.

    ``where`` names the Redis in messages (a URL without credentials). Raises
    :class:`RedisUnavailableError` once the time is up, and :class:`UnsafeRedisError` at
    once.
    """
    deadline = time.monotonic() + within
    wait, told = 0.1, False
    while True:
        try:
            return await check_server(
                client,
                require_aof=require_aof,
                min_replica_acks=min_replica_acks,
                log_bytes=log_bytes,
            )
        except RedisUnavailableError as e:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RedisUnavailableError(
                    f"Redis at {where} did not answer within {within:g}s (redis.startup_wait): {e}"
                ) from None
            if not told:
                log.warning(
                    "Redis at %s does not answer yet (%s); waiting up to %gs",
                    where,
                    e,
                    within,
                )
                told = True
            await asyncio.sleep(min(wait, left))
            wait = min(wait * 2, 2.0)
