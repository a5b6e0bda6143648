"""Baselines for bench/receiver.py: handlers that only read the body and answer 202.

``bare.py PORT`` serves a ``web.Application`` with one route (the baseline the relay is
measured against). ``bare.py PORT --low-level`` serves the same handler on aiohttp's
low-level ``web.Server``, to show how much of the figure is aiohttp's application
layer. ``bare.py PORT --own-server`` serves it on the relay's own HTTP server
(``relay.edge.http_server``), to show how much is the HTTP server rather than anything the
relay does per webhook.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from relay.config.values import Listen
from relay.edge.http_server import HttpServer
from relay.edge.http_types import Response

BODY = b'{"status": "accepted"}'


async def handle(request: web.BaseRequest) -> web.Response:
    await request.read()
    return web.Response(status=202, body=BODY, content_type="application/json")


async def serve_low_level(port: int) -> None:
    runner = web.ServerRunner(web.Server(handle, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


class _Bare:
    """The same handler for ``relay.edge.http_server``: every request answered 202."""

    def head(self, msg: Any, remote: str | None) -> Any:
        return msg

    def body_failed(self, ctx: Any, status: int, reason: str, detail: str) -> Response:
        return Response(status, b"{}")

    def handle(self, ctx: Any, msg: Any, body: bytes) -> Response:
        return _ACCEPTED

    def failed(self, ctx: Any, error: BaseException) -> Response:
        return Response(500, b"{}")

    def refused(self, reason: str, detail: str, remote: str | None) -> Response:
        return Response(400, b"{}")

    def connection_refused(self, remote: str | None) -> Response:
        return Response(503, b"{}")

    def idle_connection_closed(self) -> None:
        pass

    def slow_connection_closed(self, remote: str | None) -> None:
        pass


_ACCEPTED = Response(202, BODY)


async def serve_own(port: int) -> None:
    server = HttpServer(_Bare(), max_body=1_048_576, body_timeout=30.0)
    await server.start(Listen(host="127.0.0.1", port=port))
    await asyncio.Event().wait()


def main() -> None:
    port = int(sys.argv[1])
    if "--low-level" in sys.argv[2:]:
        asyncio.run(serve_low_level(port))
        return
    if "--own-server" in sys.argv[2:]:
        asyncio.run(serve_own(port))
        return
    app = web.Application(client_max_size=1_048_576)
    app.router.add_post("/webhooks/chert/{tenant}", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
