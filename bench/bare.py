"""Baselines for bench/receiver.py: aiohttp handlers that only read the body and answer 202.

``bare.py PORT`` serves a ``web.Application`` with one route (the baseline the relay is
measured against); ``bare.py PORT --low-level`` serves the same handler on aiohttp's
low-level ``web.Server``, as the relay's receiver does, to show how much of the figure
is aiohttp's application layer rather than anything either handler does.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

BODY = b'{"status": "accepted"}'


async def handle(request: web.BaseRequest) -> web.Response:
    await request.read()
    return web.Response(status=202, body=BODY, content_type="application/json")


async def serve_low_level(port: int) -> None:
    runner = web.ServerRunner(web.Server(handle, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


def main() -> None:
    port = int(sys.argv[1])
    if "--low-level" in sys.argv[2:]:
        asyncio.run(serve_low_level(port))
        return
    app = web.Application(client_max_size=1_048_576)
    app.router.add_post("/webhooks/chert/{tenant}", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
