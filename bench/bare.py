"""Baseline for bench/receiver.py: an aiohttp handler that only reads the body, answers 202."""

from __future__ import annotations

import sys

from aiohttp import web


async def handle(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=202, text='{"status": "accepted"}', content_type="application/json")


def main() -> None:
    app = web.Application(client_max_size=1_048_576)
    app.router.add_post("/webhooks/chert/{tenant}", handle)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
