"""The admin listener: ``/healthz``, ``/readyz``, ``/metrics``, and ``/api/…`` behind a token.

``/healthz`` answers while the process is alive; ``/readyz`` only once every role of
the process has started, while Redis answers and while the process is not draining —
the signal a load balancer uses to start and stop sending webhooks. Every ``/api/`` route needs
``Authorization: Bearer <token>`` with an admin token (:mod:`relay.admin.auth`: what
it may see and do is the route's to check); with no token configured the API is off.
``/metrics`` needs one too when ``admin.metrics_token_required`` is set. The operator
page (``/ui``, :mod:`relay.admin.ui`) has its own login and session. Every route
answers only a ``Host`` it expects (:mod:`relay.admin.hosts`: DNS rebinding).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import redis.exceptions
from aiohttp import web
from redis.asyncio import Redis

from relay.admin.auth import PRINCIPAL, Refusals, TokenTable, bearer
from relay.admin.hosts import HostCheck
from relay.config import Config
from relay.config.values import Listen
from relay.metrics import Metrics, only_tenants

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SCRAPE_PING_TIMEOUT_S = 1.0  # the PING behind chert_relay_redis_up: each scrape, each /readyz
# The largest request body the admin listener reads: its forms and JSON bodies are a few
# hundred bytes, and a log-in form is read before anyone is known (aiohttp: 1 MiB).
MAX_REQUEST_BYTES = 64 * 1024


class Admin:
    def __init__(
        self, config: Config, redis_client: Redis, metrics: Metrics, listen: Listen | None = None
    ) -> None:
        self._redis = redis_client
        self._listen = listen  # where it listens: which Host it answers depends on it
        self._metrics = metrics
        self.draining = False
        self.starting = False  # the process's other roles are not all started yet
        self.refusals = Refusals(lambda reason: metrics.admin_refusals.labels(reason).inc())
        self.set_config(config)
        self._api_routes: list[web.RouteDef] = []

    def set_config(self, config: Config) -> None:
        self.tokens = TokenTable(config)
        self.hosts = HostCheck(config.admin.allowed_hosts, self._listen)
        # with tracing on, a scraper that asks for OpenMetrics gets the latency
        # histograms' exemplars (trace ids); otherwise the classic text, as ever
        self._openmetrics = config.telemetry.tracing

    def add_api_routes(self, routes: list[web.RouteDef]) -> None:
        """Routes under ``/api/`` added by other roles (dead letters, status…)."""
        self._api_routes += routes

    def add_routes(self, routes: list[web.RouteDef]) -> None:
        """Routes outside ``/api/`` that check who asks themselves (the operator page)."""
        self._api_routes += routes

    def app(self, *first: Any) -> web.Application:
        """The admin app; ``first`` are middlewares that run before its own."""
        app = web.Application(middlewares=[*first, self._auth], client_max_size=MAX_REQUEST_BYTES)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_routes(self._api_routes)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self.hosts.allows(request.headers.get("Host")):
            return self.refusals.refuse(
                request, 421, "host_not_allowed", "this Host is not one admin.allowed_hosts names"
            )
        path = request.path
        if path == "/metrics":
            if not self.tokens.metrics_token_required:
                return await handler(request)
        elif not path.startswith("/api/"):
            return await handler(request)
        if not self.tokens.enabled:
            return self.refusals.refuse(
                request, 403, "admin_api_disabled", "set admin.token or [[admin.tokens]]"
            )
        token = bearer(request)
        who = None if token is None else self.tokens.find(token)
        if who is None:
            return self.refusals.refuse(
                request, 401, "unauthorized", "a valid bearer token is required"
            )
        request[PRINCIPAL] = who
        return await handler(request)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def redis_ok(self, timeout: float = SCRAPE_PING_TIMEOUT_S) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._redis.ping()
        except (redis.exceptions.RedisError, OSError, TimeoutError):
            self._metrics.redis_up.set(0)
            return False
        self._metrics.redis_up.set(1)
        return True

    async def readyz(self, request: web.Request) -> web.Response:
        problems = []
        if self.starting:
            problems.append("starting")
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
        # chert_relay_redis_up is as of this scrape, not of the last /readyz.
        await self.redis_ok()
        # Off the event loop: some collectors read Redis synchronously (queue depth,
        # dead letters), and a slow Redis must not stall webhooks or deliveries.
        accept = request.headers.get("Accept", "") if self._openmetrics else ""
        body, content_type = await asyncio.to_thread(self._metrics.render_for, accept)
        who = request.get(PRINCIPAL)
        if who is not None and who.tenants is not None:
            body = only_tenants(body, who.tenants)  # other tenants' volumes are not its
        return web.Response(body=body, headers={"Content-Type": content_type})
