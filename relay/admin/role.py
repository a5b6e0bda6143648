"""The admin role: the admin app (:mod:`relay.admin.app`) on its listener, with the
dead-letter, event-log, poller and sink routes and the operator page (:mod:`relay.admin.ui`), run
without aiohttp's own signal handling."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web

from relay.admin.app import Admin
from relay.admin.deadletter_routes import DeadLetterApi
from relay.admin.events_routes import EventLogApi
from relay.admin.listener import ConnectionGuard
from relay.admin.parser_log import admin_server_logger
from relay.admin.poller_routes import PollerStatusApi
from relay.admin.sink_routes import SinkApi
from relay.admin.ui.routes import OperatorPage
from relay.config import Config
from relay.config.values import Listen, address_text
from relay.runtime import Runtime
from relay.upstream.poller import Poller

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 5.0


class AdminRole:
    name = "admin"

    def __init__(self, rt: Runtime, poller: Callable[[], Poller | None], listen: Listen) -> None:
        self.admin = Admin(rt.config, rt.redis, rt.metrics, listen)
        self.admin.starting = True  # until the service has started every role
        self.admin.add_api_routes(
            DeadLetterApi(rt.redis, lambda: rt.config, self.admin.refusals).routes()
        )
        self.admin.add_api_routes(
            EventLogApi(rt.redis, lambda: rt.config, self.admin.refusals).routes()
        )
        self.admin.add_api_routes(PollerStatusApi(rt, poller).routes())
        self.admin.add_api_routes(
            SinkApi(rt.redis, lambda: rt.config, self.admin.refusals).routes()
        )
        self.page = OperatorPage(self.admin, rt, poller)
        self.admin.add_routes(self.page.routes())
        self.listen = listen
        cfg = rt.config.admin
        self.guard = ConnectionGuard(
            cfg.max_connections,
            cfg.head_timeout,
            cfg.idle_timeout,
            lambda reason: rt.metrics.admin_refusals.labels(reason).inc(),
        )
        self._runner = web.AppRunner(
            self.admin.app(self.guard.middleware),
            handle_signals=False,
            access_log=None,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
            logger=admin_server_logger(),
        )
        self._stopped = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.addresses: list[object] = []

    async def start(self) -> None:
        listen = self.listen
        await self._runner.setup()
        # The listener is ours (not an aiohttp site) so that each connection goes
        # through the guard; aiohttp's protocol serves it unchanged.
        server = self._runner.server
        assert server is not None
        factory = self.guard.factory(server)
        loop = asyncio.get_running_loop()
        if listen.path is not None:
            self._server = await loop.create_unix_server(factory, listen.path)
        else:
            assert listen.port is not None
            self._server = await loop.create_server(
                factory, listen.host, listen.port, reuse_address=True
            )
        self.guard.start()
        self.addresses = [s.getsockname() for s in self._server.sockets]
        log.info("admin listening on %s", ", ".join(map(address_text, self.addresses)))

    def ready(self) -> None:
        self.admin.starting = False

    def drain(self) -> None:
        self.admin.draining = True

    async def run(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        self.guard.stop()
        if self._server is not None:
            self._server.close()
        await self._runner.cleanup()
        self._stopped.set()

    def reload(self, config: Config) -> None:
        self.admin.set_config(config)
        cfg = config.admin
        self.guard.max_connections = cfg.max_connections
        self.guard.head_timeout = cfg.head_timeout
        self.guard.idle_timeout = cfg.idle_timeout
