"""The receiver role: the webhook receiver on its listener (:mod:`relay.edge.http_server`).

Stopping it stops listening, closes idle connections and lets the webhooks in flight be
answered (up to ``server.shutdown_timeout``) before their connections close, then waits
for the ingests they started (``Ingestor.drain``).
"""

from __future__ import annotations

import asyncio
import logging

from relay.config import Config
from relay.config.values import address_text
from relay.edge.receiver import Receiver
from relay.metrics import total
from relay.runtime import Runtime

log = logging.getLogger(__name__)


class ReceiverRole:
    name = "receiver"

    def __init__(self, rt: Runtime) -> None:
        cfg = rt.config
        self.receiver = Receiver(cfg, rt.ingestor, rt.metrics)
        self._ingestor = rt.ingestor
        self._metrics = rt.metrics
        self._server = self.receiver.server()
        self.listen = cfg.server.listen
        self._shutdown_timeout = cfg.server.shutdown_timeout
        self._stopped = asyncio.Event()
        self.addresses: list[object] = []

    async def start(self) -> None:
        await self._server.start(self.listen)
        self.addresses = list(self._server.addresses)
        log.info("receiver listening on %s", ", ".join(map(address_text, self.addresses)))

    async def run(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        self.receiver.draining = True
        try:
            await self._server.shutdown(self._shutdown_timeout)
        finally:
            self._stopped.set()
            await self._ingestor.drain()

    def reload(self, config: Config) -> None:
        self.receiver.set_config(config)

    def status(self) -> str:
        accepted = total(self._metrics.webhooks, outcome="accepted")
        return f"{accepted:.0f} webhooks accepted"
