"""The control API under ``/_sim``: inject faults and emit events from curl.

JSON in, JSON out, no auth (the simulator is a local tool; keep it on 127.0.0.1):

- ``GET /_sim/faults`` · ``PATCH /_sim/faults`` with any subset of the fault fields
- ``POST /_sim/emit`` with ``{"tenant", "type", "count"}`` (all optional)
- ``POST /_sim/disconnect``: drop every open SSE connection
- ``GET /_sim/stats``: counts of events, pushes, API requests and streams
- ``GET /_sim/tenants``: slugs, webhook URLs and subscription ids (never secrets)
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from relay.simulator.server import Simulator

PREFIX = "/_sim"
MAX_EMIT = 10_000


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class ControlApi:
    def __init__(self, sim: Simulator) -> None:
        self._sim = sim

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(f"{PREFIX}/faults", self.get_faults)
        app.router.add_patch(f"{PREFIX}/faults", self.patch_faults)
        app.router.add_post(f"{PREFIX}/emit", self.emit)
        app.router.add_post(f"{PREFIX}/disconnect", self.disconnect)
        app.router.add_get(f"{PREFIX}/stats", self.stats)
        app.router.add_get(f"{PREFIX}/tenants", self.tenants)

    async def _json_object(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError:
            raise web.HTTPBadRequest(
                text='{"error": "the body is not JSON"}', content_type="application/json"
            ) from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(
                text='{"error": "the body is not a JSON object"}', content_type="application/json"
            )
        return body

    async def get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self._sim.faults.to_dict())

    async def patch_faults(self, request: web.Request) -> web.Response:
        body = await self._json_object(request)
        try:
            self._sim.faults.update(body)
        except ValueError as e:
            return _error(400, str(e))
        return web.json_response(self._sim.faults.to_dict())

    async def emit(self, request: web.Request) -> web.Response:
        body = await self._json_object(request)
        tenant = body.get("tenant") or next(iter(self._sim.tenants))
        event_type = body.get("type") or "message.received"
        count = body.get("count", 1)
        if tenant not in self._sim.tenants:
            return _error(404, f"no tenant {tenant!r}")
        if not isinstance(event_type, str):
            return _error(400, "type is a string")
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_EMIT:
            return _error(400, f"count is a whole number from 1 to {MAX_EMIT}")
        rows = self._sim.emit(tenant, type=event_type, count=count)
        return web.json_response(
            {
                "tenant": tenant,
                "count": len(rows),
                "events": [
                    {
                        "id": r["id"],
                        "event_id": r["event_id"],
                        "type": r["type"],
                        "created_at": r["created_at"],
                    }
                    for r in rows
                ],
            }
        )

    async def disconnect(self, request: web.Request) -> web.Response:
        return web.json_response({"disconnected": self._sim.disconnect_streams()})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(self._sim.stats())

    async def tenants(self, request: web.Request) -> web.Response:
        return web.json_response(
            [
                {
                    "slug": t.slug,
                    "webhook_url": t.webhook_url,
                    "subscription_id": t.subscription_id,
                    "legacy_signature": t.legacy_signature,
                }
                for t in self._sim.tenants.values()
            ]
        )
