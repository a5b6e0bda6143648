"""The admin listener: ``/healthz``, ``/readyz``, ``/metrics``, and ``/api/…`` behind a token.

``/healthz`` answers while the process is alive; ``/readyz`` only while Redis
answers, the configuration is loaded and the process is not draining — the signal
a load balancer uses to stop sending webhooks. Every ``/api/`` route needs
``Authorization: Bearer <admin.token>``; with no token configured the API is off.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable

import redis.exceptions
from aiohttp import web
from redis.asyncio import Redis

from relay.config import Config
from relay.logs import Throttle
from relay.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Admin:
    def __init__(self, config: Config, redis_client: Redis, metrics: Metrics) -> None:
        self._redis = redis_client
        self._metrics = metrics
        self.draining = False
        self._throttle = Throttle(interval=10.0)
        self.set_config(config)
        self._api_routes: list[web.RouteDef] = []

    def set_config(self, config: Config) -> None:
        self._token = None if config.admin.token is None else config.admin.token.get().encode()

    def add_api_routes(self, routes: list[web.RouteDef]) -> None:
        """Routes under ``/api/`` added by other roles (dead letters, status…)."""
        self._api_routes += routes

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_routes(self._api_routes)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/api/"):
            return await handler(request)
        if self._token is None:
            return web.json_response(
                {"error": "admin_api_disabled", "message": "set admin.token to use the API"},
                status=403,
            )
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        given_token = token.encode(errors="surrogateescape")  # headers may carry any bytes
        if scheme.lower() != "bearer" or not hmac.compare_digest(given_token, self._token):
            suppressed = self._throttle.allow("unauthorized")
            if suppressed is not None:  # a scan must not flood the log
                log.warning(
                    "admin API: refused a request without a valid token from %s%s",
                    request.remote,
                    f" ({suppressed} more like it since the last line)" if suppressed else "",
                )
            return web.json_response(
                {"error": "unauthorized", "message": "a valid bearer token is required"},
                status=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await handler(request)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def redis_ok(self) -> bool:
        try:
            async with asyncio.timeout(2.0):
                await self._redis.ping()
        except (redis.exceptions.RedisError, OSError, TimeoutError):
            self._metrics.redis_up.set(0)
            return False
        self._metrics.redis_up.set(1)
        return True

    async def readyz(self, request: web.Request) -> web.Response:
        problems = []
        if self.draining:
            problems.append("draining")
        if not await self.redis_ok():
            problems.append("redis_unreachable")
        status = 503 if problems else 200
        return web.Response(
            status=status,
            body=json.dumps({"ready": not problems, "problems": problems}).encode(),
            content_type="application/json",
        )

    async def metrics(self, request: web.Request) -> web.Response:
        # Off the event loop: some collectors read Redis synchronously (queue depth,
        # dead letters), and a slow Redis must not stall webhooks or deliveries.
        body = await asyncio.to_thread(self._metrics.render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
